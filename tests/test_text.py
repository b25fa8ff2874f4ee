"""The page's words: every engine error has a readable hint; progress, durations and the comparison table."""

from __future__ import annotations

import pytest

from apbv import errors
from apbv.engine.api import Result
from apbv.metrics import RankMetrics, Span
from ui.compare import Comparison, StrategyRuns
from ui.runner import RunState
from ui.text import (
    ERROR_HINTS,
    comparison_table,
    engine_banner,
    error_line,
    error_text,
    format_duration,
    progress_text,
    result_summary,
    video_text,
)
from ui.video_info import VideoInfo


def _codes(cls: type) -> set[str]:
    return {cls.code} | {c for sub in cls.__subclasses__() for c in _codes(sub)}


def test_every_engine_error_code_has_a_hint():
    assert _codes(errors.ApbvError) - {"error"} <= ERROR_HINTS.keys()


def test_error_text_shows_hint_and_engine_message():
    text = error_text("busy", "queue full (8)")
    assert ERROR_HINTS["busy"] in text and "queue full (8)" in text
    assert error_line("busy", "queue full (8)") == f"{ERROR_HINTS['busy']} (busy: queue full (8))"
    assert error_text("cancelled", "The request was stopped.") == "■ **Stopped.**"


@pytest.mark.parametrize(
    "seconds, text",
    [(None, "–"), (0.00042, "0.42 ms"), (0.0332, "33.2 ms"), (0.118, "118 ms"), (1.254, "1.25 s"), (12.44, "12.4 s"),
     (125.0, "2 min 05 s")],
)  # fmt: skip
def test_durations_read_naturally(seconds, text):
    assert format_duration(seconds) == text


def test_progress_marks_stages_with_their_elapsed_times():
    state = RunState(request_id="r", stages=(("read", 10.0), ("vision", 10.5), ("prefill", 12.0)), now=12.25)
    assert progress_text(state) == "✓ read 500 ms → ✓ vision 1.50 s → ▶ **prefill** 250 ms → ○ decode"


def test_queued_only_when_requests_are_ahead():
    assert "2 request(s) ahead" in progress_text(RunState(request_id="r", position=2))
    assert "Queued" not in progress_text(RunState(request_id="r", position=0))  # nothing ahead: starting
    waiting = progress_text(RunState(request_id="r", position=1), engine_state="starting")
    assert waiting == "… Waiting for the engine to start"  # the one "ahead" is the engine's own start
    assert ERROR_HINTS["worker_died"] in progress_text(RunState(error_code="worker_died", finished=True))


def _result(strategy: str, world_size: int, prefill_s: float, answer: str, first_token_s: float = 0.5) -> Result:
    ranks = [RankMetrics(r, "cpu", spans=[Span("prefill", 0.0, prefill_s)]) for r in range(world_size)]
    return Result("r", answer, [1, 2], strategy, world_size, 100, 110, 5, 2 * prefill_s, ranks, first_token_s)


def test_summary_puts_time_to_first_token_next_to_prefill():
    text = result_summary(_result("apbv", 2, 0.3, "a"))
    assert text.startswith("✓ APB-V on 2 rank(s): first token after **500 ms** (prefill 300 ms) · end to end 600 ms")
    assert "115 prompt tokens (100 visual) · 2 new tokens" in text


def test_summary_says_what_a_follow_up_continued_and_what_auto_picked():
    result = _result("dense", 1, 0.01, "a")
    result.ranks[0].counters["context_reused_tokens"] = 108
    result.choice = {"strategy": "dense", "world_size": 1, "predicted_s": None, "candidates": {}, "calibration": ""}
    text = result_summary(result)
    assert "· 108 of them continued from the conversation (video not decoded or encoded)" in text
    assert text.endswith("· picked by Auto (no speed calibration for this device: the single-GPU baseline)")
    assert "continued" not in result_summary(_result("dense", 1, 0.01, "a"))


def test_comparison_table_shows_medians_ranges_and_speedup():
    dense = StrategyRuns("dense", tuple(_result("dense", 1, s, "a | b") for s in (0.9, 1.1, 1.0)))
    apbv = StrategyRuns("apbv", tuple(_result("apbv", 2, s, "a\nb") for s in (0.25, 0.25, 0.25)))
    lines = comparison_table(Comparison("dense", 1, 3, (apbv, dense))).splitlines()
    assert lines[0] == "| strategy | ranks | prefill speedup | prefill | time to first token | end to end | answer |"
    assert lines[2] == "| APB-V | 2 | 4.00× | 250 ms | 500 ms | 500 ms | a b |"
    assert lines[3] == ("| FlashAttention (1 GPU) | 1 | 1.00× | 1.00 s <small>(900 ms–1.10 s)</small> | 500 ms | "
                        "2.00 s <small>(1.80 s–2.20 s)</small> | a \\| b |")  # fmt: skip
    assert "Median of 3 run(s) after 1 warm-up(s)" in lines[-1]


def test_video_text_tells_a_browser_codec_from_an_unreadable_file():
    hevc = VideoInfo(frame_count=80, fps=8.0, height=112, width=160, codec="hevc")
    text = video_text(hevc, 32, 640, 10_000)
    assert "160×112, 10.0 s at 8.0 fps (80 frames) · sampling 32 frames → ~640 visual tokens" in text
    assert "Your browser may not play hevc video, but the engine reads it" in text
    assert "browser" not in video_text(VideoInfo(80, 8.0, 112, 160, "h264"), 32, 640, 10_000)
    assert ERROR_HINTS["video_unreadable"] in video_text(None, 0, None, 10_000)
    assert ERROR_HINTS["too_many_tokens"] in video_text(hevc, 32, 20_000, 10_000)


def test_banner_only_until_the_engine_is_ready():
    assert "starting" in engine_banner({"state": "starting"})
    assert "restarting" in engine_banner({"state": "restarting"})
    assert engine_banner({"state": "ready"}) == ""


def test_comparison_table_shortens_long_answers():
    long = StrategyRuns("dense", (_result("dense", 1, 1.0, "word " * 40),))
    row = comparison_table(Comparison("dense", 0, 1, (long,))).splitlines()[2]
    answer = row.rsplit("| ", 1)[1].rstrip(" |")
    assert len(answer) == 80 and answer.endswith("…")
    assert "The engine is warming" in engine_banner({"state": "warming"})  # a state added later shows as well
