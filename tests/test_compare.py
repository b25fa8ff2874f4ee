"""Comparisons: medians and ranges of repeated runs, the speedup of medians, and `measure` on the real pool
(embedded model, CPU, 2 ranks): warm-ups left out, repeats interleaved, every strategy re-measured."""

from __future__ import annotations

import statistics

import pytest

from apbv.engine.api import Request, Result
from apbv.metrics import RankMetrics, Span
from ui.compare import Comparison, Spread, Step, StrategyRuns, measure


def _run(strategy: str, prefill_s: float, wall_s: float, first_token_s: float | None = 0.1) -> Result:
    ranks = [RankMetrics(0, "cpu", spans=[Span("prefill", 0.0, prefill_s)])]
    return Result("r", f"{strategy} {prefill_s}", [1], strategy, 1, 10, 10, 1, wall_s, ranks, first_token_s)


def test_spread_is_the_median_and_the_range():
    assert Spread.of([3.0, 1.0, 2.0]) == Spread(2.0, 1.0, 3.0)
    assert Spread.of([4.0, 1.0]) == Spread(2.5, 1.0, 4.0)


def test_runs_summarise_each_metric_and_show_the_median_prefill_run():
    runs = StrategyRuns("apbv", (_run("apbv", 0.3, 1.0), _run("apbv", 0.1, 2.0, None), _run("apbv", 0.2, 3.0)))
    assert runs.spread("prefill_s") == Spread(0.2, 0.1, 0.3)
    assert runs.spread("wall_s") == Spread(2.0, 1.0, 3.0)
    assert runs.spread("time_to_first_token_s") == Spread(0.1, 0.1, 0.1)  # runs without a first token left out
    assert runs.representative.stage_s("prefill") == 0.2 and runs.answer == "apbv 0.2"


def test_speedup_is_the_baselines_median_over_each_median():
    dense = StrategyRuns("dense", tuple(_run("dense", s, 1.0) for s in (0.8, 1.0, 1.3)))
    apbv = StrategyRuns("apbv", tuple(_run("apbv", s, 1.0) for s in (0.2, 0.25, 0.4)))
    comparison = Comparison("dense", 1, 3, (apbv, dense))
    assert comparison.speedup(apbv) == pytest.approx(4.0) and comparison.speedup(dense) == 1.0
    data = comparison.to_dict()
    assert [s["strategy"] for s in data["strategies"]] == ["apbv", "dense"]
    assert data["strategies"][0]["prefill_s"] == {"median": 0.25, "min": 0.2, "max": 0.4}
    assert data["strategies"][0]["prefill_speedup"] == pytest.approx(4.0)
    assert [r["prefill_s"] for r in data["strategies"][1]["runs"]] == [0.8, 1.0, 1.3]


@pytest.mark.multiprocess
def test_measure_remeasures_every_strategy_with_warmups_and_repeats(pool, example_video):
    request = Request(example_video, "What color?", num_frames=8, max_new_tokens=2)  # on all (2) ranks
    items = list(measure(pool, request, ["apbv", "dense"], warmup=1, repeats=3))
    steps, comparison = items[:-1], items[-1]
    assert isinstance(comparison, Comparison) and all(isinstance(s, Step) for s in steps)
    ends = [s for s in steps if s.state.finished]
    assert [(s.strategy, s.warmup) for s in ends] == [("apbv", True), ("dense", True)] + [
        ("apbv", False), ("dense", False)] * 3  # warm-ups first, then the repeats interleaved  # fmt: skip
    measured = [s.state.result for s in ends if not s.warmup]
    assert [tuple(r.request_id for r in runs.results) for runs in comparison.runs] == [
        tuple(r.request_id for r in measured[0::2]), tuple(r.request_id for r in measured[1::2])]  # fmt: skip
    apbv, dense = comparison.runs
    assert (apbv.world_size, dense.world_size, comparison.baseline) == (2, 1, "dense")
    medians = {runs.strategy: statistics.median(r.stage_s("prefill") for r in runs.results) for runs in (apbv, dense)}
    assert comparison.speedup(apbv) == pytest.approx(medians["dense"] / medians["apbv"])


@pytest.mark.multiprocess
def test_measure_ends_at_a_failed_run(pool, example_video):
    items = list(measure(pool, Request(example_video, " ", num_frames=8), ["apbv", "dense"]))
    assert not any(isinstance(i, Comparison) for i in items)
    assert items[-1].state.error_code == "empty_question" and items[-1].index == 1
