"""Plotly figures of one run's (or several runs') own measurements.

Pure functions of `Result` / `RankMetrics`: no engine, no Gradio. Times are shown in ms, attention work in TFLOP
(or key-query pairs when FLOPs were not counted). Anything not measured in the run it describes is labelled
"projected".
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Sequence

import plotly.graph_objects as go

from apbv.attention.registry import strategy_label
from apbv.engine.api import Result
from apbv.metrics import ATTENTION, COMM_WAIT, DECODE, OTHER_LAYERS, READ, VISION, RankMetrics, balance

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
_LAYOUT = dict(template="plotly_white", margin=dict(l=60, r=20, t=60, b=50), legend=dict(orientation="h", y=-0.2))


def rank_label(m: RankMetrics) -> str:
    """Axis label of one rank: its index and the device it ran on (a CPU rank is not a GPU)."""
    return f"rank {m.rank} ({m.device})"


def stage_ms(result: Result, stage: str) -> float:
    """Latency of a timeline stage in ms: the slowest rank's summed span durations (0 when never recorded)."""
    return 1e3 * result.stage_s(stage)


def stage_time_figure(ranks: Sequence[RankMetrics]) -> go.Figure:
    """Per-rank stacked bars of time per category (ms); each bar's height is the rank's total measured time."""
    extra = sorted({c for m in ranks for c in m.totals} - CATEGORY_LABELS.keys())
    x = [rank_label(m) for m in ranks]
    fig = go.Figure()
    for category in [*CATEGORY_LABELS, *extra]:
        y = [1e3 * m.totals.get(category, 0.0) for m in ranks]
        if any(y):
            fig.add_bar(
                x=x, y=y, name=CATEGORY_LABELS.get(category, category), marker_color=CATEGORY_COLORS.get(category)
            )
    fig.update_layout(barmode="stack", title="Time per stage and rank (measured)", yaxis_title="time (ms)", **_LAYOUT)
    return fig


def attention_work_figure(ranks: Sequence[RankMetrics]) -> go.Figure:
    """Per-rank attention work (TFLOP, or key-query pairs when FLOPs were not counted) with max/mean balance."""
    if all("attn_flops" in m.counters for m in ranks):
        values = [m.counters["attn_flops"] / 1e12 for m in ranks]
        unit = "attention work (TFLOP)"
    else:
        values = [m.counters.get("attn_pairs", 0.0) for m in ranks]
        unit = "attention work (query-key pairs)"
    fig = go.Figure(go.Bar(x=[rank_label(m) for m in ranks], y=values, marker_color="#2f7ed8", name=unit))
    fig.update_layout(
        title=f"Attention load per rank — balance max/mean = {balance(values):.2f}", yaxis_title=unit, **_LAYOUT
    )
    return fig


def timeline_figure(ranks: Sequence[RankMetrics]) -> go.Figure:
    """Per-rank timeline: one horizontal bar per span, starting at its start (ms) and as long as its duration."""
    by_stage: dict[str, list[tuple[str, float, float]]] = defaultdict(list)
    for m in ranks:
        for s in m.spans:
            by_stage[s.name].append((rank_label(m), 1e3 * s.start, 1e3 * (s.end - s.start)))
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
    fig.update_yaxes(autorange="reversed")
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
    power-law fit of that strategy's runs to this many visual tokens.
    """
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in results:
        series[r.strategy].append((r.visual_tokens, stage_ms(r, "prefill")))
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
    fig.update_layout(
        title="Prefill latency vs visual tokens (this session)",
        xaxis_title="visual tokens",
        yaxis_title="prefill latency (ms)",
        **_LAYOUT,
    )
    return fig


def speedup(baseline: Result, result: Result, stage: str = "prefill") -> float:
    """How many times faster `result` ran `stage` than `baseline` (nan when not measurable)."""
    t = stage_ms(result, stage)
    return stage_ms(baseline, stage) / t if t > 0 else math.nan


def comparison_figure(results: Sequence[Result], baseline: Result) -> go.Figure:
    """Prefill and end-to-end latency (ms) of each run next to the baseline, with the prefill speedup."""
    runs = [baseline, *[r for r in results if r is not baseline]]
    names = [f"{strategy_label(r.strategy)}<br>{r.world_size} rank(s)" for r in runs]
    fig = go.Figure()
    fig.add_bar(x=names, y=[stage_ms(r, "prefill") for r in runs], name="prefill (ms)", marker_color="#2f7ed8")
    fig.add_bar(x=names, y=[1e3 * r.wall_s for r in runs], name="end to end (ms)", marker_color="#bbbbbb")
    for name, r in zip(names[1:], runs[1:]):
        fig.add_annotation(x=name, y=stage_ms(r, "prefill"), text=f"{speedup(baseline, r):.2f}× prefill", yshift=12)
    title = f"Latency vs {strategy_label(baseline.strategy)}"
    if len(runs) == 2:
        title += f" — prefill speedup {speedup(baseline, runs[1]):.2f}×"
    fig.update_layout(barmode="group", title=title, yaxis_title="latency (ms)", **_LAYOUT)
    return fig
