"""What the page does: functions of the engine pool and the controls' values, testable without a browser.

Each handler returns (or yields, while a request runs) a dict of updates keyed by `ui.layout.Layout` field names;
`ui.page` turns the names into components. The `*_OUTPUTS` tuples list what each handler may update.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import gradio as gr

from apbv.attention.registry import BASELINE, strategy_label
from apbv.engine.api import Request, Result
from apbv.errors import InputError
from ui import figures
from ui.compare import Comparison, Step, measure
from ui.controls import (
    RATIO_STRATEGY,
    SAMPLE_BY_FRAMES,
    comparison_strategies,
    make_request,
    measured_under,
    page_sampling,
    runs_on_one_rank,
)
from ui.runner import Pool, RunState, stream, throttle
from ui.text import (
    comparison_table,
    engine_banner,
    error_text,
    header_text,
    progress_text,
    result_summary,
    video_text,
)
from ui.uploads import accepted_video
from ui.video_info import estimate_visual_tokens, probe, sampled_frames

Update = dict[str, Any]
PLOTS = ("stage_plot", "work_plot", "timeline_plot")
ENGINE_OUTPUTS = ("banner", "header", "engine_timer", "ranks")
CONTROL_OUTPUTS = ("frames", "fps", "ranks", "advanced")
DESCRIBE_OUTPUTS = ("video_info", "estimate", "history_plot")
START_OVER_OUTPUTS = ("messages", "turns", "chatbot", "last_request", "compare_table", "compare_plot", "status")
BUSY_OUTPUTS = ("ask", "stop", "compare", "sweep", "running")
ASK_OUTPUTS = (*BUSY_OUTPUTS, "status", "chatbot", "messages", "turns", "runs", "last_request", "question",
               "compare_table", *PLOTS, "history_plot")  # fmt: skip
COMPARE_OUTPUTS = (*BUSY_OUTPUTS, "status", "runs", "compare_table", "compare_plot", *PLOTS, "history_plot")
STOP_OUTPUTS = ("stop",)


def engine_status(pool: Pool) -> Update:
    """The warm-up banner, and once the engine is ready its header and ranks (the timer stops ticking)."""
    health = pool.health()
    banner = engine_banner(health)
    update = {
        "banner": gr.update(value=banner, visible=bool(banner)),
        "engine_timer": gr.Timer(active=health["state"] not in ("ready", "failed")),  # also a future "warming"
    }
    if health["state"] == "ready":
        world_size = int(health["world_size"])
        update |= {"header": header_text(health), "ranks": gr.update(choices=list(range(1, world_size + 1)))}
    return update


def show_controls(strategy: str, sample_by: str) -> Update:
    """Only the controls that apply: frames or fps, ranks unless the strategy runs on one, APB-V's ratios."""
    by_frames = sample_by == SAMPLE_BY_FRAMES
    return {
        "frames": gr.update(visible=by_frames),
        "fps": gr.update(visible=not by_frames),
        "ranks": gr.update(visible=not runs_on_one_rank(strategy)),
        "advanced": gr.update(visible=strategy == RATIO_STRATEGY),
    }


def describe(
    pool: Pool, video: str | None, sample_by: str, frames: float | None, fps: float | None, max_pixels: int,
    runs: Sequence[Result],
) -> Update:
    """What the engine will see of the video with these settings, and the visual-token estimate (None until the
    engine reports its pixel bounds)."""
    if not video:
        return {"video_info": "", "estimate": None, "history_plot": _history(runs, None)}
    health = pool.health()
    info = probe(video)
    if info is None:
        return {"video_info": video_text(None, 0, None, 0), "estimate": None, "history_plot": _history(runs, None)}
    try:
        num_frames, rate = page_sampling(sample_by, frames, fps)
    except InputError as e:
        return {"video_info": error_text(e.code, str(e)), "estimate": None, "history_plot": _history(runs, None)}
    tokens = None
    if health["state"] == "ready":  # the checkpoint's per-frame bounds are known, as the engine reads videos
        pixels = dict(health["video_pixels"]) | ({"max_pixels": int(max_pixels)} if max_pixels else {})
        try:
            tokens = estimate_visual_tokens(info, num_frames, rate, pixels)
        except InputError as e:  # a size the engine cannot read (extreme aspect ratio, budget below the minimum)
            return {"video_info": error_text(e.code, str(e)), "estimate": None, "history_plot": _history(runs, None)}
    text = video_text(info, sampled_frames(info, num_frames, rate), tokens, int(health["max_prompt_tokens"]))
    return {"video_info": text, "estimate": tokens, "history_plot": _history(runs, tokens)}


def start_over() -> Update:
    """A new video or Clear: no conversation, nothing to compare."""
    return {"messages": [], "turns": [], "chatbot": [], "last_request": None, "compare_table": "",
            "compare_plot": None, "status": ""}  # fmt: skip


def busy() -> Update:
    """While a request runs: Stop instead of Ask, no comparisons."""
    return {"ask": gr.update(interactive=False), "stop": gr.update(value="Stop", visible=True, interactive=True),
            "compare": gr.update(interactive=False), "sweep": gr.update(interactive=False)}  # fmt: skip


def idle() -> Update:
    """After a request, however it ended."""
    return {"ask": gr.update(interactive=True), "stop": gr.update(visible=False),
            "compare": gr.update(interactive=True), "sweep": gr.update(interactive=True), "running": None}


def stop(pool: Pool, running: str | None) -> Update:
    """Cancel the running request (the engine stops it at its next token); the running handler reports the end.
    Only the button says so: this answer may arrive after that report."""
    if running:
        pool.cancel(running)
    return {"stop": gr.update(value="Stopping…", interactive=False)}


def ask(
    pool: Pool, video: str | None, question: str, messages: list, turns: list, runs: list, estimate: int | None,
    side_by_side: bool, *settings: Any,
) -> Iterator[Update]:
    """One turn: the question with the conversation so far, streamed into the chat with its progress; then (when
    `side_by_side`) FlashAttention on the same inputs for the per-GPU plots beside it."""
    yield {**busy(), "status": "… Starting", "compare_table": ""}  # nothing stale stays visible
    if not video:
        yield {"status": error_text("no_video", "")}
        return
    try:
        request = make_request(accepted_video(video), question, *settings, history=turns)
    except InputError as e:
        yield {"status": error_text(e.code, str(e))}
        return
    turn = [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]
    state = RunState()
    for state in throttle(stream(pool, request)):
        turn[1]["content"] = state.answer or "…"
        shown = messages + turn if state.answer or not state.finished else messages
        yield {"running": state.request_id, "chatbot": shown, "status": _progress(pool, state)}
    if not state.ok:
        if state.answer:  # interrupted part-way: keep what was said, marked
            mark = " ■ (stopped)" if state.error_code == "cancelled" else " ⚠ (interrupted)"
            turn[1]["content"] = state.answer + mark
            yield {"messages": messages + turn, "chatbot": messages + turn}
        return
    result = state.result
    messages, turns, runs = messages + turn, [*turns, [question, result.answer]], [*runs, result]
    summary = result_summary(result)
    yield {"messages": messages, "chatbot": messages, "turns": turns, "runs": runs, "last_request": request,
           "question": "", "status": summary, **_plots([result]), "history_plot": _history(runs, estimate)}  # fmt: skip
    if not side_by_side or result.strategy == BASELINE:  # asked for, or auto's pick: it already ran as the baseline
        return
    label = strategy_label(BASELINE)
    state = RunState()
    for state in throttle(stream(pool, measured_under(request, BASELINE, 1))):
        yield {"running": state.request_id, "status": f"{summary}  \n{label} beside it: {_progress(pool, state)}"}
    if state.ok:
        runs = [*runs, state.result]
        yield {"runs": runs, **_plots([result, state.result]), "history_plot": _history(runs, estimate),
               "status": f"{summary}  \n{result_summary(state.result)}"}  # fmt: skip


def compare(
    pool: Pool, last_request: Request | None, runs: list, estimate: int | None, every: bool
) -> Iterator[Update]:
    """Re-measure the last question under the asked strategy and the baseline (`every`: all strategies) with
    warm-ups and repeats; the table, the comparison plot and the per-GPU plots of asked vs baseline."""
    if last_request is None:
        yield {"status": error_text("no_previous_run", "")}
        return
    yield {**busy(), "compare_table": "", "compare_plot": None}
    strategies = comparison_strategies(last_request.strategy, every)
    for item in measure(pool, last_request, strategies):
        if isinstance(item, Step):
            what = f"{'warm-up' if item.warmup else 'measuring'}, run {item.index} of {item.total}"
            progress = f"{strategy_label(item.strategy)} ({what}): {_progress(pool, item.state)}"
            yield {"running": item.state.request_id, "status": progress}
            continue
        comparison: Comparison = item
        measured = [r for s in comparison.runs for r in s.results]
        runs = [*runs, *measured]
        shown = [comparison.of(s).representative for s in comparison_strategies(last_request.strategy, every=False)]
        yield {"status": f"Compared {len(strategies)} strategies on the same inputs ({len(measured)} measured runs).",
               "compare_table": comparison_table(comparison), "compare_plot": figures.comparison_figure(comparison),
               "runs": runs, **_plots(shown), "history_plot": _history(runs, estimate)}  # fmt: skip


def _progress(pool: Pool, state: RunState) -> str:
    return progress_text(state, pool.health()["state"])


def _plots(results: Sequence[Result]) -> Update:
    return {
        "stage_plot": figures.stage_time_figure(results),
        "work_plot": figures.attention_work_figure(results),
        "timeline_plot": figures.timeline_figure(results),
    }


def _history(runs: Sequence[Result], project_to: int | None) -> object:
    """The history figure, or no figure before the first run."""
    return figures.history_figure(runs, project_to=project_to) if runs else None
