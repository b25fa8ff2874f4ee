"""APB baseline: one host per rank (no zigzag), anchor, passing blocks, no communication overlap (spec §7).

APB's trained retaining heads (Locret-style MLPs) are unreleased, so this baseline scores keys with the same
training-free query-aware rule as APB-V. As in the reference harnesses its budget is twice APB-V's. The layout is
the reference's `no_nf_nz` one: anchor [0, A) on every rank, W hosts over [A, N); the query is fused and exact as
in APB-V (APB proper puts the query in the anchor and runs it in a second pass). The last rank is the tail.
"""

from __future__ import annotations

from .anchored import AnchoredStrategy
from .layout import Range, ceil_blocks


class APBStrategy(AnchoredStrategy):
    name = "apb"

    @property
    def overlap(self) -> bool:
        return False

    def layout(self, n_context: int, world_size: int) -> tuple[int, tuple[Range, ...], tuple[tuple[int, ...], ...], int]:
        anchor = self.config.anchor_len(n_context)
        slots = tuple((r,) for r in range(world_size))
        return anchor, ceil_blocks(anchor, n_context, world_size), slots, world_size - 1

    def budget(self, n_context: int, layer_idx: int) -> int:
        return 2 * self.config.passing_budget(n_context, layer_idx)
