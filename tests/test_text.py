"""The page's words: every engine error has a readable hint; progress and comparison text are right."""

from __future__ import annotations

from apbv import errors
from apbv.engine.api import Result
from apbv.metrics import RankMetrics, Span
from ui.runner import RunState
from ui.text import ERROR_HINTS, comparison_table, error_text, progress_text


def _codes(cls: type) -> set[str]:
    return {cls.code} | {c for sub in cls.__subclasses__() for c in _codes(sub)}


def test_every_engine_error_code_has_a_hint():
    assert _codes(errors.ApbvError) - {"error"} <= ERROR_HINTS.keys()


def test_error_text_shows_hint_and_engine_message():
    text = error_text("busy", "queue full (8)")
    assert ERROR_HINTS["busy"] in text and "queue full (8)" in text


def test_progress_marks_done_running_and_pending_stages():
    text = progress_text(RunState(stages=("read", "vision", "prefill")))
    assert text == "✓ read → ✓ vision → ⏳ **prefill** → ○ decode"
    assert "3 request(s) ahead" in progress_text(RunState(position=3))
    assert "Queued" not in progress_text(RunState(position=0))  # nothing ahead: starting, not queued
    assert ERROR_HINTS["worker_died"] in progress_text(RunState(error_code="worker_died", finished=True))


def _result(strategy: str, world_size: int, prefill_s: float, answer: str) -> Result:
    ranks = [RankMetrics(r, "cpu", spans=[Span("prefill", 0.0, prefill_s)]) for r in range(world_size)]
    return Result("r", answer, [1], strategy, world_size, 100, 110, 5, 2 * prefill_s, ranks)


def test_comparison_table_rows_and_speedup():
    dense, apbv = _result("dense", 1, 0.9, "a | b"), _result("apbv", 2, 0.3, "a\nb")
    lines = comparison_table([apbv, dense], dense).splitlines()
    assert len(lines) == 4
    assert lines[2] == "| FlashAttention (1 GPU) | 1 | 900.0 | 1800.0 | 1.00× | a \\| b |"
    assert lines[3] == "| APB-V | 2 | 300.0 | 600.0 | 3.00× | a b |"
