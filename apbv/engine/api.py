"""The engine's public data types: what a client submits and what comes back.

These are plain, JSON-serialisable dataclasses so that the page, the CLI and the benchmarks share them and so
that they cross process boundaries unchanged.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field
from typing import Literal

from apbv.attention.registry import AUTO, STRATEGIES
from apbv.config import Limits
from apbv.errors import EmptyQuestion, InputError, InvalidQuestion
from apbv.metrics import RankMetrics

REQUEST_STRATEGIES: tuple[str, ...] = (AUTO, *STRATEGIES)  # what Request.strategy may name


@dataclass(frozen=True)
class Request:
    """One question about one video.

    strategy: "auto" (the engine picks the strategy and ranks predicted fastest for the prompt, up to world_size,
    `apbv.engine.cost_model`) or a registered strategy.
    world_size: ranks to use (1 runs on rank 0 only: the dense single-GPU baseline uses 1).
    num_frames / fps: frame sampling (num_frames wins when both are given; neither: 2 frames per second, as
    qwen-vl-utils); max_pixels: per-frame pixel budget, which can lower qwen-vl-utils' cap but not raise it unless
    uncapped_pixels (this project's option, e.g. for speed tests at full resolution; it also skips the checkpoint
    processor's own bounds).
    anchor_ratio / passing_ratio: APB-V/APB parameters (None: the paper's defaults).
    allow_fewer_ranks: run on fewer ranks when the video has too few temporal patches for world_size (instead of
    failing with TooFewFrames).
    history: earlier (question, answer) turns of the conversation about this video, oldest first; the model sees
    them before `question` (the chat template's earlier turns).
    reuse_context: continue the K/V the engine kept of an earlier request on this video whose tokens this prompt
    starts with (a follow-up, or another question: the video's part), prefilling only the rest; None: for the exact
    strategies (dense, ring: the same answer as a full prefill), not for the approximate ones, whose context K/V
    depend on the question they were built with (`apbv.bench.follow_ups` measures it); measurements
    (Compare, benchmarks) set False.
    `check` bounds every field: sizes by the engine's Limits, seed within [0, 2**63), texts valid Unicode.
    """

    video_path: str
    question: str
    strategy: str = AUTO
    world_size: int | None = None  # None: every rank of the pool
    num_frames: int | None = None
    fps: float | None = None
    max_pixels: int | None = None
    uncapped_pixels: bool = False
    max_new_tokens: int = 64
    temperature: float | None = None  # None: the checkpoint's generation config; 0: greedy
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int = 0
    anchor_ratio: float | None = None
    passing_ratio: float | None = None
    allow_fewer_ranks: bool = False
    reuse_context: bool | None = None
    history: tuple[tuple[str, str], ...] = ()

    def check(self, engine_world_size: int, limits: Limits) -> int:
        """Reject a request bad on its face (InputError subclasses): every field's type and range, the texts;
        returns the ranks it runs on."""
        _check_types(self)
        for text in (self.question, *(t for turn in self.history for t in turn)):
            _check_text(text)
        if not self.question.strip():
            raise EmptyQuestion("the question is empty")
        if self.strategy not in REQUEST_STRATEGIES:
            raise InputError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(REQUEST_STRATEGIES)}")
        w = engine_world_size if self.world_size is None else self.world_size
        if not 1 <= w <= engine_world_size:
            raise InputError(f"world_size {w} is outside 1..{engine_world_size} (ranks in this engine)")
        entry = STRATEGIES.get(self.strategy)
        if entry is not None and entry.single_rank and w != 1:
            raise InputError(f"{entry.label} runs on one rank: use world_size 1")
        _check_range("max_new_tokens", self.max_new_tokens, 1, limits.max_new_tokens)
        _check_range("num_frames", self.num_frames, 1, limits.max_frames)
        _check_range("max_pixels", self.max_pixels, 1, limits.max_frame_pixels)
        _check_range("seed", self.seed, 0, 2**63 - 1)
        _check_range("temperature", self.temperature, 0, math.inf)
        _check_range("top_p", self.top_p, 0, 1, low_open=True)
        _check_range("top_k", self.top_k, 0, math.inf)
        _check_range("repetition_penalty", self.repetition_penalty, 0, math.inf, low_open=True)
        for name in ("anchor_ratio", "passing_ratio"):
            _check_range(name, getattr(self, name), 0, 1)
        if self.fps is not None and not self.fps > 0:
            raise InputError(f"fps must be > 0, got {self.fps}")
        return w


_INT, _REAL, _BOOL, _STR = "an integer", "a finite number", "a boolean", "a string"
_FIELD_KINDS = {"video_path": _STR, "question": _STR, "strategy": _STR, "world_size": _INT, "num_frames": _INT,
                "fps": _REAL, "max_pixels": _INT, "uncapped_pixels": _BOOL, "max_new_tokens": _INT,
                "temperature": _REAL, "top_p": _REAL, "top_k": _INT, "repetition_penalty": _REAL, "seed": _INT,
                "anchor_ratio": _REAL, "passing_ratio": _REAL, "allow_fewer_ranks": _BOOL,
                "reuse_context": _BOOL}  # fmt: skip
_OPTIONAL = {"world_size", "num_frames", "fps", "max_pixels", "temperature", "top_p", "top_k", "repetition_penalty",
             "anchor_ratio", "passing_ratio", "reuse_context"}  # fmt: skip


def _is_kind(value: object, kind: str) -> bool:
    if kind == _BOOL:
        return isinstance(value, bool)
    if kind == _STR:
        return isinstance(value, str)
    if isinstance(value, bool):
        return False
    if kind == _INT:
        return isinstance(value, numbers.Integral)
    return isinstance(value, numbers.Real) and math.isfinite(value)


def _check_types(request: Request) -> None:
    for name, kind in _FIELD_KINDS.items():
        value = getattr(request, name)
        if not (value is None and name in _OPTIONAL) and not _is_kind(value, kind):
            raise InputError(f"{name} must be {kind}{' or None' if name in _OPTIONAL else ''}, got {value!r:.80}")
    if not isinstance(request.history, (tuple, list)) or not all(
        isinstance(turn, (tuple, list)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)
        for turn in request.history
    ):
        raise InputError("history must be a sequence of (question, answer) pairs of strings")


def _check_text(text: str) -> None:
    """Text the tokenizer can take: encodable as UTF-8 (no lone surrogate, as argv's undecodable bytes become)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InvalidQuestion(f"the text is not valid Unicode (a lone surrogate at character {err.start})") from None


def _check_range(name: str, value: float | None, low: float, high: float, low_open: bool = False) -> None:
    """None passes (the default applies); else low <= value <= high (low < value when low_open)."""
    if value is None:
        return
    if not ((low < value) if low_open else (low <= value)) or value > high:
        raise InputError(f"{name} must be within {'(' if low_open else '['}{low}, {high}], got {value}")


@dataclass
class Result:
    """The finished answer with everything measured while producing it."""

    request_id: str
    answer: str
    token_ids: list[int]
    strategy: str
    world_size: int
    visual_tokens: int
    n_context: int
    n_query: int
    wall_s: float  # submit -> last token, as seen by the client
    ranks: list[RankMetrics] = field(default_factory=list)
    first_token_s: float | None = None  # submit -> first token, as seen by the client (None: no token)
    choice: dict | None = None  # for strategy "auto": what was picked, predicted seconds, the candidates

    def stage_s(self, stage: str) -> float:
        """Seconds of a timeline stage ("read", "vision", "prefill", "decode"): the slowest rank's summed spans of
        that name (0 when no rank recorded it)."""
        return max((sum(s.end - s.start for s in m.spans if s.name == stage) for m in self.ranks), default=0.0)

    def summary(self) -> dict:
        """The numbers a user reads first: what ran, time to the first token and to the end (as the client saw
        them), the stages of the slowest rank, the decode rate (tokens after the first per decode second), whether
        the video was neither read nor encoded (video cache or a continued conversation) and how many prompt
        tokens a continued conversation held."""
        decode, tokens = self.stage_s("decode"), len(self.token_ids)
        return {
            "strategy": self.strategy,
            "world_size": self.world_size,
            "visual_tokens": self.visual_tokens,
            "prompt_tokens": self.n_context + self.n_query,
            "new_tokens": tokens,
            "time_to_first_token_s": self.first_token_s,
            "wall_s": self.wall_s,
            **{f"{stage}_s": self.stage_s(stage) for stage in ("read", "vision", "prefill", "decode")},
            "decode_tokens_per_s": (tokens - 1) / decode if tokens > 1 and decode > 0 else None,
            "video_cached": bool(self.ranks) and all(m.counters.get("video_cache_hit") or
                                                     m.counters.get("context_reused_tokens") for m in self.ranks),
            "context_reused_tokens": int(self.ranks[0].counters.get("context_reused_tokens", 0)) if self.ranks else 0,
            "auto_predicted_s": self.choice["predicted_s"] if self.choice else None,
        }

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "Result":
        d = dict(d)
        d["ranks"] = [RankMetrics.from_dict(r) for r in d["ranks"]]
        return Result(**d)


EventKind = Literal["queued", "stage", "token", "result", "error", "cancelled"]


@dataclass(frozen=True)
class Event:
    """A step of a request's life, streamed to the client in order.

    queued: data = {"position": int}; stage: data = {"name": "read" | "vision" | "prefill" | "decode"};
    token: data = {"text": str (the new text piece), "token_id": int}; result: data = Result.to_dict();
    error: data = {"code": str, "message": str}; cancelled: data = {}.
    Exactly one of result / error / cancelled ends every request.
    """

    kind: EventKind
    data: dict
