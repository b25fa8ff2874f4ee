"""The Gradio 6 page: upload a video, ask, watch the answer stream and the per-rank measurements of the run.

The page talks to the engine only through the pool's API (`submit` -> events, `health`); one engine job runs at
a time (every engine event shares the concurrency id "engine" with limit 1) and Gradio's queue is bounded.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import gradio as gr

from apbv.attention.registry import BASELINE, strategy_label
from apbv.config import Limits
from apbv.engine.api import Result
from ui import figures
from ui.controls import (
    DEFAULT_STRATEGY,
    MAX_PIXEL_CHOICES,
    SAMPLE_BY_FPS,
    SAMPLE_BY_FRAMES,
    STRATEGY_CHOICES,
    make_request,
    with_strategy,
)
from ui.examples import Example
from ui.runner import Pool, RunState, stream
from ui.text import comparison_table, error_text, progress_text, video_text
from ui.video_info import estimate_visual_tokens, probe, sampled_frames

ENGINE = dict(concurrency_id="engine", concurrency_limit=1)
CSS = "#status, #compare {min-height: 2.5em}"


def _header(health: dict) -> str:
    where = "GPUs" if health["device"] == "cuda" else "CPU ranks (gloo; timings show the mechanics, not GPU speed)"
    return (
        "# APB-V Video QA\n"
        "Ask questions about a long video. The prefill runs sequence-parallel with **APB-V** (query-aware approximate "
        "attention); compare it live with **FlashAttention on one GPU** and the other strategies.  \n"
        f"Engine: `{health['model']}` on {health['world_size']} {where}. Each question is a new request on the "
        "same video (the model does not see earlier turns)."
    )


def _history(runs: list[Result], project_to: int | None) -> object:
    """The history figure, or no figure before the first run."""
    return figures.history_figure(runs, project_to=project_to) if runs else None


def _run_figures(result: Result) -> tuple:
    return (
        figures.stage_time_figure(result.ranks),
        figures.attention_work_figure(result.ranks),
        figures.timeline_figure(result.ranks),
    )


def build_page(
    pool: Pool, examples: Sequence[Example], queue_size: int = 8, max_upload_mb: int | None = None
) -> gr.Blocks:
    """The whole page, wired to `pool`; `examples` may be empty."""
    health = pool.health()
    world_size = int(health["world_size"])
    max_prompt_tokens = int(health["max_prompt_tokens"])
    model_pixels = dict(health["video_pixels"])  # the checkpoint's per-frame bounds, as the engine reads videos

    with gr.Blocks(title="APB-V Video QA") as demo:
        chat = gr.State([])  # messages of answered turns
        runs = gr.State([])  # every Result of this session (history plot)
        last = gr.State(None)  # (Request, Result) of the last answered turn: what Compare reruns
        estimate = gr.State(None)  # estimated visual tokens of the current video and settings

        gr.Markdown(_header(health))
        with gr.Row():
            with gr.Column(scale=2):
                cap = f" (max {max_upload_mb} MB)" if max_upload_mb else ""
                video = gr.Video(label=f"Video{cap}", sources=["upload"], elem_id="video")
                video_md = gr.Markdown(elem_id="video-info")
                strategy = gr.Dropdown(STRATEGY_CHOICES, value=DEFAULT_STRATEGY, label="Attention strategy")
                ranks = gr.Dropdown(
                    list(range(1, world_size + 1)), value=world_size, label="GPUs (ranks)",
                    info="FlashAttention always runs on 1",
                )
                with gr.Row():
                    sample_by = gr.Radio([SAMPLE_BY_FRAMES, SAMPLE_BY_FPS], value=SAMPLE_BY_FRAMES, label="Sample by")
                    frames = gr.Number(32, label="frames", minimum=2, maximum=Limits().max_frames, precision=0)
                    fps = gr.Number(1.0, label="fps", minimum=0.05, maximum=30)
                max_pixels = gr.Dropdown(MAX_PIXEL_CHOICES, value=0, label="Resolution budget (pixels per frame)")
                max_new_tokens = gr.Slider(1, Limits().max_new_tokens, value=64, step=1, label="Max new tokens")
                with gr.Accordion("Advanced: APB-V parameters", open=False):
                    anchor = gr.Number(1 / 64, label="anchor ratio (anchor length / context)", minimum=0, maximum=1)
                    passing = gr.Number(
                        1 / 128, label="passing ratio (passed tokens per host / context)", minimum=0, maximum=1
                    )
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Answer", height=380, elem_id="chat")
                with gr.Row():
                    question = gr.Textbox(
                        placeholder="Ask about the video…", show_label=False, scale=5, elem_id="question"
                    )
                    ask = gr.Button("Ask", variant="primary", scale=1, elem_id="ask")
                status = gr.Markdown(elem_id="status")
                with gr.Row():
                    compare = gr.Button("Compare with FlashAttention (1 GPU)", elem_id="compare-btn")
                    sweep = gr.Button("Run all strategies", elem_id="sweep-btn")
                compare_md = gr.Markdown(elem_id="compare")
        if examples:
            gr.Examples(
                [[e.video, e.question] for e in examples], inputs=[video, question], label="Example videos"
            )
        with gr.Row():
            stage_plot = gr.Plot(label="Time per stage", elem_id="plot-stages")
            work_plot = gr.Plot(label="Attention load", elem_id="plot-work")
        with gr.Row():
            timeline_plot = gr.Plot(label="Timeline", elem_id="plot-timeline")
            compare_plot = gr.Plot(label="Comparison", elem_id="plot-compare")
        history_plot = gr.Plot(label="History", elem_id="plot-history")

        settings = [strategy, ranks, sample_by, frames, fps, max_pixels, max_new_tokens, anchor, passing]

        def describe(path, sample_by_, frames_, fps_, max_pixels_, runs_):
            if not path:
                return "", None, _history(runs_, None)
            info = probe(path)
            if info is None:
                return video_text(None, 0, None, max_prompt_tokens), None, _history(runs_, None)
            nf = int(frames_) if sample_by_ == SAMPLE_BY_FRAMES and frames_ else None
            f = None if nf else float(fps_)
            pixels = model_pixels | ({"max_pixels": int(max_pixels_)} if max_pixels_ else {})
            tokens = estimate_visual_tokens(info, nf, f, pixels)
            text = video_text(info, sampled_frames(info, nf, f), tokens, max_prompt_tokens)
            return text, tokens, _history(runs_, tokens)

        describe_io = dict(
            fn=describe,
            inputs=[video, sample_by, frames, fps, max_pixels, runs],
            outputs=[video_md, estimate, history_plot],
        )
        for trigger in (video.change, sample_by.change, frames.change, fps.change, max_pixels.change):
            trigger(**describe_io, show_progress="hidden")
        video.change(lambda: ([], [], None, ""), outputs=[chat, chatbot, last, compare_md], show_progress="hidden")

        def on_ask(path, question_, chat_, runs_, estimate_, *values) -> Iterator[dict]:
            if not path:
                yield {status: error_text("no_video", "")}
                return
            request = make_request(path, question_, *values)
            turn = [{"role": "user", "content": question_}, {"role": "assistant", "content": ""}]
            state = RunState()
            for state in stream(pool, request):
                turn[1]["content"] = state.answer or "…"
                shown = chat_ + turn if state.answer or not state.finished else chat_
                yield {chatbot: shown, status: progress_text(state)}
            if not state.ok:
                if state.answer:  # interrupted part-way: keep what was said, marked
                    turn[1]["content"] = state.answer + " … ⚠️ (interrupted)"
                    yield {chat: chat_ + turn, chatbot: chat_ + turn}
                return
            runs_ = runs_ + [state.result]
            yield {
                chat: chat_ + turn,
                question: "",
                last: (request, state.result),
                runs: runs_,
                history_plot: _history(runs_, estimate_),
                **dict(zip((stage_plot, work_plot, timeline_plot), _run_figures(state.result))),
            }

        ask_io = dict(
            fn=on_ask,
            inputs=[video, question, chat, runs, estimate, *settings],
            outputs=[chat, chatbot, question, status, last, runs, history_plot, stage_plot, work_plot, timeline_plot],
            **ENGINE,
        )
        ask.click(**ask_io)
        question.submit(**ask_io)

        def rerun(strategies_for, last_, runs_, ranks_, estimate_) -> Iterator[dict]:
            """Reruns the last turn's inputs under other strategies and compares with the baseline."""
            if last_ is None:
                yield {status: error_text("no_previous_run", "")}
                return
            request, first = last_
            results = [first]
            for s in strategies_for(request.strategy):
                state = RunState()
                for state in stream(pool, with_strategy(request, s, int(ranks_))):
                    yield {status: f"{strategy_label(s)}: {progress_text(state)}"}
                if not state.ok:
                    return
                results.append(state.result)
            runs_ = runs_ + results[1:]
            baseline = next(r for r in results if r.strategy == BASELINE)
            yield {
                status: f"Compared {len(results)} runs on the same inputs.",
                compare_md: comparison_table(results, baseline),
                compare_plot: figures.comparison_figure(results, baseline),
                runs: runs_,
                history_plot: _history(runs_, estimate_),
            }

        rerun_io = dict(
            inputs=[last, runs, ranks, estimate],
            outputs=[status, compare_md, compare_plot, runs, history_plot],
            **ENGINE,
        )
        all_strategies = [value for _, value in STRATEGY_CHOICES]

        def on_compare(*args) -> Iterator[dict]:
            yield from rerun(lambda s: [DEFAULT_STRATEGY] if s == BASELINE else [BASELINE], *args)

        def on_sweep(*args) -> Iterator[dict]:
            yield from rerun(lambda s: [x for x in all_strategies if x != s], *args)

        compare.click(on_compare, **rerun_io)
        sweep.click(on_sweep, **rerun_io)

    demo.queue(max_size=queue_size, default_concurrency_limit=1)
    return demo
