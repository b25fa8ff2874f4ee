"""Layouts: coverage and cache partition, agreement with the spec formulas, edge cases and their errors."""

from __future__ import annotations

import pytest
import torch

from apbv.attention import get_strategy
from apbv.attention.config import AttentionConfig
from apbv.attention.layout import split_temporal_patches
from apbv.attention.registry import (
    BASELINE,
    STRATEGIES,
    STRATEGY_NAMES,
    ranks_for,
    strategy_label,
)
from apbv.errors import LayoutError

from .reference import spec_layout

ANCHORED = ("apbv", "apb", "star")
SIZES = [(0, 1), (5, 3), (63, 2), (64, 1), (300, 7), (1001, 4)]


def _config(strategy, align=8):
    return AttentionConfig(strategy, align=align, anchor_ratio=1 / 16, passing_ratio=1 / 32)


@pytest.mark.parametrize("strategy", ANCHORED + ("ring",))
@pytest.mark.parametrize("w", [1, 2, 3, 4])
@pytest.mark.parametrize("n,lq", SIZES)
def test_cache_partitions_the_sequence(strategy, w, n, lq):
    if strategy == "ring" and n + lq < w:  # fewer tokens than ranks: ring cannot give every rank a chunk
        with pytest.raises(LayoutError, match="rank"):
            get_strategy(_config(strategy)).plan(n, lq, w)
        return
    plan = get_strategy(_config(strategy)).plan(n, lq, w)
    assert plan.world_size == w and len(plan.ranks) == w and (plan.n_context, plan.n_query) == (n, lq)
    cached = torch.cat([r.local_to_global[r.cache_rows] for r in plan.ranks])
    assert torch.equal(cached.sort().values, torch.arange(n + lq))  # every position cached exactly once
    tail = plan.ranks[plan.tail_rank]
    assert n + lq - 1 in tail.local_to_global[tail.cache_rows].tolist()
    for r in plan.ranks:
        assert r.local_to_global.unique().numel() == r.length > 0  # no duplicates, never empty


@pytest.mark.parametrize("strategy", ANCHORED)
@pytest.mark.parametrize("w", [1, 2, 3, 4])
@pytest.mark.parametrize("n,lq", SIZES)
def test_anchored_layout_follows_the_spec(strategy, w, n, lq):
    cfg = _config(strategy)
    plan = get_strategy(cfg).plan(n, lq, w)
    anchor, hosts, counts = spec_layout(strategy, n, w, cfg.align, cfg.anchor_ratio, cfg.passing_ratio)
    assert plan.anchor_len == anchor and list(plan.hosts) == hosts
    budget = {"apbv": 1, "apb": 2, "star": 0}[strategy] * cfg.passing_budget(n)
    assert list(plan.selection_counts(budget)) == counts[:-1] + [0] * bool(counts)  # the last host's selection is never needed
    step = -(-anchor // w)
    for r, layout in enumerate(plan.ranks):
        own = [torch.arange(*hosts[h]) for h in plan.slots[r]]
        expected = torch.cat([torch.arange(anchor), *own, torch.arange(n, n + lq)])
        assert torch.equal(layout.local_to_global, expected)  # [anchor | own hosts | query]
        anchor_cached = layout.local_to_global[layout.cache_rows]
        assert torch.equal(anchor_cached[anchor_cached < anchor], torch.arange(anchor)[r * step : (r + 1) * step])
    if strategy == "apbv":
        assert plan.slots == tuple((r, 2 * w - 1 - r) for r in range(w)) and plan.tail_rank == 0


def test_short_context_has_no_anchor_with_paper_defaults():
    plan = get_strategy(AttentionConfig("apbv")).plan(63, 5, 2)
    assert plan.anchor_len == 0 and plan.selection_counts(AttentionConfig().passing_budget(63)) == (0, 0, 0, 0)
    assert get_strategy(AttentionConfig("apbv")).plan(148_528, 11, 8).ranks[3].length == 2432 + 2 * 9131 + 11  # §1.2


@pytest.mark.parametrize("w", [1, 2, 3, 4])
def test_ring_chunks_are_balanced_zigzag(w):
    plan = get_strategy(AttentionConfig("ring")).plan(97, 6, w)
    sizes = [b - a for a, b in plan.chunks]
    assert max(sizes) - min(sizes) <= 1 and plan.chunks[0][0] == 0 and plan.chunks[-1][1] == 103
    assert plan.slots == tuple((r, 2 * w - 1 - r) for r in range(w))


@pytest.mark.parametrize(
    "strategy,n,lq,w,match",
    [
        ("apbv", 100, 0, 2, "query"),
        ("ring", 10, 0, 1, "query"),
        ("apbv", -1, 3, 2, "non-negative"),
        ("star", 10, 3, 0, "at least 1"),
        ("dense", 10, 3, 2, "one rank"),
        ("ring", 1, 2, 4, "one token per rank"),
    ],
)
def test_errors(strategy, n, lq, w, match):
    with pytest.raises(LayoutError, match=match):
        get_strategy(AttentionConfig(strategy)).plan(n, lq, w)


def test_split_temporal_patches():
    assert split_temporal_patches(10, 4, 2) == [range(0, 3), range(3, 6), range(6, 8), range(8, 10)]
    assert split_temporal_patches(4, 4, 2) == [range(i, i + 1) for i in range(4)]
    with pytest.raises(LayoutError, match="at least 4 temporal patches \\(8 frames\\)"):
        split_temporal_patches(3, 4, 2)


def test_registry_resolves_every_strategy_by_name():
    assert STRATEGY_NAMES == ("dense", "ring", "star", "apb", "apbv")
    for name, entry in STRATEGIES.items():
        strategy = get_strategy(AttentionConfig(name))
        assert strategy.name == name and strategy.exact == (name in ("dense", "ring"))
        assert strategy_label(name) == entry.label and ranks_for(name, 4) == (1 if name == BASELINE else 4)
    with pytest.raises(ValueError, match="unknown strategy 'nope'; choose one of dense, ring"):
        AttentionConfig("nope")
