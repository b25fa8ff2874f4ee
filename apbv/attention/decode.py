"""Exact attention of replicated query rows over K/V sharded across ranks (query rows of the fused prefill, and
every decode step over the sharded KV cache): attend locally, all-gather (out, lse) as one tensor, merge."""

from __future__ import annotations

import torch
from torch import Tensor

from apbv.comm import Comm, Handle
from apbv.metrics import MetricsRecorder

from .base import attend_counted
from .kernels import merge_stacked


class PendingAttention:
    """A distributed attention whose partials are in flight; `wait()` returns the merged output."""

    def __init__(self, out: Tensor, lse_dtype: torch.dtype, gather: Handle | None) -> None:
        self._out = out
        self._lse_dtype = lse_dtype
        self._gather = gather

    def wait(self) -> Tensor:
        if self._gather is None:
            return self._out
        d = self._out.shape[-1]
        packed = torch.stack(self._gather.wait())  # (W, Hq, Sq, D + 1 or 2): the lse columns unpack once for all
        merged, _ = merge_stacked(packed[..., :d], packed[..., d:].contiguous().view(self._lse_dtype)[..., 0])
        return merged.to(self._out.dtype)


def start_distributed_attention(
    q: Tensor, k_local: Tensor, v_local: Tensor, comm: Comm, metrics: MetricsRecorder, causal: bool = False
) -> PendingAttention:
    """Attend q (replicated on all ranks) over this rank's keys and launch the gather of the partial.

    `causal` (bottom-right) is for the rank whose keys end with the query's own keys (the query segment);
    every other rank passes False. The merged result is bitwise identical on all ranks. The partial travels as one
    tensor, one collective per call: out, then lse's bytes as extra columns of out's dtype (two for a float32 lse
    beside bf16/fp16 out, one beside float32/float64), nothing rounded.
    """
    out, lse = attend_counted(q, k_local, v_local, causal, metrics)
    if comm.world_size == 1:
        return PendingAttention(out, lse.dtype, None)
    packed = torch.cat([out, lse.unsqueeze(-1).view(out.dtype)], dim=-1)  # (Hq, Sq, D + 1 or 2)
    return PendingAttention(out, lse.dtype, comm.all_gather_async(packed, metrics=metrics))


def distributed_attention(
    q: Tensor, k_local: Tensor, v_local: Tensor, comm: Comm, metrics: MetricsRecorder, causal: bool = False
) -> Tensor:
    """Attention of q over the union of all ranks' (k_local, v_local), in q.dtype; identical on all ranks."""
    return start_distributed_attention(q, k_local, v_local, comm, metrics, causal).wait()
