"""The page's layout: every component, created in place inside a `gr.Blocks` and gathered in one dataclass.

No behaviour here: `ui.handlers` says what happens, `ui.page` wires the two. Defaults and choices come from the
engine's types through `ui.controls`; number boxes carry no bounds of their own, so that an out-of-range value
reaches the handlers and gets the page's message instead of Gradio's generic one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import gradio as gr

from ui.controls import (
    ATTENTION_DEFAULTS,
    DEFAULT_FRAME_COUNT,
    DEFAULT_SAMPLE_BY,
    DEFAULT_SAMPLE_FPS,
    DEFAULT_STRATEGY,
    DEFAULTS,
    LIMITS,
    MAX_PIXEL_CHOICES,
    RATIO_STRATEGY,
    SAMPLE_BY_FPS,
    SAMPLE_BY_FRAMES,
    STRATEGY_CHOICES,
)
from ui.examples import Example
from ui.text import engine_banner, header_text

CSS = (
    "#status, #compare {min-height: 2.5em} #compare table {display: block; overflow-x: auto} "
    "#compare th, #compare td:not(:last-child) {white-space: nowrap} #compare td:last-child {min-width: 16em} "
    "#banner {background: #fff6d5; padding: 0.5em 1em; border-radius: 6px}"
)

# The controls a request is made of, in `ui.controls.make_request`'s order after video and question.
SETTINGS = ("strategy", "ranks", "sample_by", "frames", "fps", "max_pixels", "max_new_tokens", "anchor", "passing")


@dataclass
class Layout:
    """The page's components, by the names the handlers use."""

    header: gr.Markdown
    banner: gr.Markdown
    engine_timer: gr.Timer
    video: gr.Video
    video_info: gr.Markdown
    strategy: gr.Dropdown
    ranks: gr.Dropdown
    sample_by: gr.Radio
    frames: gr.Number
    fps: gr.Number
    max_pixels: gr.Dropdown
    max_new_tokens: gr.Slider
    side_by_side: gr.Checkbox
    advanced: gr.Accordion
    anchor: gr.Number
    passing: gr.Number
    chatbot: gr.Chatbot
    question: gr.Textbox
    ask: gr.Button
    stop: gr.Button
    status: gr.Markdown
    compare: gr.Button
    sweep: gr.Button
    clear: gr.Button
    compare_table: gr.Markdown
    stage_plot: gr.Plot
    work_plot: gr.Plot
    timeline_plot: gr.Plot
    compare_plot: gr.Plot
    history_plot: gr.Plot
    # Session state of the page (the API is stateless): shown messages, answered (question, answer) turns (the
    # history the next question carries), every Result (history plot), the running request's id (Stop), the
    # last answered request (what Compare re-measures) and the current visual-token estimate.
    messages: gr.State
    turns: gr.State
    runs: gr.State
    running: gr.State
    last_request: gr.State
    estimate: gr.State

    def __getitem__(self, name: str) -> gr.components.Component:
        return getattr(self, name)


def build_layout(health: dict, examples: Sequence[Example], max_upload_mb: int | None = None) -> Layout:
    """Create the page's components inside the current `gr.Blocks` (health: the pool's, when the page is built)."""
    world_size = int(health["world_size"])
    header = gr.Markdown(header_text(health))
    banner_text = engine_banner(health)
    banner = gr.Markdown(banner_text, visible=bool(banner_text), elem_id="banner")
    engine_timer = gr.Timer(1.0, active=bool(banner_text))
    with gr.Row():
        with gr.Column(scale=2):
            cap = f" (max {max_upload_mb} MB)" if max_upload_mb else ""
            video = gr.Video(label=f"Video{cap}", sources=["upload"], elem_id="video")
            video_info = gr.Markdown(elem_id="video-info")
            strategy = gr.Dropdown(STRATEGY_CHOICES, value=DEFAULT_STRATEGY, label="Attention strategy",
                                   elem_id="strategy")  # fmt: skip
            ranks = gr.Dropdown(list(range(1, world_size + 1)), value=world_size, label="GPUs (ranks)",
                                info="FlashAttention always runs on 1", elem_id="ranks")  # fmt: skip
            with gr.Row():
                sample_by = gr.Radio([SAMPLE_BY_FRAMES, SAMPLE_BY_FPS], value=DEFAULT_SAMPLE_BY, label="Sample by",
                                     elem_id="sample-by")  # fmt: skip
                by_frames = DEFAULT_SAMPLE_BY == SAMPLE_BY_FRAMES
                frames = gr.Number(DEFAULT_FRAME_COUNT, label="frames", precision=0, elem_id="frames",
                                   info=f"up to {LIMITS.max_frames}", visible=by_frames)  # fmt: skip
                fps = gr.Number(DEFAULT_SAMPLE_FPS, label="frames per second", visible=not by_frames, elem_id="fps")
            max_pixels = gr.Dropdown(MAX_PIXEL_CHOICES, value=0, label="Resolution budget (pixels per frame)")
            max_new_tokens = gr.Slider(1, LIMITS.max_new_tokens, value=DEFAULTS.max_new_tokens, step=1,
                                       label="Max new tokens", elem_id="max-new-tokens")  # fmt: skip
            side_by_side = gr.Checkbox(True, label="Also measure FlashAttention (1 GPU) for the side-by-side plots",
                                       elem_id="side-by-side")  # fmt: skip
            with gr.Accordion("Advanced: APB-V parameters", open=False,
                              visible=DEFAULT_STRATEGY == RATIO_STRATEGY) as advanced:  # fmt: skip
                anchor = gr.Number(ATTENTION_DEFAULTS.anchor_ratio, label="anchor ratio (anchor length / context)",
                                   elem_id="anchor")  # fmt: skip
                passing = gr.Number(ATTENTION_DEFAULTS.passing_ratio, elem_id="passing",
                                    label="passing ratio (passed tokens per host / context)")  # fmt: skip
        with gr.Column(scale=3):
            chatbot = gr.Chatbot(label="Conversation", height=380, elem_id="chat")
            with gr.Row():
                question = gr.Textbox(placeholder="Ask about the video…", show_label=False, scale=5,
                                      elem_id="question")  # fmt: skip
                ask = gr.Button("Ask", variant="primary", scale=1, elem_id="ask")
                stop = gr.Button("Stop", variant="stop", scale=1, visible=False, elem_id="stop")
            status = gr.Markdown(elem_id="status")
            with gr.Row():
                compare = gr.Button("Compare with FlashAttention (1 GPU)", elem_id="compare-btn")
                sweep = gr.Button("Run all strategies", elem_id="sweep-btn")
                clear = gr.Button("Clear conversation", elem_id="clear-btn")
            compare_table = gr.Markdown(elem_id="compare")
    if examples:
        gr.Examples([[e.video, e.question] for e in examples], inputs=[video, question], label="Example videos")
    with gr.Row():
        stage_plot = gr.Plot(label="Time per stage", elem_id="plot-stages")
        work_plot = gr.Plot(label="Attention load", elem_id="plot-work")
    with gr.Row():
        timeline_plot = gr.Plot(label="Timeline", elem_id="plot-timeline")
        compare_plot = gr.Plot(label="Comparison", elem_id="plot-compare")
    history_plot = gr.Plot(label="History", elem_id="plot-history")
    return Layout(
        header=header, banner=banner, engine_timer=engine_timer, video=video, video_info=video_info,
        strategy=strategy, ranks=ranks, sample_by=sample_by, frames=frames, fps=fps, max_pixels=max_pixels,
        max_new_tokens=max_new_tokens, side_by_side=side_by_side, advanced=advanced, anchor=anchor,
        passing=passing, chatbot=chatbot, question=question, ask=ask, stop=stop, status=status, compare=compare,
        sweep=sweep, clear=clear, compare_table=compare_table, stage_plot=stage_plot, work_plot=work_plot,
        timeline_plot=timeline_plot, compare_plot=compare_plot, history_plot=history_plot,
        messages=gr.State([]), turns=gr.State([]), runs=gr.State([]), running=gr.State(None),
        last_request=gr.State(None), estimate=gr.State(None),
    )  # fmt: skip
