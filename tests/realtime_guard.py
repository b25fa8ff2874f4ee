"""Keeps a test run off real-time scheduling: a process of its own, started by tests/conftest.py.

On these 2-core machines something outside this project has put test processes at SCHED_FIFO 99 (seen: the test
runner twice, root Chromium's zygotes once). Real-time tasks that spin starve every task of their priority and
below, the tests' own timeouts included, and a run then hangs until CI kills it. The guard wakes every POLL_S,
puts every thread of the run (the runner, its descendants, and every process whose environment carries
RUN_MARKER=<runner pid>, orphans included) that it finds at a real-time policy back to SCHED_OTHER and logs each
one, with its process's command line and parents, to the log file and to the run's output. Nothing else on the
machine is touched.
It runs at the best nice level it may take (real-time throttling leaves normal tasks a share of every second, so
it runs even while real-time tasks spin) and exits soon after the runner does.

    python tests/realtime_guard.py RUNNER_PID LOG_PATH OUTPUT_FD
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

POLL_S = 1.0
RUN_MARKER = "APBV_TEST_RUN"  # conftest sets it to the runner's pid; processes exec'd in the run inherit it
SCHED_DEADLINE = 6  # linux/sched.h (the os module does not name it)
REALTIME = {os.SCHED_FIFO, os.SCHED_RR, SCHED_DEADLINE}


def _stat(path: Path) -> list[str] | None:
    """The fields after the command name of a /proc stat file (field 3 of proc(5) first), or None if gone."""
    try:
        text = path.read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _describe(pid: int, runner: int) -> str:
    """The process's command line and those of its parents up to the runner, for the log."""
    chain = []
    while pid > 0:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            fields = _stat(Path(f"/proc/{pid}/stat"))
        except OSError:
            break
        chain.append(f"{pid} {cmdline.strip()[:160]}")
        if pid == runner or not fields:
            break
        pid = int(fields[1])
    return " <- ".join(chain)


def _marked(proc: Path, runner: int) -> bool:
    """Whether the process was started (by exec) from within the run: it carries RUN_MARKER=<runner pid>."""
    try:
        return f"{RUN_MARKER}={runner}".encode() in (proc / "environ").read_bytes().split(b"\0")
    except OSError:
        return False


def run_processes(runner: int) -> list[int]:
    """The runner, its descendants (forked children included: /proc shows them no marker, which is set after
    the runner's start) and every process carrying the marker (orphans included), the guard excepted."""
    parents: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        fields = _stat(proc / "stat") if proc.name.isdigit() else None
        if fields is not None:
            parents[int(proc.name)] = int(fields[1])
    children: dict[int, list[int]] = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    found, todo = set(), [runner]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo += children.get(pid, [])
    found |= {pid for pid in parents if pid not in found and _marked(Path(f"/proc/{pid}"), runner)}
    found.discard(os.getpid())
    return sorted(found)


def realtime_threads(runner: int) -> list[tuple[int, int, int]]:
    """(pid, tid, policy) of every thread of the run at a real-time policy."""
    found = []
    for pid in run_processes(runner):
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            task_fields = _stat(task / "stat")
            if task_fields is not None and int(task_fields[38]) in REALTIME:
                found.append((pid, int(task.name), int(task_fields[38])))
    return found


def demote(found: list[tuple[int, int, int]], runner: int, log) -> None:
    """SCHED_OTHER for each thread found; one log line per process."""
    described: set[int] = set()
    for pid, tid, policy in found:
        try:
            os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
        except OSError as e:
            log(f"realtime_guard: could not demote thread {tid} of {pid} (policy {policy}): {e}")
            continue
        if pid not in described:
            described.add(pid)
            log(f"realtime_guard: thread {tid} of {_describe(pid, runner)} was at policy {policy}; now SCHED_OTHER")


def main(runner: int, log_path: str, output_fd: int) -> None:
    try:
        os.nice(-20)
    except OSError:
        pass
    output = os.fdopen(output_fd, "w", buffering=1)

    def log(line: str) -> None:
        stamped = f"{time.strftime('%H:%M:%S')} {line}"
        with open(log_path, "a") as f:
            print(stamped, file=f)
        try:
            print(f"\n{stamped}", file=output)
        except OSError:  # the run's output is gone (a closed pipe): the log file still has it, guarding goes on
            pass

    while os.getppid() == runner:
        demote(realtime_threads(runner), runner, log)
        time.sleep(POLL_S)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
