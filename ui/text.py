"""The page's words: readable errors, stage progress, run summaries and the comparison table (Markdown)."""

from __future__ import annotations

from typing import Sequence

from apbv.attention.registry import strategy_label
from apbv.engine.api import Result
from ui.figures import speedup, stage_ms
from ui.runner import STAGES, RunState
from ui.video_info import VideoInfo

# What a user should read for each engine error code (apbv.errors), and what to do about it.
ERROR_HINTS: dict[str, str] = {
    "bad_input": "The request was rejected; check the video and the settings.",
    "engine": "The engine failed on this request; please try again.",
    "empty_question": "Please type a question about the video.",
    "invalid_question": "The question contains reserved special tokens; please rephrase it.",
    "video_not_found": "The uploaded video could not be found on the server; please upload it again.",
    "video_unreadable": "This file could not be read as a video. Try an MP4 (H.264) or WebM file.",
    "no_frames": "No frames could be decoded from this video.",
    "too_few_frames": "Too few frames for this many GPUs: sample more frames or use fewer GPUs.",
    "too_many_tokens": "The video is too long for the memory budget: lower the frames, fps or resolution.",
    "layout": "The input cannot be split across this many GPUs: use fewer GPUs or more frames.",
    "busy": "The engine is busy with other requests; please try again in a moment.",
    "worker_died": "A GPU worker crashed and was restarted; please ask again.",
    "timeout": "The request took too long and was stopped; try a shorter video or fewer frames.",
    "out_of_memory": "Out of GPU memory: lower the frames, fps or resolution, or use more GPUs.",
    "cancelled": "The request was cancelled.",
    "no_video": "Upload a video (or pick an example) first.",
    "no_previous_run": "Ask a question first; the comparison reruns your last question.",
}


def error_text(code: str, message: str) -> str:
    """A readable error line: the hint for its code, then the engine's own message."""
    hint = ERROR_HINTS.get(code, "The request failed.")
    detail = f" <small>({code}: {message})</small>" if message else ""
    return f"⚠️ **{hint}**{detail}"


def progress_text(state: RunState) -> str:
    """One line: queue position or the stages with the current one marked, then a summary when done."""
    if state.error_code:
        return error_text(state.error_code, state.error_message)
    if state.result is not None:
        return result_summary(state.result)
    if state.position:
        return f"⏳ Queued — {state.position} request(s) ahead in the engine queue"
    marks = []
    for name in STAGES:
        if name not in state.stages:
            marks.append(f"○ {name}")
        elif name == state.stages[-1]:
            marks.append(f"⏳ **{name}**")
        else:
            marks.append(f"✓ {name}")
    return " → ".join(marks)


def result_summary(r: Result) -> str:
    return (
        f"✓ {strategy_label(r.strategy)} on {r.world_size} rank(s): prefill **{stage_ms(r, 'prefill'):.0f} ms**, "
        f"end to end {1e3 * r.wall_s:.0f} ms · {r.visual_tokens:,} visual tokens · {len(r.token_ids)} new tokens"
    )


def comparison_table(results: Sequence[Result], baseline: Result) -> str:
    """Markdown table: each run's latencies and prefill speedup over the baseline, and its answer."""
    rows = [
        "| strategy | ranks | prefill (ms) | end to end (ms) | prefill speedup | answer |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in [baseline, *[r for r in results if r is not baseline]]:
        answer = r.answer.replace("|", "\\|").replace("\n", " ")
        rows.append(
            f"| {strategy_label(r.strategy)} | {r.world_size} | {stage_ms(r, 'prefill'):.1f} | {1e3 * r.wall_s:.1f} "
            f"| {speedup(baseline, r):.2f}× | {answer} |"
        )
    return "\n".join(rows)


def video_text(info: VideoInfo | None, frames: int, visual_tokens: int | None, max_prompt_tokens: int) -> str:
    """What the engine will see of the uploaded video, before running."""
    if info is None:
        return error_text("video_unreadable", "")
    if visual_tokens is None:
        estimate = "token estimate unavailable"
    else:
        estimate = f"~{visual_tokens:,} visual tokens (estimate)"
    line = (
        f"{info.width}×{info.height}, {info.duration_s:.1f} s at {info.fps:.1f} fps ({info.frame_count} frames) · "
        f"sampling {frames} frames → {estimate}"
    )
    if visual_tokens is not None and visual_tokens > max_prompt_tokens:
        line += f"\n\n{error_text('too_many_tokens', f'{visual_tokens:,} > {max_prompt_tokens:,}')}"
    return line
