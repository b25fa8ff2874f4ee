"""Run a function on W real processes joined by a gloo process group (CPU); reusable by every test module.

`run_ranks(world_size, fn, *args)` spawns W processes, each calling `fn(rank, world_size, *args)` after
`init_process_group("gloo")` on a free local port, and returns the W results in rank order. Each rank writes its
result (`torch.save`, so tensors survive its exit) or its traceback to a file of its own; the parent only polls
for those files and the processes' exit codes, so nothing it does can block past the deadline. A failure on any
rank, a rank that exits without a result, or the deadline kills all workers (a rank stuck in a collective never
returns on its own) and raises; at the deadline the error carries every live rank's Python stacks.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from apbv.comm import free_port

POLL_S = 0.05
STACKS_GRACE_S = 2.0  # how long a rank gets to write its stacks after SIGUSR1


def run_ranks(world_size: int, fn: Callable[..., Any], *args: Any, timeout: float = 120.0) -> list[Any]:
    """fn must be importable (module level). Returns [fn(0, W, *args), ..., fn(W-1, W, *args)] within `timeout`
    seconds for all ranks together."""
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="apbv-ranks-") as tmp:
        out = Path(tmp)
        procs = [
            ctx.Process(target=_worker, args=(rank, world_size, port, str(out), fn, args), daemon=True)
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        try:
            _wait_for_results(procs, out, time.monotonic() + timeout, timeout)
            results = [torch.load(out / f"{rank}.pt", weights_only=False) for rank in range(world_size)]
            for p in procs:
                p.join(timeout=30)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
    return results


def _wait_for_results(procs: list, out: Path, deadline: float, timeout: float) -> None:
    """Poll until every rank has written its result; raise on a failed rank, a silent exit or the deadline."""
    world_size = len(procs)
    while True:
        done = {rank for rank in range(world_size) if (out / f"{rank}.pt").exists()}
        for rank in range(world_size):
            error = out / f"{rank}.err"
            if error.exists():
                raise RuntimeError(f"rank {rank} of {world_size} failed:\n{error.read_text()}")
            if rank not in done and procs[rank].exitcode is not None:
                time.sleep(POLL_S)  # its result file may land between the two checks
                if not (out / f"{rank}.pt").exists() and not error.exists():
                    raise RuntimeError(f"rank {rank} of {world_size} exited ({procs[rank].exitcode}) without a result")
        if len(done) == world_size:
            return
        if time.monotonic() > deadline:
            missing = sorted(set(range(world_size)) - done)
            raise TimeoutError(f"ranks {missing} did not finish in {timeout}s; their stacks:\n{_stacks(procs, out)}")
        time.sleep(POLL_S)


def _stacks(procs: list, out: Path) -> str:
    """Ask every live rank for its Python stacks (faulthandler on SIGUSR1) and return them."""
    live = [rank for rank, p in enumerate(procs) if p.is_alive()]
    for rank in live:
        os.kill(procs[rank].pid, signal.SIGUSR1)
    time.sleep(STACKS_GRACE_S)
    return "\n".join(f"--- rank {rank}:\n{(out / f'{rank}.stacks').read_text()}" for rank in live)


def _worker(rank: int, world_size: int, port: int, out: str, fn: Callable[..., Any], args: tuple) -> None:
    stacks = open(Path(out) / f"{rank}.stacks", "w")  # noqa: SIM115 (open for the process's life)
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
    )
    try:
        _write_atomically(Path(out) / f"{rank}.pt", lambda f: torch.save(fn(rank, world_size, *args), f))
    except BaseException:
        _write_atomically(Path(out) / f"{rank}.err", lambda f: f.write(traceback.format_exc().encode()))
    finally:
        dist.destroy_process_group()


def _write_atomically(path: Path, write: Callable[[Any], Any]) -> None:
    """Write to a temporary name, then rename, so that the parent never reads half a file."""
    partial = path.with_suffix(".partial")
    with open(partial, "wb") as f:
        write(f)
    partial.rename(path)
