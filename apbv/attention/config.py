"""Parameters of the sequence-parallel attention strategies."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .registry import check_strategy_name


@dataclass(frozen=True)
class AttentionConfig:
    """Parameters of the sequence-parallel attention strategies (defaults: the APB-V paper's).

    anchor_ratio:  anchor length A = align * ceil(floor(N * anchor_ratio) / align)   (paper: 1/64)
    passing_ratio: passing budget P = align * ceil(floor(N * passing_ratio) / align) (paper: 1/128 for APB-V;
                   the APB baseline uses twice the APB-V budget, as in the reference harnesses)
    align:         granularity of A and P (128 in the paper, forced by its custom kernel; our kernels need no
                   alignment, tests use small values so that tiny sequences get non-trivial anchors/budgets)
    pool_kernel:   width of the max-pool that smooths key scores, applied inside each host block
    overlap:       issue collectives asynchronously and wait as late as possible (False: wait at once)
    layer_budget_scale: optional per-layer multipliers of P (len == number of layers); None = P everywhere
    """

    strategy: str = "apbv"
    anchor_ratio: float = 1 / 64
    passing_ratio: float = 1 / 128
    align: int = 128
    pool_kernel: int = 5
    overlap: bool = True
    layer_budget_scale: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        check_strategy_name(self.strategy)
        if not (0 <= self.anchor_ratio <= 1 and 0 <= self.passing_ratio <= 1):
            raise ValueError("anchor_ratio and passing_ratio must lie in [0, 1]")
        if self.align < 1 or self.pool_kernel < 1 or self.pool_kernel % 2 == 0:
            raise ValueError("align must be >= 1 and pool_kernel a positive odd number")

    def anchor_len(self, n_context: int) -> int:
        """Anchor length A for a context of n_context tokens (never more than the context)."""
        return min(n_context, self._aligned(n_context * self.anchor_ratio))

    def passing_budget(self, n_context: int, layer_idx: int = 0) -> int:
        """Passing budget P (tokens per host per KV head) for one layer."""
        budget = self._aligned(n_context * self.passing_ratio)
        if self.layer_budget_scale is not None:
            budget = self._aligned(budget * self.layer_budget_scale[layer_idx])
        return budget

    def _aligned(self, x: float) -> int:
        return self.align * math.ceil(math.floor(x) / self.align)
