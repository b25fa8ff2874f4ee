"""Plotly figures of runs' own measurements.

Pure functions of `Result` / `Comparison`: no engine, no Gradio. The per-rank figures take several runs (the asked
strategy and FlashAttention beside it) and draw them on one shared axis, grouped by run. Times are in ms, attention
work in the FLOP unit that suits its size (or key-query pairs when FLOPs were not counted). Anything not measured
in the run it describes is labelled "projected".
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from apbv.attention.registry import strategy_label
from apbv.engine.api import Result
from apbv.metrics import ATTENTION, COMM_WAIT, DECODE, OTHER_LAYERS, READ, VISION, RankMetrics, balance
from ui.compare import METRICS, Comparison

# Stage categories in stacking order, with the labels a user reads and their colours.
CATEGORY_LABELS: dict[str, str] = {
    READ: "read video",
    VISION: "vision encoder",
    ATTENTION: "attention compute",
    COMM_WAIT: "communication wait",
    OTHER_LAYERS: "other layers",
    DECODE: "decode",
}
CATEGORY_COLORS: dict[str, str] = {
    READ: "#9e9e9e",
    VISION: "#8e6bbf",
    ATTENTION: "#2f7ed8",
    COMM_WAIT: "#e15759",
    OTHER_LAYERS: "#9ecae9",
    DECODE: "#f28e2b",
}
# Timeline stages (span names) coloured like the category that dominates them.
STAGE_COLORS: dict[str, str] = {
    "read": CATEGORY_COLORS[READ],
    "vision": CATEGORY_COLORS[VISION],
    "prefill": CATEGORY_COLORS[ATTENTION],
    "decode": CATEGORY_COLORS[DECODE],
}
FLOP_UNITS = ((1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP"), (1e3, "kFLOP"), (1.0, "FLOP"))
STRATEGY_COLORS = ("#2f7ed8", "#9e9e9e", "#f28e2b", "#59a14f", "#e15759", "#8e6bbf")
_LAYOUT = dict(template="plotly_white", margin=dict(l=60, r=20, t=60, b=50), legend=dict(orientation="h", y=-0.25))


def rank_label(m: RankMetrics) -> str:
    """Axis label of one rank: its index and the device it ran on (a CPU rank is not a GPU)."""
    return f"rank {m.rank} ({m.device})"


def run_label(result: Result) -> str:
    return strategy_label(result.strategy)


def flop_unit(largest: float) -> tuple[float, str]:
    """(divisor, unit) that shows `largest` FLOP as a number of at least 1: 4e-5 TFLOP reads as 40 MFLOP."""
    return next(((d, u) for d, u in FLOP_UNITS if largest >= d), FLOP_UNITS[-1])


def _rank_axis(results: Sequence[Result]) -> list[list[str]]:
    """A two-level category axis: the run, then its ranks."""
    return [[run_label(r) for r in results for _ in r.ranks], [rank_label(m) for r in results for m in r.ranks]]


def stage_time_figure(results: Sequence[Result]) -> go.Figure:
    """Per-rank stacked bars of time per category (ms), runs side by side on one axis; each bar's height is the
    rank's total measured time."""
    ranks = [m for r in results for m in r.ranks]
    extra = sorted({c for m in ranks for c in m.totals} - CATEGORY_LABELS.keys())
    x = _rank_axis(results)
    fig = go.Figure()
    for category in [*CATEGORY_LABELS, *extra]:
        y = [1e3 * m.totals.get(category, 0.0) for m in ranks]
        if any(y):
            fig.add_bar(
                x=x, y=y, name=CATEGORY_LABELS.get(category, category), marker_color=CATEGORY_COLORS.get(category)
            )
    fig.update_layout(barmode="stack", title="Time per stage and rank (measured)", yaxis_title="time (ms)", **_LAYOUT)
    return fig


def attention_work_figure(results: Sequence[Result]) -> go.Figure:
    """Per-rank attention work (FLOP, or key-query pairs when FLOPs were not counted), runs side by side on one
    axis, with each run's max/mean balance in the title."""
    ranks = [m for r in results for m in r.ranks]
    if all("attn_flops" in m.counters for m in ranks):
        divisor, unit = flop_unit(max((m.counters["attn_flops"] for m in ranks), default=0.0))
        per_run = [[m.counters["attn_flops"] / divisor for m in r.ranks] for r in results]
        axis = f"attention work ({unit})"
    else:
        per_run = [[m.counters.get("attn_pairs", 0.0) for m in r.ranks] for r in results]
        axis = "attention work (query-key pairs)"
    fig = go.Figure(go.Bar(x=_rank_axis(results), y=[v for values in per_run for v in values], name=axis,
                           marker_color=STRATEGY_COLORS[0]))  # fmt: skip
    balances = " · ".join(f"{run_label(r)} {balance(values):.2f}" for r, values in zip(results, per_run))
    fig.update_layout(title=f"Attention load per rank<br><sub>balance max/mean: {balances}</sub>", yaxis_title=axis,
                      **_LAYOUT)  # fmt: skip
    return fig


def timeline_figure(results: Sequence[Result]) -> go.Figure:
    """Per-rank timeline of every run on one time axis: one horizontal bar per span, from its start (ms since the
    request started) for its duration."""
    by_stage: dict[str, list[tuple[str, float, float]]] = defaultdict(list)
    lanes = [(f"{run_label(r)} · {rank_label(m)}", m) for r in results for m in r.ranks]
    for row, m in lanes:
        for s in m.spans:
            by_stage[s.name].append((row, 1e3 * s.start, 1e3 * (s.end - s.start)))
    fig = go.Figure()
    for name, rows in by_stage.items():
        fig.add_bar(
            y=[r[0] for r in rows],
            base=[r[1] for r in rows],
            x=[r[2] for r in rows],
            orientation="h",
            name=name,
            marker_color=STAGE_COLORS.get(name),
            hovertemplate="%{y}: " + name + " from %{base:.1f} ms for %{x:.1f} ms<extra></extra>",
        )
    fig.update_layout(
        barmode="overlay", title="Timeline per rank (measured)", xaxis_title="time since request start (ms)", **_LAYOUT
    )
    fig.update_yaxes(categoryorder="array", categoryarray=[row for row, _ in lanes], autorange="reversed",
                     automargin=True)  # fmt: skip
    return fig


def _power_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float] | None:
    """Least-squares fit of y = a * x**b in log space; None without two distinct positive x."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len({p[0] for p in pts}) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    b = sum((p[0] - mx) * (p[1] - my) for p in pts) / sum((p[0] - mx) ** 2 for p in pts)
    return math.exp(my - b * mx), b


def history_figure(results: Sequence[Result], project_to: int | None = None) -> go.Figure:
    """Prefill latency (ms) vs visual tokens, one series per strategy across the session's runs.

    project_to: when given and larger than a strategy's measured tokens, a dashed "projected" line extends a
    power-law fit of that strategy's runs to this many visual tokens. Token counts are whole numbers: with few
    distinct ones, the axis ticks at exactly those.
    """
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in results:
        series[r.strategy].append((r.visual_tokens, 1e3 * r.stage_s("prefill")))
    fig = go.Figure()
    for strategy, pts in series.items():
        pts.sort()
        label = strategy_label(strategy)
        fig.add_scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="markers+lines", name=f"{label} (measured)")
        fit = _power_fit([p[0] for p in pts], [p[1] for p in pts])
        if project_to and fit and project_to > pts[-1][0]:
            a, b = fit
            xs = [pts[-1][0], project_to]
            fig.add_scatter(
                x=xs, y=[a * x**b for x in xs], mode="lines", line=dict(dash="dash"), name=f"{label} (projected fit)"
            )
    ticks = sorted({int(x) for trace in fig.data for x in trace.x})
    xaxis = dict(tickmode="array", tickvals=ticks, tickformat=",d") if len(ticks) <= 6 else dict(tickformat=",d")
    fig.update_layout(
        title="Prefill latency vs visual tokens (this session)",
        xaxis=dict(title="visual tokens", **xaxis),
        yaxis_title="prefill latency (ms)",
        **_LAYOUT,
    )
    return fig


def comparison_figure(comparison: Comparison) -> go.Figure:
    """Median prefill, time to first token and end-to-end latency (ms) of each strategy with their range over the
    repeats, each metric on its own axis (prefill stays readable when reading the video dominates), and the
    prefill speedup over the baseline."""
    fig = make_subplots(rows=1, cols=len(METRICS), subplot_titles=list(METRICS.values()))
    names = [f"{strategy_label(r.strategy)}<br>{r.world_size} rank(s)" for r in comparison.runs]
    for col, metric in enumerate(METRICS, 1):
        spreads = [r.spread(metric) for r in comparison.runs]
        medians = [1e3 * s.median if s else None for s in spreads]
        fig.add_bar(
            x=names,
            y=medians,
            marker_color=[STRATEGY_COLORS[i % len(STRATEGY_COLORS)] for i in range(len(names))],
            error_y=dict(
                type="data",
                array=[1e3 * (s.high - s.median) if s else 0 for s in spreads],
                arrayminus=[1e3 * (s.median - s.low) if s else 0 for s in spreads],
            ),
            showlegend=False,
            row=1,
            col=col,
        )
        fig.update_yaxes(title_text="ms" if col == 1 else None, rangemode="tozero", tickformat=",~r", row=1, col=col)
    for name, runs in zip(names, comparison.runs):
        if runs.strategy != comparison.baseline:
            fig.add_annotation(x=name, y=1e3 * runs.spread("prefill_s").high, text=f"{comparison.speedup(runs):.2f}×",
                               yshift=12, showarrow=False, xref="x", yref="y")  # fmt: skip
    title = f"Median of {comparison.repeats} run(s) vs {strategy_label(comparison.baseline)}"
    if len(comparison.runs) == 2:
        other = next(r for r in comparison.runs if r.strategy != comparison.baseline)
        title += f" — prefill speedup {comparison.speedup(other):.2f}×"
    fig.update_layout(title=title, **{**_LAYOUT, "margin": dict(l=60, r=20, t=90, b=50)})
    return fig
