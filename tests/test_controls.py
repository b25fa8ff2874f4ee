"""Page controls -> engine Request."""

from __future__ import annotations

from apbv.attention.registry import STRATEGY_NAMES
from ui.controls import (
    SAMPLE_BY_FPS,
    SAMPLE_BY_FRAMES,
    STRATEGY_CHOICES,
    make_request,
    with_strategy,
)


def _request(strategy: str, sample_by: str = SAMPLE_BY_FRAMES, max_pixels: int = 0):
    return make_request("v.mp4", "What?", strategy, 4, sample_by, 16, 0.5, max_pixels, 32, 0.02, 0.01)


def test_every_engine_strategy_is_offered_once():
    assert sorted(value for _, value in STRATEGY_CHOICES) == sorted(STRATEGY_NAMES)


def test_apbv_request_carries_the_page_settings():
    r = _request("apbv", max_pixels=448 * 448)
    assert (r.strategy, r.world_size, r.num_frames, r.fps) == ("apbv", 4, 16, None)
    assert (r.max_pixels, r.max_new_tokens, r.anchor_ratio, r.passing_ratio) == (448 * 448, 32, 0.02, 0.01)


def test_fps_sampling_and_engine_default_resolution():
    r = _request("ring", sample_by=SAMPLE_BY_FPS)
    assert (r.num_frames, r.fps, r.max_pixels) == (None, 0.5, None)


def test_baseline_runs_on_one_rank_and_only_apbv_keeps_the_ratios():
    apbv = _request("apbv")
    dense = with_strategy(apbv, "dense", 4)
    assert (dense.world_size, dense.anchor_ratio, dense.passing_ratio) == (1, None, None)
    assert (dense.video_path, dense.question, dense.num_frames) == (apbv.video_path, apbv.question, apbv.num_frames)
    apb = with_strategy(apbv, "apb", 4)
    assert (apb.world_size, apb.anchor_ratio, apb.passing_ratio) == (4, None, None)
