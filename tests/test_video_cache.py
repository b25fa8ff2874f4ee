"""The per-rank video cache: LRU eviction within its byte budget, keys by content and sampling."""

from __future__ import annotations

import torch

from apbv.engine.video_cache import VideoCache, VideoKey
from apbv.inputs import ProcessorSpec


def _key(content: str, indices=(0, 1)) -> VideoKey:
    return VideoKey(content, tuple(indices), ((28, 28),), ProcessorSpec())


def test_least_recently_used_entries_leave_first_within_the_byte_budget():
    cache = VideoCache(max_bytes=3 * 400)  # three entries of 100 float32
    for name in "abc":
        cache.put(_key(name), torch.full((100,), ord(name), dtype=torch.float32))
    assert cache.get(_key("a")) is not None  # a is now the most recent: b goes first
    cache.put(_key("d"), torch.zeros(100))
    assert cache.get(_key("b")) is None and all(cache.get(_key(n)) is not None for n in "acd")
    assert cache.used_bytes == 1200 and len(cache) == 3
    cache.put(_key("big"), torch.zeros(301))  # larger than the whole budget: not kept, nothing evicted
    assert cache.get(_key("big")) is None and len(cache) == 3


def test_sampling_and_content_are_part_of_the_key():
    cache = VideoCache(max_bytes=1 << 20)
    cache.put(_key("a", (0, 1)), torch.zeros(4))
    assert cache.get(_key("a", (0, 2))) is None and cache.get(_key("b", (0, 1))) is None
    assert cache.get(_key("a", (0, 1))) is not None


def test_a_zero_budget_keeps_nothing():
    cache = VideoCache(max_bytes=0)
    cache.put(_key("a"), torch.zeros(1))
    assert cache.get(_key("a")) is None
