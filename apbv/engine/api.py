"""The engine's public data types: what a client submits and what comes back.

These are plain, JSON-serialisable dataclasses so that the page, the CLI and the benchmarks share them and so
that they cross process boundaries unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from apbv.attention.registry import STRATEGIES
from apbv.config import Limits
from apbv.errors import EmptyQuestion, InputError
from apbv.metrics import RankMetrics

REQUEST_STRATEGIES: tuple[str, ...] = tuple(STRATEGIES)  # what Request.strategy may name


@dataclass(frozen=True)
class Request:
    """One question about one video.

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
    """

    video_path: str
    question: str
    strategy: str = "apbv"
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
    history: tuple[tuple[str, str], ...] = ()

    def check(self, engine_world_size: int, limits: Limits) -> int:
        """Reject a request bad on its face (InputError subclasses); returns the ranks it runs on."""
        if not self.question or not self.question.strip():
            raise EmptyQuestion("the question is empty")
        if not all(isinstance(turn, (tuple, list)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)
                   for turn in self.history):  # fmt: skip
            raise InputError("history must be a sequence of (question, answer) pairs of strings")
        if self.strategy not in REQUEST_STRATEGIES:
            raise InputError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(REQUEST_STRATEGIES)}")
        entry = STRATEGIES[self.strategy]
        w = self.world_size or engine_world_size
        if not 1 <= w <= engine_world_size:
            raise InputError(f"world_size {w} is outside 1..{engine_world_size} (ranks in this engine)")
        if entry.single_rank and w != 1:
            raise InputError(f"{entry.label} runs on one rank: use world_size 1")
        if not 1 <= self.max_new_tokens <= limits.max_new_tokens:
            raise InputError(f"max_new_tokens {self.max_new_tokens} is outside 1..{limits.max_new_tokens}")
        if self.num_frames is not None and self.num_frames < 1:
            raise InputError(f"num_frames must be >= 1, got {self.num_frames}")
        if self.fps is not None and not self.fps > 0:
            raise InputError(f"fps must be > 0, got {self.fps}")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise InputError(f"max_pixels must be >= 1, got {self.max_pixels}")
        sampling = {"temperature": (self.temperature, 0, None), "top_p": (self.top_p, 1e-9, 1),
                    "top_k": (self.top_k, 0, None), "repetition_penalty": (self.repetition_penalty, 1e-9, None)}  # fmt: skip
        for name, (value, low, high) in sampling.items():
            if value is not None and not (low <= value and (high is None or value <= high)):
                raise InputError(f"{name} must be within [{low}, {high if high is not None else 'inf'}], got {value}")
        for name in ("anchor_ratio", "passing_ratio"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise InputError(f"{name} must be within [0, 1], got {value}")
        return w


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

    def stage_s(self, stage: str) -> float:
        """Seconds of a timeline stage ("read", "vision", "prefill", "decode"): the slowest rank's summed spans of
        that name (0 when no rank recorded it)."""
        return max((sum(s.end - s.start for s in m.spans if s.name == stage) for m in self.ranks), default=0.0)

    def summary(self) -> dict:
        """The numbers a user reads first: what ran, time to the first token and to the end (as the client saw
        them), the stages of the slowest rank, and the decode rate (tokens after the first per decode second)."""
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
            "video_cached": bool(self.ranks) and all(m.counters.get("video_cache_hit") for m in self.ranks),
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
