"""Page controls -> engine Request, with the engine's own defaults and the page's messages for bad settings."""

from __future__ import annotations

import gradio as gr
import pytest

from apbv.attention.config import AttentionConfig
from apbv.attention.registry import STRATEGY_NAMES
from apbv.config import Limits
from apbv.engine.api import REQUEST_STRATEGIES, Request
from apbv.errors import InputError
from apbv.video import DEFAULT_FPS
from ui.controls import (
    SAMPLE_BY_FPS,
    SAMPLE_BY_FRAMES,
    STRATEGY_CHOICES,
    build_request,
    comparison_strategies,
    make_request,
    page_sampling,
    with_strategy,
)
from ui.layout import build_layout

HEALTH = {"state": "ready", "world_size": 2, "device": "cpu", "model": "m", "video_pixels": {}, "max_prompt_tokens": 1}


def _request(strategy: str, sample_by: str = SAMPLE_BY_FRAMES, max_pixels: int = 0, **kw):
    return make_request("v.mp4", "What?", strategy, 4, sample_by, 16, 0.5, max_pixels, 32, 0.02, 0.01, **kw)


def test_every_engine_strategy_is_offered_once():
    assert [value for _, value in STRATEGY_CHOICES] == list(REQUEST_STRATEGIES)


def test_the_pages_defaults_are_the_engines():
    with gr.Blocks():
        layout = build_layout(HEALTH, [])
    request, attention = Request("", ""), AttentionConfig()
    assert layout.strategy.value == request.strategy
    if request.num_frames is None:  # the engine samples at a rate unless told a frame count
        assert (layout.sample_by.value, layout.fps.value) == (SAMPLE_BY_FPS, request.fps or DEFAULT_FPS)
    else:
        assert (layout.sample_by.value, layout.frames.value) == (SAMPLE_BY_FRAMES, request.num_frames)
    assert layout.max_new_tokens.value == request.max_new_tokens
    assert layout.max_new_tokens.maximum == Limits().max_new_tokens
    assert (layout.anchor.value, layout.passing.value) == (attention.anchor_ratio, attention.passing_ratio)
    assert layout.frames.maximum is None  # out-of-range values reach the page's own check
    assert layout.ranks.value == 2 and [v for _, v in layout.ranks.choices] == [1, 2]


def test_apbv_request_carries_the_page_settings():
    r = _request("apbv", max_pixels=448 * 448, history=[["Q1", "A1"]])
    assert (r.strategy, r.world_size, r.num_frames, r.fps) == ("apbv", 4, 16, None)
    assert (r.max_pixels, r.max_new_tokens, r.anchor_ratio, r.passing_ratio) == (448 * 448, 32, 0.02, 0.01)
    assert r.history == (("Q1", "A1"),)


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


@pytest.mark.parametrize(
    "sample_by, frames, fps, message",
    [
        (SAMPLE_BY_FRAMES, None, 1.0, "enter the number of frames to sample"),
        (SAMPLE_BY_FPS, 32, None, "enter the frames per second to sample"),
        (SAMPLE_BY_FRAMES, 1000, 1.0, f"frames must be between 1 and {Limits().max_frames}, got 1000"),
        (SAMPLE_BY_FRAMES, 0, 1.0, "frames must be between 1 and"),
        (SAMPLE_BY_FPS, 32, 0.0, "frames per second must be above 0, got 0.0"),
    ],
)
def test_out_of_range_sampling_gets_the_pages_message(sample_by, frames, fps, message):
    with pytest.raises(InputError, match=message):
        page_sampling(sample_by, frames, fps)


def test_only_the_chosen_sampling_is_sent():
    assert page_sampling(SAMPLE_BY_FRAMES, 24.0, 3.0) == (24, None)
    assert page_sampling(SAMPLE_BY_FPS, 24, 3) == (None, 3.0)


def test_api_requests_sample_by_frames_or_fps_and_default_to_the_engines():
    assert build_request("v.mp4", "Q").num_frames == Request("", "").num_frames
    assert (build_request("v.mp4", "Q", fps=0.5).num_frames, build_request("v.mp4", "Q", fps=0.5).fps) == (None, 0.5)
    with pytest.raises(InputError, match="not both"):
        build_request("v.mp4", "Q", frames=8, fps=0.5)
    with pytest.raises(InputError, match="unknown strategy 'nope'"):
        build_request("v.mp4", "Q", strategy="nope")
    assert build_request("v.mp4", "Q", history=[["a", "b"]]).history == (("a", "b"),)


def test_comparisons_measure_the_asked_strategy_first():
    assert comparison_strategies("apbv", every=False) == ["apbv", "dense"]
    assert comparison_strategies("dense", every=False) == ["dense", "apbv"]
    every = comparison_strategies("ring", every=True)
    assert every[0] == "ring" and sorted(every) == sorted(STRATEGY_NAMES)


def test_api_numbers_may_come_as_text_but_must_be_numbers():
    r = build_request("v.mp4", "Q", ranks="2", frames=8.0, fps=None, max_new_tokens="16", anchor_ratio="0.5")
    assert (r.world_size, r.num_frames, r.max_new_tokens, r.anchor_ratio) == (2, 8, 16, 0.5)
    for name, value, message in [("ranks", "two", "ranks must be a whole number, got 'two'"),
                                 ("frames", 2.5, "frames must be a whole number, got 2.5"),
                                 ("fps", float("nan"), "fps must be a number, got nan"),
                                 ("max_new_tokens", True, "max_new_tokens must be a whole number, got True"),
                                 ("question", 7, "the question must be text, got int")]:  # fmt: skip
        with pytest.raises(InputError, match=message):
            build_request("v.mp4", **{"question": "Q", name: value})
