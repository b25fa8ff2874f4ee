"""W ranks as threads of one process on one device, for projecting multi-GPU timings from a single device.

Collectives and point-to-point transfers are rendezvous points (payloads are shared by reference, never copied,
so senders must not modify them: the same contract as isend). A device lock lets one rank compute at a time: a
rank holds it while it runs and hands it over while it waits on communication. The time each rank holds the
lock (device synchronised before release) is its compute time; communication costs nothing here, which is why
such timings are "projected (sequential ranks, no communication)".
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from apbv.comm import Comm

PROJECTED = "projected (sequential ranks, no communication)"


@dataclass
class _Failure:
    exc: BaseException


class ThreadWorld:
    """Shared state of W thread-ranks on one device."""

    def __init__(self, world_size: int, device: torch.device | str = "cpu") -> None:
        self.world_size = world_size
        self.device = torch.device(device)
        self.cond = threading.Condition()
        self.boxes: dict[tuple, dict[int, Tensor]] = {}  # posted payloads of the current `run`
        self.failed = False
        self.busy = [0.0] * world_size  # seconds each rank held the device in the last `run`
        self.timing = PROJECTED if world_size > 1 else "measured"
        self._device_lock = threading.Lock()
        self._since = [0.0] * world_size
        self._threads: list[threading.Thread] = []

    def run(self, fn: Callable[[int, "ThreadComm"], Any]) -> list[Any]:
        """Run fn(rank, comm) on every rank; returns results in rank order, re-raises failures.

        Each rank is one long-lived thread, reused by every `run`: thread-local state such as PyTorch's cuDNN
        attention plan cache then persists across runs, as it does in a real rank process.
        """
        self.busy = [0.0] * self.world_size
        self.boxes, self.failed = {}, False
        if not self._threads:
            self._inbox = [queue.Queue() for _ in range(self.world_size)]
            self._outbox: queue.Queue = queue.Queue()
            self._threads = [threading.Thread(target=self._serve, args=(r,), daemon=True) for r in range(self.world_size)]
            for t in self._threads:
                t.start()
        for inbox in self._inbox:
            inbox.put(fn)
        outcomes = dict(self._outbox.get() for _ in range(self.world_size))
        self.boxes = {}
        errors = [v for v in outcomes.values() if isinstance(v, _Failure)]
        if errors:
            raise errors[0].exc
        return [outcomes[r] for r in range(self.world_size)]

    def close(self) -> None:
        """Stop the rank threads (a later `run` starts new ones)."""
        for inbox in self._inbox if self._threads else []:
            inbox.put(None)
        for t in self._threads:
            t.join()
        self._threads = []

    def __enter__(self) -> "ThreadWorld":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _serve(self, rank: int) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        while True:
            fn = self._inbox[rank].get()
            if fn is None:
                return
            self.acquire(rank)
            try:
                outcome = fn(rank, ThreadComm(self, rank))
            except BaseException as exc:  # noqa: BLE001 - reported to the caller of run()
                outcome = _Failure(exc)
                with self.cond:
                    self.failed = True
                    self.cond.notify_all()
            finally:
                self.release(rank)
            self._outbox.put((rank, outcome))
            del fn, outcome  # a finished run's inputs and results belong to the caller only

    def acquire(self, rank: int) -> None:
        self._device_lock.acquire()
        self._since[rank] = time.perf_counter()

    def release(self, rank: int) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.busy[rank] += time.perf_counter() - self._since[rank]
        self._device_lock.release()


class ThreadComm(Comm):
    """One thread-rank's view of a ThreadWorld (same interface as the process-group Comm)."""

    # thread ranks decoding with CUDA graphs between their collectives hung on an H200 (2026-12-03, cause not
    # found): they decode eagerly
    replays_cuda_graphs = False

    def __init__(self, world: ThreadWorld, rank: int) -> None:
        self.group = None
        self.world = world
        self.rank = rank
        self.world_size = world.world_size
        self.device = world.device
        self._counters: dict[tuple, int] = {}

    def _key(self, *kind: Any) -> tuple:
        n = self._counters.get(kind, 0)
        self._counters[kind] = n + 1
        return (*kind, n)

    def _post(self, key: tuple, tensor: Tensor) -> None:
        with self.world.cond:
            self.world.boxes.setdefault(key, {})[self.rank] = tensor
            self.world.cond.notify_all()

    def _take(self, key: tuple, count: int, consume: bool) -> dict[int, Tensor]:
        """Wait (without the device) until `count` payloads are posted under `key`."""
        world = self.world

        def ready() -> bool:
            return world.failed or len(world.boxes.get(key, ())) >= count

        with world.cond:
            posted = ready()
        if not posted:
            world.release(self.rank)
            with world.cond:
                world.cond.wait_for(ready)
            world.acquire(self.rank)
        with world.cond:
            if world.failed:
                raise RuntimeError("another rank failed")
            box = world.boxes[key]
            if consume:
                del world.boxes[key]
            return box

    def _all_gather(self, tensor: Tensor) -> Callable[[], list[Tensor]]:
        key = self._key("gather")
        self._post(key, tensor)

        def finish() -> list[Tensor]:
            box = self._take(key, self.world_size, consume=False)
            return [box[r] for r in range(self.world_size)]

        return finish

    def _all_reduce_max(self, tensor: Tensor) -> None:
        key = self._key("max")
        self._post(key, tensor.clone())
        box = self._take(key, self.world_size, consume=False)
        tensor.copy_(torch.stack([box[r] for r in range(self.world_size)]).amax(dim=0))

    def _broadcast(self, tensor: Tensor, src: int) -> None:
        key = self._key("broadcast")
        if self.rank == src:
            self._post(key, tensor)
        box = self._take(key, 1, consume=False)
        if self.rank != src:
            tensor.copy_(box[src])

    def _isend(self, tensor: Tensor, dst: int) -> Callable[[], object]:
        self._post(self._key("p2p", self.rank, dst), tensor)
        return lambda: None

    def _irecv(self, buffer: Tensor, src: int) -> Callable[[], object]:
        key = self._key("p2p", src, self.rank)
        return lambda: buffer.copy_(self._take(key, 1, consume=True)[src])

    def _sendrecv(self, tensor: Tensor, dst: int, buffer: Tensor, src: int) -> Callable[[], object]:
        self._isend(tensor, dst)
        return self._irecv(buffer, src)
