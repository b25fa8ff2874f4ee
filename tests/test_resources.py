"""What a rank's caches may hold: as asked, or scaled down together to a share of the memory the model left free."""

from __future__ import annotations

import torch

from apbv.engine.protocol import WorkerOptions
from apbv.engine.resources import CACHE_SHARE, cache_budgets, free_memory
from apbv.engine.worker import _rank_caches

GIB = 2**30


def test_caches_that_fit_get_what_was_asked():
    assert cache_budgets((2 * GIB, 4 * GIB), free=100 * GIB) == (2 * GIB, 4 * GIB)
    assert cache_budgets((2 * GIB, 4 * GIB), free=None) == (2 * GIB, 4 * GIB)  # unknown: as asked
    assert cache_budgets((0, 0), free=0) == (0, 0)


def test_caches_that_do_not_fit_shrink_together_to_their_share():
    video, context = cache_budgets((2 * GIB, 4 * GIB), free=8 * GIB)  # a 24 GB GPU holding a 7B model
    assert video + context <= CACHE_SHARE * 8 * GIB
    assert abs(context / video - 2) < 1e-6  # the proportions asked for are kept
    assert cache_budgets((GIB, 0), free=GIB) == (int(CACHE_SHARE * GIB), 0)


def test_a_rank_caps_caches_larger_than_its_memory():
    """The worker's own caches on this CPU: asked for half a petabyte each, they get a quarter of the memory available."""
    caches = _rank_caches(WorkerOptions(video_cache_mb=2**29, context_cache_mb=2**29), torch.device("cpu"), 0, 1)
    available = free_memory(torch.device("cpu"))
    assert 0 < caches.videos.max_bytes + caches.contexts.max_bytes <= CACHE_SHARE * available * 1.05  # it may move
    assert caches.videos.max_bytes == caches.contexts.max_bytes
