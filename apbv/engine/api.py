"""The engine's public data types: what a client submits and what comes back.

These are plain, JSON-serialisable dataclasses so that the page, the CLI and the benchmarks share them and so
that they cross process boundaries unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from apbv.metrics import RankMetrics


@dataclass(frozen=True)
class Request:
    """One question about one video.

    world_size: ranks to use (1 runs on rank 0 only: the dense single-GPU baseline uses 1).
    num_frames / fps: frame sampling (num_frames wins when both are given); max_pixels: per-frame pixel budget.
    anchor_ratio / passing_ratio: APB-V/APB parameters (None: the paper's defaults).
    """

    video_path: str
    question: str
    strategy: str = "apbv"
    world_size: int | None = None  # None: every rank of the pool
    num_frames: int | None = 32
    fps: float | None = None
    max_pixels: int | None = None
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    anchor_ratio: float | None = None
    passing_ratio: float | None = None


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
