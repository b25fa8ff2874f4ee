"""The page's request driver against the real engine pool (embedded model, CPU, 2 ranks)."""

from __future__ import annotations

import pytest

from apbv.engine.api import Request
from ui.controls import with_strategy
from ui.runner import STAGES, run, stream
from ui.video_info import estimate_visual_tokens, probe

pytestmark = pytest.mark.multiprocess


def test_stream_reports_stages_tokens_and_the_result(pool, example_video):
    states = list(stream(pool, Request(example_video, "What moves in the video?", num_frames=8, max_new_tokens=8)))
    final = states[-1]
    assert final.ok and final.finished and not any(s.finished for s in states[:-1])
    assert final.stages == STAGES
    streamed = [s.answer for s in states if s.result is None]
    assert streamed[-1] == final.result.answer  # the streamed pieces add up to the final answer
    assert final.result.world_size == 2 and [m.rank for m in final.result.ranks] == [0, 1]


def test_baseline_runs_on_one_rank(pool, example_video):
    request = with_strategy(Request(example_video, "What moves?", num_frames=8, max_new_tokens=4), "dense", 2)
    final = run(pool, request)
    assert final.ok and final.result.strategy == "dense" and len(final.result.ranks) == 1


def test_empty_question_ends_in_a_readable_error_and_the_pool_keeps_serving(pool, example_video):
    bad = run(pool, Request(example_video, "   ", num_frames=8))
    assert (bad.finished, bad.ok, bad.error_code) == (True, False, "empty_question")
    assert run(pool, Request(example_video, "What moves?", num_frames=8, max_new_tokens=4)).ok


def test_page_estimate_equals_the_engines_visual_tokens(pool, example_video):
    """The page's estimate uses the model's own pixel bounds (112x112 frames for the embedded model)."""
    health = pool.health()
    assert health["video_pixels"] == {"min_pixels": 4 * 28 * 28, "max_pixels": 112 * 112}
    info = probe(example_video)
    for frames, max_pixels in ((8, None), (16, 56 * 56)):
        pixels = health["video_pixels"] | ({"max_pixels": max_pixels} if max_pixels else {})
        result = run(pool, Request(example_video, "What color?", num_frames=frames, max_pixels=max_pixels,
                                   max_new_tokens=1)).result  # fmt: skip
        assert estimate_visual_tokens(info, frames, None, pixels) == result.visual_tokens
