"""Figure builders on recorded engine results: the plotted numbers are the measured ones."""

from __future__ import annotations

import math

import pytest

from apbv.attention.registry import strategy_label
from apbv.engine.api import Result
from apbv.metrics import RankMetrics, Span, balance
from ui import figures


def _by_strategy(results: list[Result], strategy: str) -> Result:
    return next(r for r in results if r.strategy == strategy)


def test_stage_bars_stack_to_each_ranks_total(recorded):
    for result in recorded:
        fig = figures.stage_time_figure(result.ranks)
        assert fig.layout.barmode == "stack"
        for i, m in enumerate(result.ranks):
            stacked = sum(trace.y[i] for trace in fig.data)
            assert stacked == pytest.approx(1e3 * sum(m.totals.values()))
        names = {t.name for t in fig.data}
        assert {"attention compute", "vision encoder", "decode"} <= names


def test_stage_bars_keep_unknown_categories_and_drop_empty_ones():
    m = RankMetrics(0, "cpu", totals={"attention": 0.5, "comm_wait": 0.0, "new_thing": 0.25})
    fig = figures.stage_time_figure([m])
    assert {t.name: t.y[0] for t in fig.data} == {"attention compute": 500.0, "new_thing": 250.0}


def test_balance():
    assert balance([2.0, 2.0, 2.0]) == 1.0
    assert balance([3.0, 1.0]) == 1.5
    assert math.isnan(balance([]))
    assert math.isnan(balance([0.0, 0.0]))


def test_attention_work_in_tflop_with_balance_in_title(recorded):
    result = _by_strategy(recorded, "ring")
    flops = [m.counters["attn_flops"] for m in result.ranks]
    fig = figures.attention_work_figure(result.ranks)
    assert list(fig.data[0].y) == pytest.approx([f / 1e12 for f in flops])
    assert "TFLOP" in fig.layout.yaxis.title.text
    assert f"max/mean = {max(flops) / (sum(flops) / len(flops)):.2f}" in fig.layout.title.text


def test_attention_work_falls_back_to_pairs():
    ranks = [RankMetrics(r, "cpu", counters={"attn_pairs": pairs}) for r, pairs in enumerate([300.0, 100.0])]
    fig = figures.attention_work_figure(ranks)
    assert list(fig.data[0].y) == [300.0, 100.0]
    assert "pairs" in fig.layout.yaxis.title.text and "max/mean = 1.50" in fig.layout.title.text


def test_timeline_bars_start_at_span_start_and_last_its_duration(recorded):
    ranks = _by_strategy(recorded, "apbv").ranks
    fig = figures.timeline_figure(ranks)
    bars = {(t.name, y): (b, x) for t in fig.data for y, b, x in zip(t.y, t.base, t.x)}
    spans = [(m, s) for m in ranks for s in m.spans]
    assert len(bars) == len(spans)
    for m, s in spans:
        base, width = bars[(s.name, figures.rank_label(m))]
        assert base == pytest.approx(1e3 * s.start) and width == pytest.approx(1e3 * (s.end - s.start))


def test_stage_ms_is_the_slowest_rank():
    ranks = [RankMetrics(r, "cpu", spans=[Span("prefill", a, b)]) for r, (a, b) in enumerate([(0.0, 0.2), (0.1, 0.4)])]
    result = Result("r", "", [], "apbv", 2, 10, 12, 2, 0.5, ranks)
    assert figures.stage_ms(result, "prefill") == pytest.approx(300.0)
    assert figures.stage_ms(result, "decode") == 0.0


def test_history_groups_runs_by_strategy(recorded):
    fig = figures.history_figure(recorded)
    measured = {t.name: t for t in fig.data}
    assert len(measured) == len({r.strategy for r in recorded}) and not any("projected" in n for n in measured)
    for strategy in {r.strategy for r in recorded}:
        runs = sorted((r for r in recorded if r.strategy == strategy), key=lambda r: r.visual_tokens)
        trace = measured[f"{strategy_label(strategy)} (measured)"]
        assert list(trace.x) == [r.visual_tokens for r in runs]
        assert list(trace.y) == pytest.approx([figures.stage_ms(r, "prefill") for r in runs])


def _run_with_prefill(strategy: str, tokens: int, prefill_s: float) -> Result:
    ranks = [RankMetrics(0, "cpu", spans=[Span("prefill", 0.0, prefill_s)])]
    return Result("r", "", [], strategy, 1, tokens, tokens, 1, prefill_s, ranks)


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


def test_comparison_shows_both_latencies_and_the_speedup(recorded):
    dense, apbv = _by_strategy(recorded, "dense"), _by_strategy(recorded, "apbv")
    fig = figures.comparison_figure([apbv], dense)
    prefill, end_to_end = fig.data
    assert list(prefill.y) == pytest.approx([figures.stage_ms(dense, "prefill"), figures.stage_ms(apbv, "prefill")])
    assert list(end_to_end.y) == pytest.approx([1e3 * dense.wall_s, 1e3 * apbv.wall_s])
    expected = figures.stage_ms(dense, "prefill") / figures.stage_ms(apbv, "prefill")
    assert f"prefill speedup {expected:.2f}×" in fig.layout.title.text
    assert fig.layout.annotations[0].text == f"{expected:.2f}× prefill"


def test_comparison_of_all_strategies_annotates_each_against_the_baseline(recorded):
    runs = [r for r in recorded if r.visual_tokens == recorded[0].visual_tokens]
    dense = _by_strategy(runs, "dense")
    fig = figures.comparison_figure(runs, dense)
    assert len(fig.data[0].x) == len(runs) and fig.data[0].x[0].startswith("FlashAttention")
    assert len(fig.layout.annotations) == len(runs) - 1
