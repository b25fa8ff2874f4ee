"""W ranks as real processes (one per GPU, NCCL; or gloo on CPUs), for measured multi-GPU timings.

Launch the benchmark with torchrun (`python -m torch.distributed.run --nproc-per-node W -m apbv.bench.speed ...`):
every process runs the same benchmark loop in lock step; `ProcessWorld.run` times each rank from a common barrier
to its own end (device synchronised), so the slowest rank's time is the barrier-to-barrier latency of the
request, communication and its overlap included. Ranks beyond the world of a strategy (dense runs on rank 0
alone) wait at the barriers. Results and times are all-gathered, so every process returns the same rows.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from apbv.comm import Comm, backend_for, rank_device
from apbv.thread_comm import ThreadWorld


def launched_by_torchrun() -> bool:
    """True in a process that torchrun started as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(timeout_s: float = 900.0) -> torch.device:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPUs) and return this rank's device.

    The timeout turns a rank that fails alone (e.g. out of memory) into an error on the others, not a hang.
    """
    device = rank_device()
    if not dist.is_initialized():
        gpu = device if device.type == "cuda" else None  # NCCL binds the communicator to the rank's GPU at once
        dist.init_process_group(backend_for(device), timeout=timedelta(seconds=timeout_s), device_id=gpu)
    return device


@contextmanager
def bench_device(requested: str) -> Iterator[torch.device]:
    """This process's device: under torchrun its rank's, with the process group joined for the duration (and left
    cleanly at the end); otherwise `requested`."""
    if not launched_by_torchrun():
        yield torch.device(requested)
        return
    device = init_distributed()
    try:
        yield device
    finally:
        dist.destroy_process_group()


def reporting_rank() -> bool:
    """True in the process that prints and writes results: rank 0 under torchrun, else the only one."""
    return not dist.is_initialized() or dist.get_rank() == 0


def bench_world(world_size: int, device: torch.device) -> "ProcessWorld | ThreadWorld":
    """Real processes when launched by torchrun (measured), else thread-ranks on one device (projected)."""
    return ProcessWorld(world_size, device) if dist.is_initialized() else ThreadWorld(world_size, device)


class ProcessWorld:
    """The first `world_size` ranks of the torchrun group, timed as one request; same interface as ThreadWorld."""

    def __init__(self, world_size: int, device: torch.device) -> None:
        total = dist.get_world_size()
        if not 1 <= world_size <= total:
            raise ValueError(f"world size {world_size} needs at least that many processes; torchrun started {total}")
        self.world_size = world_size
        self.device = device
        self.rank = dist.get_rank()
        # new_group is collective: every process creates the sub-group, members or not.
        group = None
        if 1 < world_size < total:
            group = dist.new_group(list(range(world_size)))
        if self.rank >= world_size:
            self.comm = None
        elif world_size == 1:
            self.comm = Comm.single(device)
        else:
            self.comm = Comm(group, device)
        self.busy = [0.0] * world_size  # seconds from the common barrier to each rank's end, last `run`
        self.timing = f"measured ({world_size} processes, {dist.get_backend()})" if world_size > 1 else "measured"

    def run(self, fn: Callable[[int, Comm], Any]) -> list[Any]:
        """Run fn(rank, comm) on every member rank; returns all members' results in rank order, on every process.

        A rank that fails reports its error to the others after the run, and every process raises it.
        """
        outcome: tuple[str, Any] = ("idle", None)
        dist.barrier()
        self._sync()
        start = time.perf_counter()
        if self.comm is not None:
            try:
                outcome = ("ok", fn(self.rank, self.comm))
            except Exception as exc:  # noqa: BLE001 - re-raised on every process below
                outcome = ("error", exc)
        self._sync()
        elapsed = time.perf_counter() - start
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (elapsed, outcome))
        errors = [value for _, (kind, value) in gathered if kind == "error"]
        if errors:
            raise errors[0]
        self.busy = [elapsed for elapsed, _ in gathered[: self.world_size]]
        return [value for _, (_, value) in gathered[: self.world_size]]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self) -> "ProcessWorld":
        return self

    def __exit__(self, *exc) -> None:
        if self.comm is not None and self.comm.group is not None:
            dist.destroy_process_group(self.comm.group)
