"""The named API of the app, for `gradio_client` and plain HTTP: `/ask` and `/compare`.

Stateless: every input is a named parameter (the conversation too, as `history`), nothing depends on an earlier
call. Both stream (text, data) pairs: /ask the answer so far with None, then the whole answer with the structured
result (`Result.to_dict()` plus its `summary()`); /compare its progress with None, then a summary line with the
comparison (`ui.compare.Comparison.to_dict()`). A failure ends the call with a `gr.Error` carrying the hint, the
error code and the engine's message.

No `from __future__ import annotations` here: `gr.api` reads the endpoints' types from their signatures.
"""

from dataclasses import replace
from typing import Iterator, Literal

import gradio as gr
from gradio import FileData

from apbv.attention.registry import STRATEGY_NAMES, strategy_label
from apbv.engine.api import REQUEST_STRATEGIES, Request, Result
from apbv.errors import ApbvError, InputError
from ui.compare import MAX_REPEATS, REPEATS, WARMUP, Comparison, measure
from ui.controls import DEFAULTS, as_number, build_request, comparison_strategies
from ui.runner import Pool, RunState, stream, throttle
from ui.text import error_line
from ui.uploads import accepted_video

StrategyName = Literal[REQUEST_STRATEGIES]  # the engine's names, listed as the parameter's choices


def result_data(result: Result) -> dict:
    """The structured result of /ask: everything measured (per-rank spans, stage totals, attention work) and the
    summary a user reads first (time to first token, prefill, decode tokens/s, the strategy that ran)."""
    return {**result.to_dict(), "summary": result.summary()}


class Endpoints:
    """The endpoints, bound to one engine pool (register them with `gr.api`)."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    def ask(
        self,
        video: FileData,
        question: str,
        strategy: StrategyName = DEFAULTS.strategy,
        ranks: int | None = DEFAULTS.world_size,
        frames: int | None = None,
        fps: float | None = None,
        max_pixels: int | None = DEFAULTS.max_pixels,
        max_new_tokens: int = DEFAULTS.max_new_tokens,
        anchor_ratio: float | None = DEFAULTS.anchor_ratio,
        passing_ratio: float | None = DEFAULTS.passing_ratio,
        history: list[tuple[str, str]] | None = None,
        reuse_context: bool | None = None,
    ) -> Iterator[tuple[str, dict | None]]:
        """Ask one question about an uploaded video. Streams (answer so far, None), then ends with (answer, result).

        ranks: None for all of the engine's (FlashAttention, "dense", runs on one); frames or fps: how to sample
        the video (at most one; neither: the engine's default rate); max_pixels: per-frame pixel budget; anchor_ratio /
        passing_ratio: APB-V's (None: the paper's); history: earlier [question, answer] turns, oldest first;
        reuse_context: continue the engine's cached K/V of the conversation so far, prefilling only the new text
        (None: for the exact strategies; `Request.reuse_context`)."""
        request = _request(video, question, strategy, ranks, frames, fps, max_pixels, max_new_tokens, anchor_ratio,
                           passing_ratio, history)  # fmt: skip
        request = replace(request, reuse_context=reuse_context)
        shown, state = None, RunState()
        for state in throttle(stream(self.pool, request)):
            if not state.finished and state.answer != shown:
                shown = state.answer
                yield shown, None
        if not state.ok:
            raise _refused(state.error_code, state.error_message)
        yield state.answer, result_data(state.result)

    def compare(
        self,
        video: FileData,
        question: str,
        strategy: StrategyName = DEFAULTS.strategy,
        ranks: int | None = DEFAULTS.world_size,
        frames: int | None = None,
        fps: float | None = None,
        max_pixels: int | None = DEFAULTS.max_pixels,
        max_new_tokens: int = DEFAULTS.max_new_tokens,
        anchor_ratio: float | None = DEFAULTS.anchor_ratio,
        passing_ratio: float | None = DEFAULTS.passing_ratio,
        history: list[tuple[str, str]] | None = None,
        strategies: list[str] | None = None,
        warmup: int = WARMUP,
        repeats: int = REPEATS,
    ) -> Iterator[tuple[str, dict | None]]:
        """Re-measure the question of /ask (same parameters) under `strategy` and each of `strategies` (None: and
        FlashAttention), `warmup` unmeasured runs then `repeats` measured ones each. Streams (progress, None), then
        ends with (summary, comparison): per strategy the median/min/max of prefill, time to first token and end to
        end (seconds), the prefill speedup over FlashAttention and every run's summary."""
        request = _request(video, question, strategy, ranks, frames, fps, max_pixels, max_new_tokens, anchor_ratio,
                           passing_ratio, history)  # fmt: skip
        names = _strategies(strategy, strategies)
        try:
            warmup, repeats = as_number("warmup", warmup, int), as_number("repeats", repeats, int)
        except InputError as e:
            raise _refused(e.code, str(e)) from None
        if warmup is None or repeats is None or not (0 <= warmup <= MAX_REPEATS and 1 <= repeats <= MAX_REPEATS):
            raise _refused(InputError.code, f"need 0 <= warmup <= {MAX_REPEATS} and 1 <= repeats <= {MAX_REPEATS}, "
                                            f"got {warmup} and {repeats}")  # fmt: skip
        step = None
        for item in measure(self.pool, request, names, warmup, repeats):
            if isinstance(item, Comparison):
                yield f"Compared {len(names)} strategies, median of {repeats} run(s) each.", item.to_dict()
                return
            if step is None or item.index != step.index:  # a run begins
                kind = "warm-up" if item.warmup else "measured"
                yield f"{strategy_label(item.strategy)}: {kind} run {item.index} of {item.total}", None
            step = item
        raise _refused(step.state.error_code, step.state.error_message)  # measure ends early on a failure


def _request(video: dict | str | None, question: str, *settings: object) -> Request:
    """The request of an API call (settings: `build_request`'s, in its order); gr.Error when it is refused."""
    try:
        return build_request(accepted_video(video), question, *settings)
    except ApbvError as e:
        raise _refused(e.code, str(e)) from None


def _strategies(asked: str, strategies: list[str] | None) -> list[str]:
    """The asked strategy first, then the others named (default: the baseline, as the page's Compare)."""
    if strategies is None:
        return comparison_strategies(asked, every=False)
    unknown = [s for s in strategies if s not in STRATEGY_NAMES]
    if unknown:
        raise _refused(InputError.code, f"unknown strategies {unknown}; choose from {list(STRATEGY_NAMES)}")
    return [asked, *dict.fromkeys(s for s in strategies if s != asked)]


def _refused(code: str, message: str) -> gr.Error:
    """The error that ends a call: readable, with its code; an expected outcome, so no traceback in the log."""
    return gr.Error(error_line(code, message), print_exception=False)
