"""Run a function on W real processes joined by a gloo process group (CPU); reusable by every test module.

`run_ranks(world_size, fn, *args)` spawns W processes, each calling `fn(rank, world_size, *args)` after
`init_process_group("gloo")` on a free local port, and returns the W results in rank order. Results travel as
`torch.save` bytes (so tensors survive the worker's exit). A failure on any rank or a timeout kills all workers
(a rank stuck in a collective never returns on its own) and raises with the failing rank's traceback.
"""

from __future__ import annotations

import io
import queue
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from apbv.comm import free_port


def run_ranks(world_size: int, fn: Callable[..., Any], *args: Any, timeout: float = 120.0) -> list[Any]:
    """fn must be importable (module level). Returns [fn(0, W, *args), ..., fn(W-1, W, *args)]."""
    ctx = mp.get_context("spawn")
    results: Any = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(rank, world_size, port, results, fn, args), daemon=True)
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    collected: dict[int, Any] = {}
    try:
        while len(collected) < world_size:
            try:
                rank, ok, payload = results.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"ranks {sorted(set(range(world_size)) - set(collected))} did not finish in {timeout}s")
            if not ok:
                raise RuntimeError(f"rank {rank} of {world_size} failed:\n{payload}")
            collected[rank] = torch.load(io.BytesIO(payload), weights_only=False)
        for p in procs:
            p.join(timeout=30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return [collected[r] for r in range(world_size)]


def _worker(rank: int, world_size: int, port: int, results: Any, fn: Callable[..., Any], args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
    )
    try:
        buffer = io.BytesIO()
        torch.save(fn(rank, world_size, *args), buffer)
        results.put((rank, True, buffer.getvalue()))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        dist.destroy_process_group()
