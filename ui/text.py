"""The page's words: readable errors, stage progress with elapsed times, run summaries, the comparison table and
the engine banner (Markdown)."""

from __future__ import annotations

from apbv.attention.registry import strategy_label
from apbv.engine.api import Result
from ui.compare import METRICS, Comparison, Spread
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
    "unsupported_video": "This video's frames cannot be read safely (too large, or too narrow): try another file.",
    "no_frames": "No frames could be decoded from this video.",
    "too_few_frames": "Too few frames for this many GPUs: sample more frames or use fewer GPUs.",
    "too_many_tokens": "The video is too long for the memory budget: lower the frames, fps or resolution.",
    "question_too_long": "The question and the conversation so far are too long: shorten them or clear the conversation.",
    "invalid_world_size": "This machine cannot run that many GPUs (or processes): choose fewer.",
    "layout": "The input cannot be split across this many GPUs: use fewer GPUs or more frames.",
    "busy": "The engine is busy with other requests; please try again in a moment.",
    "worker_died": "A GPU worker crashed and was restarted; please ask again.",
    "timeout": "The request took too long and was stopped; try a shorter video or fewer frames.",
    "out_of_memory": "Out of GPU memory: lower the frames, fps or resolution, or use more GPUs.",
    "cancelled": "Stopped.",
    "footage_unavailable": "The real footage of the training videos is not installed on this server.",
    "no_video": "Upload a video (or pick an example) first.",
    "no_previous_run": "Ask a question first; the comparison re-measures your last question.",
}
# Codecs Chromium, Firefox and Safari play; others may show "not playable" in the page although the engine reads them.
BROWSER_CODECS = frozenset({"h264", "vp8", "vp9", "av1"})
ANSWER_CHARS = 80  # of each answer in the comparison table (the chat has them whole)
ENGINE_STATES = {
    "starting": "… **The engine is starting** (loading the model on every rank); questions asked now wait for it.",
    "restarting": "… **The engine is restarting** after a failure; questions asked now wait for it.",
    "failed": "⚠️ **The engine did not start**",
}


def error_line(code: str, message: str) -> str:
    """A plain-text error: the hint for its code, then the engine's own message."""
    hint = ERROR_HINTS.get(code, "The request failed.")
    return f"{hint} ({code}: {message})" if message else hint


def error_text(code: str, message: str) -> str:
    """A readable error line (Markdown): the hint for its code, then the engine's own message."""
    if code == "cancelled":
        return "■ **Stopped.**"
    hint = ERROR_HINTS.get(code, "The request failed.")
    detail = f" <small>({code}: {message})</small>" if message else ""
    return f"⚠️ **{hint}**{detail}"


def format_duration(seconds: float | None) -> str:
    """A duration as people read it: "0.42 ms", "33.2 ms", "118 ms", "1.25 s", "12.4 s", "2 min 05 s"."""
    if seconds is None:
        return "–"
    ms = seconds * 1e3
    if ms < 10:
        return f"{ms:.2f} ms"
    if ms < 100:
        return f"{ms:.1f} ms"
    if ms < 1000:
        return f"{ms:.0f} ms"
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s"


def progress_text(state: RunState, engine_state: str = "ready") -> str:
    """One line: waiting for the engine, the queue position, or the stages with their elapsed times; then a
    summary or the error once the request has ended."""
    if state.error_code:
        return error_text(state.error_code, state.error_message)
    if state.result is not None:
        return result_summary(state.result)
    if not state.stages:
        if engine_state != "ready":
            return "… Waiting for the engine to start"
        if state.position:
            return f"… Queued — {state.position} request(s) ahead in the engine queue"
        return "… Starting"
    elapsed = dict(state.stage_elapsed())
    marks = []
    for name in STAGES:
        if name not in elapsed:
            marks.append(f"○ {name}")
        elif name == state.stages[-1][0]:
            marks.append(f"▶ **{name}** {format_duration(elapsed[name])}")
        else:
            marks.append(f"✓ {name} {format_duration(elapsed[name])}")
    return " → ".join(marks)


def result_summary(r: Result) -> str:
    """What ran and how fast: time to first token (as the client saw it) next to prefill, end to end, decode rate."""
    s = r.summary()
    rate = f" · decode {s['decode_tokens_per_s']:.0f} tokens/s" if s["decode_tokens_per_s"] else ""
    return (
        f"✓ {strategy_label(r.strategy)} on {r.world_size} rank(s): first token after "
        f"**{format_duration(s['time_to_first_token_s'])}** (prefill {format_duration(s['prefill_s'])}) · end to end "
        f"{format_duration(s['wall_s'])}{rate} · {s['prompt_tokens']:,} prompt tokens ({r.visual_tokens:,} visual) · "
        f"{s['new_tokens']} new tokens{_reuse_note(s)}{_auto_note(r)}"
    )


def _reuse_note(summary: dict) -> str:
    reused = summary["context_reused_tokens"]
    return f" · {reused:,} of them continued from the conversation (video not decoded or encoded)" if reused else ""


def _auto_note(r: Result) -> str:
    """Why auto ran what it ran (nothing for a strategy the user chose)."""
    if r.choice is None:
        return ""
    if r.choice["predicted_s"] is None:
        return " · picked by Auto (no speed calibration for this device: the single-GPU baseline)"
    return f" · picked by Auto (predicted {format_duration(r.choice['predicted_s'])}, fastest of {len(r.choice['candidates'])})"


def _spread(spread: Spread | None) -> str:
    if spread is None:
        return "–"
    if spread.low == spread.high:
        return format_duration(spread.median)
    low, high = format_duration(spread.low), format_duration(spread.high)
    return f"{format_duration(spread.median)} <small>({low}–{high})</small>"


def _shorter(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def comparison_table(comparison: Comparison) -> str:
    """Markdown table: each strategy's prefill speedup, median latencies (range over the repeats) and answer."""
    header = " | ".join(["strategy", "ranks", "prefill speedup", *METRICS.values(), "answer"])
    rows = [f"| {header} |", "|---|---:|---:|" + "---:|" * len(METRICS) + "---|"]
    for runs in comparison.runs:
        answer = _shorter(runs.answer.replace("\n", " "), ANSWER_CHARS).replace("|", "\\|")
        cells = [strategy_label(runs.strategy), str(runs.world_size), f"{comparison.speedup(runs):.2f}×",
                 *(_spread(runs.spread(m)) for m in METRICS), answer]  # fmt: skip
        rows.append(f"| {' | '.join(cells)} |")
    note = (
        f"Median of {comparison.repeats} run(s) after {comparison.warmup} warm-up(s) per strategy, range in brackets; "
        f"speedup: {strategy_label(comparison.baseline)}'s median prefill over each strategy's."
    )
    return "\n".join(rows) + f"\n\n<small>{note}</small>"


def video_text(info: VideoInfo | None, frames: int, visual_tokens: int | None, max_prompt_tokens: int) -> str:
    """What the engine will see of the uploaded video, before running."""
    if info is None:
        return error_text("video_unreadable", "")
    estimate = "token estimate once the engine is ready" if visual_tokens is None else (
        f"~{visual_tokens:,} visual tokens (estimate)"
    )
    line = (
        f"{info.width}×{info.height}, {info.duration_s:.1f} s at {info.fps:.1f} fps ({info.frame_count} frames) · "
        f"sampling {frames} frames → {estimate}"
    )
    if info.codec not in BROWSER_CODECS:
        line += f"\n\nYour browser may not play {info.codec} video, but the engine reads it: you can ask about it."
    if visual_tokens is not None and visual_tokens > max_prompt_tokens:
        line += f"\n\n{error_text('too_many_tokens', f'{visual_tokens:,} > {max_prompt_tokens:,}')}"
    return line


def engine_banner(health: dict) -> str:
    """The banner while the engine is not ready ("" once it is)."""
    state = health["state"]
    if state == "ready":
        return ""
    text = ENGINE_STATES.get(state, f"… **The engine is {state}**; questions asked now wait for it.")
    return f"{text}: {health['start_error']}" if state == "failed" and health.get("start_error") else text


def header_text(health: dict) -> str:
    where = "GPUs" if health["device"] == "cuda" else "CPU ranks (gloo; timings show the mechanics, not GPU speed)"
    return (
        "# APB-V Video QA\n"
        "Ask questions about a long video. The prefill runs sequence-parallel with **APB-V** (query-aware approximate "
        "attention); compare it live with **FlashAttention on one GPU** and the other strategies.  \n"
        f"Engine: `{health['model']}` on {health['world_size']} {where}. Follow-up questions carry the conversation; "
        "a new video or **Clear** starts over."
    )
