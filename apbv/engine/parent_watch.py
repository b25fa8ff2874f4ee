"""Run a module as a program that exits once the process that started it is gone.

    python -m apbv.engine.parent_watch PARENT_PID MODULE [ARGS...]

A local pool starts its ranks through this, so that none outlives the pool's process, even one killed while the
rank is still importing torch (the watch starts first: this module needs the standard library only).
"""

from __future__ import annotations

import os
import runpy
import sys
import threading
import time

EXIT_POOL_LOST = 76  # a rank whose pool went away without a Shutdown (under torchrun: a failure, so it restarts)
POLL_S = 0.5  # how often the parent is looked for


def watch_parent(parent_pid: int) -> None:
    """Exit (EXIT_POOL_LOST) as soon as `parent_pid` is no longer this process's parent, whatever the process is
    doing then (importing, loading, waiting, blocked in a collective)."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(POLL_S)
        os._exit(EXIT_POOL_LOST)

    threading.Thread(target=watch, name="apbv-parent-watch", daemon=True).start()


if __name__ == "__main__":
    parent, module, *args = sys.argv[1:]
    watch_parent(int(parent))
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
