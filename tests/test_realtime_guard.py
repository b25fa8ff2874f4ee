"""tests/realtime_guard.py, started by conftest with this run, puts the run's real-time threads back to SCHED_OTHER."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from .realtime_guard import POLL_S

CAP_SYS_NICE = 23  # linux/capability.h


def _can_go_realtime() -> bool:
    """Whether this process may set a real-time policy (asked without setting one: the guard would log it)."""
    status = Path("/proc/self/status").read_text()
    effective = int(next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff:")), 16)
    return bool(effective >> CAP_SYS_NICE & 1)


def _forked_sleeper() -> int:
    """A child forked without exec: /proc shows it none of the environment the runner set after its start."""
    pid = os.fork()
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    return pid


def _exec_sleeper() -> int:
    return subprocess.Popen(["sleep", "30"]).pid


@pytest.mark.skipif(not _can_go_realtime(), reason="needs the right to set a real-time policy (CAP_SYS_NICE)")
@pytest.mark.parametrize("start", [_exec_sleeper, _forked_sleeper], ids=["exec", "fork"])
def test_a_process_of_the_run_set_to_real_time_is_put_back(start):
    pid = start()
    try:
        os.sched_setscheduler(pid, os.SCHED_FIFO, os.sched_param(1))
        deadline = time.monotonic() + 5 * POLL_S
        while os.sched_getscheduler(pid) != os.SCHED_OTHER:
            assert time.monotonic() < deadline, "the guard left a real-time process of the run alone"
            time.sleep(0.05)
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
