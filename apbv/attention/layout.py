"""How a global sequence [context (N) | query (Lq)] is cut into each strategy's rank-local sequences.

Every rank-local sequence is a concatenation of global ranges; `RankLayout.local_to_global` maps back. The
"anchored" layouts (APB-V, APB, Star) are [anchor | the rank's host blocks | query], with the anchor and the
query replicated on every rank; the ring layout is two zigzag chunks of the whole sequence; dense is everything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from apbv.errors import LayoutError

from .base import RankLayout, SequencePlan

Range = tuple[int, int]  # [start, end) in global positions


@dataclass(frozen=True, eq=False)
class AnchoredPlan(SequencePlan):
    """Anchor + host blocks + passing (APB-V, APB, Star).

    hosts[h]        global range of host block h; the hosts partition [anchor_len, n_context) in order
    slots[r]        host indices rank r owns, in local order (increasing)
    anchor_slices[r] the part of the anchor rank r caches and uses for exact query attention (ceil(A/W) each)
    """

    anchor_len: int
    hosts: tuple[Range, ...]
    slots: tuple[tuple[int, ...], ...]
    anchor_slices: tuple[Range, ...]

    def host_len(self, h: int) -> int:
        start, end = self.hosts[h]
        return end - start

    def selection_counts(self, budget: int) -> tuple[int, ...]:
        """k_h = min(budget, B_h) entries per KV head that host h passes on; 0 for the last host (nobody needs it)."""
        return tuple(0 if h == len(self.hosts) - 1 else min(budget, self.host_len(h)) for h in range(len(self.hosts)))

    def host_offsets(self, rank: int) -> list[tuple[int, int, int]]:
        """(host, local start, local end) of each of `rank`'s host blocks."""
        found, offset = [], self.anchor_len
        for h in self.slots[rank]:
            found.append((h, offset, offset + self.host_len(h)))
            offset += self.host_len(h)
        return found


@dataclass(frozen=True, eq=False)
class RingPlan(SequencePlan):
    """Zigzag ring: the whole sequence in 2W chunks; rank r holds chunks r and 2W-1-r (`slots[r]`)."""

    chunks: tuple[Range, ...]
    slots: tuple[tuple[int, ...], ...]


def check_request(n_context: int, n_query: int, world_size: int) -> None:
    if world_size < 1:
        raise LayoutError(f"world size must be at least 1, got {world_size}")
    if n_context < 0:
        raise LayoutError(f"context length must be non-negative, got {n_context}")
    if n_query < 1:
        raise LayoutError("a query (question) of at least 1 token is required")


def balanced_split(total: int, parts: int) -> list[range]:
    """`parts` consecutive ranges covering [0, total): floor(total/parts) + [i < total mod parts] each."""
    base, extra = divmod(total, parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + base + (i < extra))
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def fixed_blocks(start: int, end: int, length: int, count: int) -> tuple[Range, ...]:
    """`count` blocks of nominal `length` from `start`, clipped to `end` (the last ones may be short or empty)."""
    return tuple((min(end, start + i * length), min(end, start + (i + 1) * length)) for i in range(count))


def ceil_blocks(start: int, end: int, count: int) -> tuple[Range, ...]:
    """[start, end) in `count` blocks of ceil(len/count) tokens (spec §1.2: only the last blocks can be shorter)."""
    return fixed_blocks(start, end, math.ceil((end - start) / count) if count else 0, count)


def split_temporal_patches(n_patches: int, world_size: int, frames_per_patch: int) -> list[range]:
    """Temporal patches each rank's vision encoder handles (§2): consecutive, remainders to the lowest ranks."""
    if n_patches < world_size:
        raise LayoutError(
            f"frame-parallel vision over {world_size} ranks needs at least {world_size} temporal patches "
            f"({frames_per_patch * world_size} frames); the video has {n_patches}"
        )
    return balanced_split(n_patches, world_size)


def anchored_plan(
    strategy: str, n_context: int, n_query: int, world_size: int, anchor_len: int,
    hosts: tuple[Range, ...], slots: tuple[tuple[int, ...], ...], tail_rank: int,
) -> AnchoredPlan:
    """Local sequences [anchor | owned host blocks | query]; caches: anchor slice, own hosts, query on the tail."""
    check_request(n_context, n_query, world_size)
    step = math.ceil(anchor_len / world_size)
    anchor_slices = fixed_blocks(0, anchor_len, step, world_size)
    query = (n_context, n_context + n_query)
    ranks = []
    for r in range(world_size):
        own = [hosts[h] for h in slots[r]]
        cached = [anchor_slices[r], *own] + ([query] if r == tail_rank else [])
        ranks.append(_rank_layout(r, [(0, anchor_len), *own, query], cached))
    return AnchoredPlan(
        strategy, n_context, n_query, world_size, tuple(ranks), tail_rank, anchor_len, hosts, slots, anchor_slices
    )


def zigzag_slots(world_size: int) -> tuple[tuple[int, int], ...]:
    """Rank r owns virtual hosts (chunks) r and 2W-1-r."""
    return tuple((r, 2 * world_size - 1 - r) for r in range(world_size))


def ring_plan(n_context: int, n_query: int, world_size: int) -> RingPlan:
    """[context | query] in 2W balanced chunks (sizes differ by at most 1), zigzag-assigned."""
    check_request(n_context, n_query, world_size)
    total = n_context + n_query
    if total < world_size:
        raise LayoutError(f"ring attention needs at least one token per rank: {total} tokens for {world_size} ranks")
    chunks = tuple((c.start, c.stop) for c in balanced_split(total, 2 * world_size))
    slots = zigzag_slots(world_size)
    ranks = tuple(_rank_layout(r, [chunks[c] for c in slots[r]], [chunks[c] for c in slots[r]]) for r in range(world_size))
    last_chunk = max(c for c, (a, b) in enumerate(chunks) if b > a)
    tail = next(r for r in range(world_size) if last_chunk in slots[r])
    return RingPlan("ring", n_context, n_query, world_size, ranks, tail, chunks, slots)


def whole_plan(strategy: str, n_context: int, n_query: int, world_size: int) -> SequencePlan:
    """One rank holds everything (dense)."""
    check_request(n_context, n_query, world_size)
    if world_size != 1:
        raise LayoutError(f"{strategy} attention runs on one rank, not {world_size}")
    everything = [(0, n_context + n_query)]
    return SequencePlan(strategy, n_context, n_query, 1, (_rank_layout(0, everything, everything),), 0)


def _rank_layout(rank: int, local: list[Range], cached: list[Range]) -> RankLayout:
    """Local sequence = concatenation of `local` ranges; cache rows = local rows whose global position is cached."""
    local_to_global = torch.cat([torch.arange(a, b, dtype=torch.long) for a, b in local])
    is_cached = torch.zeros(max([b for _, b in local] + [0]), dtype=torch.bool)
    for a, b in cached:
        is_cached[a:b] = True
    cache_rows = torch.nonzero(is_cached[local_to_global]).flatten()
    return RankLayout(rank, local_to_global, cache_rows)
