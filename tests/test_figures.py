"""Figure builders on recorded engine results: the plotted numbers are the measured ones, side by side."""

from __future__ import annotations

import math

import pytest

from apbv.attention.registry import strategy_label
from apbv.engine.api import Result
from apbv.metrics import RankMetrics, Span, balance
from ui import figures
from ui.compare import Comparison, StrategyRuns


def _by_strategy(results: list[Result], strategy: str) -> Result:
    return next(r for r in results if r.strategy == strategy)


def _pair(recorded: list[Result]) -> list[Result]:
    """APB-V and FlashAttention on the same inputs, as the page shows them."""
    return [_by_strategy(recorded, "apbv"), _by_strategy(recorded, "dense")]


def test_stage_bars_stack_to_each_ranks_total_for_both_runs(recorded):
    runs = _pair(recorded)
    fig = figures.stage_time_figure(runs)
    assert fig.layout.barmode == "stack"
    ranks = [m for r in runs for m in r.ranks]
    groups, lanes = fig.data[0].x  # one shared axis: run, then rank
    assert list(groups) == ["APB-V", "APB-V", "FlashAttention (1 GPU)"]
    assert list(lanes) == [figures.rank_label(m) for m in ranks]
    for i, m in enumerate(ranks):
        assert sum(trace.y[i] for trace in fig.data) == pytest.approx(1e3 * sum(m.totals.values()))
    assert {"attention compute", "vision encoder", "decode"} <= {t.name for t in fig.data}


def test_stage_bars_keep_unknown_categories_and_drop_empty_ones():
    m = RankMetrics(0, "cpu", totals={"attention": 0.5, "comm_wait": 0.0, "new_thing": 0.25})
    fig = figures.stage_time_figure([Result("r", "", [], "apbv", 1, 1, 1, 1, 1.0, [m])])
    assert {t.name: t.y[0] for t in fig.data} == {"attention compute": 500.0, "new_thing": 250.0}


def test_balance():
    assert balance([2.0, 2.0, 2.0]) == 1.0
    assert balance([3.0, 1.0]) == 1.5
    assert math.isnan(balance([]))
    assert math.isnan(balance([0.0, 0.0]))


@pytest.mark.parametrize(
    "largest, unit", [(4e-5 * 1e12, "MFLOP"), (2.5e9, "GFLOP"), (1.2e13, "TFLOP"), (3e15, "PFLOP"), (5.0, "FLOP")]
)
def test_flop_unit_keeps_numbers_at_least_one(largest, unit):
    divisor, name = figures.flop_unit(largest)
    assert name == unit and 1 <= largest / divisor < 1000


def test_attention_work_in_a_readable_unit_with_each_runs_balance(recorded):
    runs = _pair(recorded)
    flops = [m.counters["attn_flops"] for r in runs for m in r.ranks]
    divisor, unit = figures.flop_unit(max(flops))
    fig = figures.attention_work_figure(runs)
    assert list(fig.data[0].y) == pytest.approx([f / divisor for f in flops])
    assert fig.layout.yaxis.title.text == f"attention work ({unit})"
    apbv = flops[: len(runs[0].ranks)]
    assert f"APB-V {max(apbv) / (sum(apbv) / len(apbv)):.2f} · FlashAttention (1 GPU) 1.00" in fig.layout.title.text


def test_attention_work_falls_back_to_pairs():
    ranks = [RankMetrics(r, "cpu", counters={"attn_pairs": pairs}) for r, pairs in enumerate([300.0, 100.0])]
    fig = figures.attention_work_figure([Result("r", "", [], "ring", 2, 1, 1, 1, 1.0, ranks)])
    assert list(fig.data[0].y) == [300.0, 100.0]
    assert "pairs" in fig.layout.yaxis.title.text and "ZigZag ring 1.50" in fig.layout.title.text


def test_timeline_bars_of_both_runs_start_at_span_start_and_last_its_duration(recorded):
    runs = _pair(recorded)
    fig = figures.timeline_figure(runs)
    bars = {(t.name, y): (b, x) for t in fig.data for y, b, x in zip(t.y, t.base, t.x)}
    spans = [(r, m, s) for r in runs for m in r.ranks for s in m.spans]
    assert len(bars) == len(spans)
    for r, m, s in spans:
        base, width = bars[(s.name, f"{strategy_label(r.strategy)} · {figures.rank_label(m)}")]
        assert base == pytest.approx(1e3 * s.start) and width == pytest.approx(1e3 * (s.end - s.start))
    lanes = [f"{strategy_label(r.strategy)} · {figures.rank_label(m)}" for r in runs for m in r.ranks]
    assert list(fig.layout.yaxis.categoryarray) == lanes  # runs in order, ranks in order


def test_history_groups_runs_by_strategy(recorded):
    fig = figures.history_figure(recorded)
    measured = {t.name: t for t in fig.data}
    assert len(measured) == len({r.strategy for r in recorded}) and not any("projected" in n for n in measured)
    for strategy in {r.strategy for r in recorded}:
        runs = sorted((r for r in recorded if r.strategy == strategy), key=lambda r: r.visual_tokens)
        trace = measured[f"{strategy_label(strategy)} (measured)"]
        assert list(trace.x) == [r.visual_tokens for r in runs]
        assert list(trace.y) == pytest.approx([1e3 * r.stage_s("prefill") for r in runs])


def _run_with_prefill(strategy: str, tokens: int, prefill_s: float) -> Result:
    ranks = [RankMetrics(0, "cpu", spans=[Span("prefill", 0.0, prefill_s)])]
    return Result("r", "", [], strategy, 1, tokens, tokens, 1, prefill_s, ranks)


def test_history_of_one_point_ticks_at_whole_token_counts():
    fig = figures.history_figure([_run_with_prefill("apbv", 256, 0.01)])
    assert list(fig.layout.xaxis.tickvals) == [256] and fig.layout.xaxis.tickformat == ",d"


def test_history_projection_is_labelled_and_follows_the_power_law_fit():
    runs = [_run_with_prefill("apbv", n, 2e-3 * (n / 100) ** 1.5) for n in (100, 400)]
    fig = figures.history_figure(runs, project_to=1600)
    projected = [t for t in fig.data if "projected" in t.name]
    assert len(projected) == 1 and projected[0].line.dash == "dash"
    assert list(projected[0].x) == [400, 1600]
    assert projected[0].y[-1] == pytest.approx(2.0 * 16**1.5)  # ms
    # No projection below the measured range, nor from a single token count.
    assert not any("projected" in t.name for t in figures.history_figure(runs, project_to=300).data)
    one = [_run_with_prefill("dense", 100, 0.01)] * 2
    assert not any("projected" in t.name for t in figures.history_figure(one, project_to=1600).data)


def _comparison(recorded: list[Result]) -> Comparison:
    """Every recorded run of a strategy as its repeats (two token counts: a wide range)."""
    strategies = list(dict.fromkeys(r.strategy for r in recorded))
    runs = tuple(StrategyRuns(s, tuple(r for r in recorded if r.strategy == s)) for s in strategies)
    return Comparison("dense", 0, 2, runs)


def test_comparison_puts_each_metric_on_its_own_axis_with_medians_and_ranges(recorded):
    comparison = _comparison(recorded)
    fig = figures.comparison_figure(comparison)
    assert [t.yaxis for t in fig.data] == ["y", "y2", "y3"]  # prefill, first token, end to end
    prefill = fig.data[0]
    for runs, median, up, down in zip(comparison.runs, prefill.y, prefill.error_y.array, prefill.error_y.arrayminus):
        values = sorted(1e3 * r.stage_s("prefill") for r in runs.results)
        assert median == pytest.approx((values[0] + values[1]) / 2)  # median of two
        assert (median + up, median - down) == pytest.approx((values[-1], values[0]))
    speedups = [a.text for a in fig.layout.annotations if a.text.endswith("×")]
    expected = [f"{comparison.speedup(r):.2f}×" for r in comparison.runs if r.strategy != "dense"]
    assert speedups == expected


def test_comparison_of_two_names_the_speedup_in_the_title(recorded):
    comparison = _comparison([r for r in recorded if r.strategy in ("apbv", "dense")])
    fig = figures.comparison_figure(comparison)
    assert f"prefill speedup {comparison.speedup(comparison.of('apbv')):.2f}×" in fig.layout.title.text
