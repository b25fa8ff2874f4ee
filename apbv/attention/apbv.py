"""APB-V (Spava): zigzag virtual hosts, query-aware passing, exact fused query rows (spec §1.2-§4.1, fixes of §9).

2W virtual hosts over [A, N), rank r owns hosts r and 2W-1-r (so per-rank passing work is balanced, §3.9);
rank 0 owns the last host and is the tail rank. Passing budget P = config.passing_budget(N, layer).
"""

from __future__ import annotations

from .anchored import AnchoredStrategy
from .layout import Range, ceil_blocks, zigzag_slots


class APBVStrategy(AnchoredStrategy):
    name = "apbv"

    def layout(self, n_context: int, world_size: int) -> tuple[int, tuple[Range, ...], tuple[tuple[int, ...], ...], int]:
        anchor = self.config.anchor_len(n_context)
        return anchor, ceil_blocks(anchor, n_context, 2 * world_size), zigzag_slots(world_size), 0

    def budget(self, n_context: int, layer_idx: int) -> int:
        return self.config.passing_budget(n_context, layer_idx)
