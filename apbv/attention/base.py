"""The shared strategy interface: how a request is cut across ranks (a plan) and how a rank attends (prefill)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from apbv.comm import Comm
from apbv.metrics import ATTENTION, MetricsRecorder

from .config import AttentionConfig
from .kernels import attend


@dataclass(frozen=True, eq=False)
class RankLayout:
    """One rank's local sequence."""

    rank: int
    local_to_global: torch.LongTensor  # (S_local,) global position in [0, N+Lq) of each local row, in local order
    cache_rows: torch.LongTensor  # local rows whose K/V this rank keeps for decoding

    @property
    def length(self) -> int:
        return int(self.local_to_global.numel())


@dataclass(frozen=True, eq=False)
class SequencePlan:
    """How one request of n_context + n_query tokens is cut across world_size ranks (identical on all ranks)."""

    strategy: str
    n_context: int
    n_query: int
    world_size: int
    ranks: tuple[RankLayout, ...]
    tail_rank: int  # holds the last global token: appends decode-token K/V to its cache and samples

    @property
    def n_total(self) -> int:
        return self.n_context + self.n_query


class Strategy(ABC):
    """A way to compute causal prefill attention over ranks; one subclass per file, registered in `registry`."""

    name: str
    exact: bool  # True when prefill equals dense causal attention (up to rounding)

    def __init__(self, config: AttentionConfig) -> None:
        self.config = config

    @abstractmethod
    def plan(self, n_context: int, n_query: int, world_size: int) -> SequencePlan:
        """Pure: the same plan on every rank; raises LayoutError when the request cannot be split."""

    @abstractmethod
    def prefill(
        self, q: Tensor, k: Tensor, v: Tensor, plan: SequencePlan, layer_idx: int, comm: Comm, metrics: MetricsRecorder
    ) -> Tensor:
        """Attention output (Hq, S_local, D) in q.dtype for this rank's local rows (q, k, v in local order)."""

    @staticmethod
    def check_inputs(q: Tensor, k: Tensor, plan: SequencePlan, comm: Comm) -> None:
        """Fail fast (instead of hanging in a collective) when inputs, plan and group disagree."""
        if plan.world_size != comm.world_size:
            raise ValueError(f"plan for {plan.world_size} ranks used on a group of {comm.world_size}")
        expected = plan.ranks[comm.rank].length
        if q.shape[1] != expected or k.shape[1] != expected or q.shape[0] % k.shape[0]:
            raise ValueError(
                f"rank {comm.rank} expects {expected} local rows and Hq % Hkv == 0; "
                f"got q {tuple(q.shape)}, k {tuple(k.shape)}"
            )


def attend_counted(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, metrics: MetricsRecorder
) -> tuple[Tensor, Tensor]:
    """`attend`, timed as ATTENTION and counted.

    attn_pairs: (query row, visible key) pairs summed over query heads, causal triangles counted exactly;
    attn_flops: 4 * D * attn_pairs (2D for q.k and 2D for p.v per pair; softmax not counted).
    """
    pairs = q.shape[0] * visible_pairs(q.shape[1], k.shape[1], causal)
    metrics.add("attn_pairs", pairs)
    metrics.add("attn_flops", 4 * q.shape[-1] * pairs)
    with metrics.timed(ATTENTION):
        return attend(q, k, v, causal)


def visible_pairs(sq: int, sk: int, causal: bool) -> int:
    """Number of visible (row, key) pairs of one head under `attend`'s bottom-right causal rule."""
    if not causal:
        return sq * sk
    seeing = min(sq, sk)  # rows that see at least one key: a triangle plus a full prefix of sk - sq keys
    return seeing * (seeing + 1) // 2 + seeing * max(0, sk - sq)

