"""A thin communication layer: a torch.distributed process group (gloo on CPU, NCCL on GPU), or one rank alone.

Every operation counts its traffic into the caller's MetricsRecorder ("bytes_sent", "bytes_recv": the logical
per-peer volume, i.e. what a direct exchange moves, padding included; NCCL's internal ring traffic differs) and
every wait is timed in the COMM_WAIT category. Ranks are group-local (0..world_size-1), so any sub-group works.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from apbv.metrics import COMM_WAIT, MetricsRecorder, NullRecorder

_NULL = NullRecorder()
# torch >= 2.13 renames all_gather_into_tensor (deprecated there) to all_gather_single
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
LOOPBACK_INTERFACE = "lo"  # Linux's loopback interface


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_device() -> torch.device:
    """The device of this rank of a launched group: its LOCAL_RANK's GPU (made current), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    return device


def backend_for(device: torch.device) -> str:
    """NCCL for GPU ranks, gloo for CPU ranks."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_group(device: torch.device, rendezvous_file: str | Path | None = None) -> None:
    """Join this process's group (RANK and WORLD_SIZE from the environment), with no timeout of its own (an idle
    engine waits for requests).

    rendezvous_file: the ranks of one host meet through this file (in a directory only the owner can read) and
    open no rendezvous port; the group's own sockets (gloo pairs, NCCL bootstrap) are kept on the loopback
    interface. None: torchrun's env:// rendezvous at MASTER_ADDR:MASTER_PORT, which the operator configures (it
    listens on every interface: several nodes must reach it)."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    timeout = timedelta(days=7)
    if rendezvous_file is None:
        meeting = {"store": _torchrun_store(rank, world_size, timeout)}
    else:
        meeting = {"init_method": f"file://{Path(rendezvous_file).resolve()}"}
        os.environ.update(GLOO_SOCKET_IFNAME=LOOPBACK_INTERFACE, NCCL_SOCKET_IFNAME=LOOPBACK_INTERFACE)
    dist.init_process_group(backend_for(device), rank=rank, world_size=world_size, timeout=timeout, **meeting)


def _torchrun_store(rank: int, world_size: int, timeout: timedelta) -> dist.Store:
    """The TCPStore at MASTER_ADDR:MASTER_PORT (under torchrun: its agent's), with this restart's keys kept apart.

    torchrun's static rendezvous keeps one store across restarts and env:// adds no per-attempt prefix, so a
    restarted group would read the previous one's gloo addresses and NCCL ids: connections refused or an init
    that never ends (pytorch/pytorch#135712). TORCHELASTIC_RESTART_COUNT names the attempt."""
    agent_hosts_it = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=rank == 0 and not agent_hosts_it, timeout=timeout, multi_tenant=True)  # fmt: skip
    return dist.PrefixStore(f"apbv/restart_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


class Handle:
    """An operation in flight; `wait()` blocks (timed as COMM_WAIT) and returns its result."""

    def __init__(self, wait: Callable[[], object], metrics: MetricsRecorder) -> None:
        self._wait = wait
        self._metrics = metrics
        self._result: object = None
        self._done = False

    def wait(self) -> Any:
        if not self._done:
            with self._metrics.timed(COMM_WAIT):
                self._result = self._wait()
            self._done = True
        return self._result


class Comm:
    """Collectives over one process group (default: the world group)."""

    replays_cuda_graphs = True  # decode may replay CUDA graphs between this group's collectives

    def __init__(self, group: dist.ProcessGroup | None = None, device: torch.device | str | None = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        if self.rank < 0:
            raise ValueError("this process is not a member of the given process group")
        self.world_size = dist.get_world_size(group)
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
        self.device = torch.device(device)

    @staticmethod
    def single(device: torch.device | str = "cpu") -> "Comm":
        """A Comm for one rank alone (W = 1); needs no process group."""
        return SingleRankComm(device)

    # ---- public operations -------------------------------------------------------------------------------

    def all_gather_async(
        self, tensor: Tensor, sizes: Sequence[int] | None = None, dim: int = 0, metrics: MetricsRecorder = _NULL
    ) -> Handle:
        """Gather `tensor` from every rank; its size along `dim` may differ per rank (`sizes`, known everywhere).

        Pads to the largest size, gathers, trims; `.wait()` returns the list of tensors in rank order.
        """
        sizes = [tensor.shape[dim]] * self.world_size if sizes is None else list(sizes)
        if len(sizes) != self.world_size or sizes[self.rank] != tensor.shape[dim]:
            raise ValueError(f"sizes {sizes} do not match rank {self.rank}'s tensor of size {tensor.shape[dim]}")
        width = max(sizes)
        padded = _pad(tensor.contiguous(), dim, width)
        nbytes = padded.numel() * padded.element_size()
        metrics.add("bytes_sent", nbytes * (self.world_size - 1))
        metrics.add("bytes_recv", nbytes * (self.world_size - 1))
        finish = self._all_gather(padded)

        def wait() -> list[Tensor]:
            return [t.narrow(dim, 0, n) for t, n in zip(finish(), sizes)]

        return Handle(wait, metrics)

    def all_gather(
        self, tensor: Tensor, sizes: Sequence[int] | None = None, dim: int = 0, metrics: MetricsRecorder = _NULL
    ) -> list[Tensor]:
        return self.all_gather_async(tensor, sizes, dim, metrics).wait()

    def isend(self, tensor: Tensor, dst: int, metrics: MetricsRecorder = _NULL) -> Handle:
        """Start sending `tensor` to rank `dst`; keep it unmodified until `.wait()`."""
        metrics.add("bytes_sent", tensor.numel() * tensor.element_size())
        return Handle(self._isend(tensor.contiguous(), dst), metrics)

    def irecv(self, buffer: Tensor, src: int, metrics: MetricsRecorder = _NULL) -> Handle:
        """Start receiving into `buffer` from rank `src`; `.wait()` returns the filled buffer."""
        metrics.add("bytes_recv", buffer.numel() * buffer.element_size())
        finish = self._irecv(buffer, src)

        def wait() -> Tensor:
            finish()
            return buffer

        return Handle(wait, metrics)

    def sendrecv_async(
        self, tensor: Tensor, dst: int, buffer: Tensor, src: int, metrics: MetricsRecorder = _NULL
    ) -> Handle:
        """Send `tensor` to `dst` and receive into `buffer` from `src` as one batched operation (a ring step;
        batching avoids the NCCL pairwise-init deadlock of separate isend/irecv); `.wait()` returns `buffer`."""
        metrics.add("bytes_sent", tensor.numel() * tensor.element_size())
        metrics.add("bytes_recv", buffer.numel() * buffer.element_size())
        finish = self._sendrecv(tensor.contiguous(), dst, buffer, src)

        def wait() -> Tensor:
            finish()
            return buffer

        return Handle(wait, metrics)

    def all_reduce_max(self, tensor: Tensor, metrics: MetricsRecorder = _NULL) -> Tensor:
        """Element-wise maximum over ranks, in place (used to share a sampled token and a stop flag per step)."""
        nbytes = tensor.numel() * tensor.element_size()
        metrics.add("bytes_sent", nbytes * (self.world_size - 1))
        metrics.add("bytes_recv", nbytes * (self.world_size - 1))
        with metrics.timed(COMM_WAIT):
            self._all_reduce_max(tensor)
        return tensor

    def broadcast(self, tensor: Tensor, src: int = 0, metrics: MetricsRecorder = _NULL) -> Tensor:
        """Rank `src`'s `tensor` on every rank, in place (every rank passes a tensor of the same shape)."""
        nbytes = tensor.numel() * tensor.element_size()
        sender = self.rank == src
        metrics.add("bytes_sent" if sender else "bytes_recv", nbytes * (self.world_size - 1) if sender else nbytes)
        with metrics.timed(COMM_WAIT):
            self._broadcast(tensor, src)
        return tensor

    # ---- primitives (overridden by other transports) ------------------------------------------------------

    def _all_gather(self, tensor: Tensor) -> Callable[[], list[Tensor]]:
        """Start an equal-size all-gather; the returned callable waits and returns the list (views of one buffer:
        a gather into a list would copy each rank's part out of it, a kernel per rank on NCCL)."""
        out = tensor.new_empty(self.world_size * tensor.shape[0], *tensor.shape[1:])  # concatenated: gloo and NCCL
        work = _all_gather_single(out, tensor, group=self.group, async_op=True)

        def finish() -> list[Tensor]:
            work.wait()
            return list(out.view(self.world_size, *tensor.shape).unbind(0))

        return finish

    def _all_reduce_max(self, tensor: Tensor) -> None:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group)

    def _broadcast(self, tensor: Tensor, src: int) -> None:
        dist.broadcast(tensor, group=self.group, group_src=src)

    def _isend(self, tensor: Tensor, dst: int) -> Callable[[], object]:
        return dist.isend(tensor, group=self.group, group_dst=dst).wait

    def _irecv(self, buffer: Tensor, src: int) -> Callable[[], object]:
        return dist.irecv(buffer, group=self.group, group_src=src).wait

    def _sendrecv(self, tensor: Tensor, dst: int, buffer: Tensor, src: int) -> Callable[[], object]:
        works = dist.batch_isend_irecv([
            dist.P2POp(dist.isend, tensor, group=self.group, group_peer=dst),
            dist.P2POp(dist.irecv, buffer, group=self.group, group_peer=src),
        ])
        return lambda: [w.wait() for w in works]


class SingleRankComm(Comm):
    """W = 1: every collective is an identity; point-to-point has no peer."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.group = None
        self.rank = 0
        self.world_size = 1
        self.device = torch.device(device)

    def _all_gather(self, tensor: Tensor) -> Callable[[], list[Tensor]]:
        return lambda: [tensor]

    def _all_reduce_max(self, tensor: Tensor) -> None:
        pass

    def _broadcast(self, tensor: Tensor, src: int) -> None:
        pass

    def _isend(self, tensor: Tensor, dst: int) -> Callable[[], object]:
        raise RuntimeError("a single-rank Comm has no peer to send to")

    def _irecv(self, buffer: Tensor, src: int) -> Callable[[], object]:
        raise RuntimeError("a single-rank Comm has no peer to receive from")

    def _sendrecv(self, tensor: Tensor, dst: int, buffer: Tensor, src: int) -> Callable[[], object]:
        raise RuntimeError("a single-rank Comm has no peer to exchange with")


def _pad(tensor: Tensor, dim: int, width: int) -> Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=dim)
