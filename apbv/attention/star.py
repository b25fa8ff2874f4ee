"""Star Attention baseline (spec §7): the context in W blocks of ceil(N/W); the first block is the anchor.

Rank 0 holds the first block (as the anchor), rank r > 0 holds the anchor plus block r; rows see the anchor and
their own block causally, nothing is passed (config ratios other than these are ignored). Star's second phase
(the query attending all blocks with a merged softmax) is fused into the same pass: the query rows are computed
by distributed partial attention over every rank's share of the context plus the query keys on the tail rank,
which is the same exact attention Star's phase 2 computes. The anchor is cached in ceil(A/W) slices per rank.
"""

from __future__ import annotations

import math

from .anchored import AnchoredStrategy
from .layout import Range, fixed_blocks


class StarStrategy(AnchoredStrategy):
    name = "star"

    def layout(self, n_context: int, world_size: int) -> tuple[int, tuple[Range, ...], tuple[tuple[int, ...], ...], int]:
        block = math.ceil(n_context / world_size)
        slots = ((),) + tuple((r - 1,) for r in range(1, world_size))
        return block, fixed_blocks(block, n_context, block, world_size - 1), slots, world_size - 1

    def budget(self, n_context: int, layer_idx: int) -> int:
        return 0
