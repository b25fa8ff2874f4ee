"""Exact attention of replicated query rows over K/V sharded across ranks (query rows of the fused prefill, and
every decode step over the sharded KV cache): attend locally, all-gather (out, lse), fold in rank order."""

from __future__ import annotations

from torch import Tensor

from apbv.comm import Comm, Handle
from apbv.metrics import MetricsRecorder

from .base import attend_counted
from .kernels import merge_partials


class PendingAttention:
    """A distributed attention whose partials are in flight; `wait()` returns the merged output."""

    def __init__(self, out: Tensor, handles: tuple[Handle, Handle] | None) -> None:
        self._out = out
        self._handles = handles

    def wait(self) -> Tensor:
        if self._handles is None:
            return self._out
        outs, lses = (h.wait() for h in self._handles)
        merged, _ = merge_partials(list(zip(outs, lses)))
        return merged.to(self._out.dtype)


def start_distributed_attention(
    q: Tensor, k_local: Tensor, v_local: Tensor, comm: Comm, metrics: MetricsRecorder, causal: bool = False
) -> PendingAttention:
    """Attend q (replicated on all ranks) over this rank's keys and launch the gathers of the partial.

    `causal` (bottom-right) is for the rank whose keys end with the query's own keys (the query segment);
    every other rank passes False. The merged result is bitwise identical on all ranks.
    """
    out, lse = attend_counted(q, k_local, v_local, causal, metrics)
    if comm.world_size == 1:
        return PendingAttention(out, None)
    return PendingAttention(out, (comm.all_gather_async(out, metrics=metrics), comm.all_gather_async(lse, metrics=metrics)))


def distributed_attention(
    q: Tensor, k_local: Tensor, v_local: Tensor, comm: Comm, metrics: MetricsRecorder, causal: bool = False
) -> Tensor:
    """Attention of q over the union of all ranks' (k_local, v_local), in q.dtype; identical on all ranks."""
    return start_distributed_attention(q, k_local, v_local, comm, metrics, causal).wait()
