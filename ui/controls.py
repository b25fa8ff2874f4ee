"""What the page's controls offer, their defaults (the engine's own), and how their values become a `Request`."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Sequence

from apbv.attention.config import AttentionConfig
from apbv.attention.registry import BASELINE, STRATEGY_NAMES, ranks_for, strategy_label
from apbv.config import Limits
from apbv.engine.api import REQUEST_STRATEGIES, Request
from apbv.errors import InputError
from apbv.video import DEFAULT_FPS

DEFAULTS = Request(video_path="", question="")  # the engine's defaults are the page's
ATTENTION_DEFAULTS = AttentionConfig()
LIMITS = Limits()

# Dropdown choices as (label, value), in the engine's order.
STRATEGY_CHOICES: list[tuple[str, str]] = [(strategy_label(name), name) for name in REQUEST_STRATEGIES]
DEFAULT_STRATEGY = DEFAULTS.strategy
RATIO_STRATEGY = "apbv"  # the strategy whose anchor/passing ratios the page sets (the others keep their defaults)
SAMPLE_BY_FRAMES, SAMPLE_BY_FPS = "frame count", "frames per second"
# The engine samples at DEFAULT_FPS unless a request names a frame count; the frame box then starts at this count.
DEFAULT_SAMPLE_BY = SAMPLE_BY_FPS if DEFAULTS.num_frames is None else SAMPLE_BY_FRAMES
DEFAULT_SAMPLE_FPS = DEFAULTS.fps or DEFAULT_FPS
DEFAULT_FRAME_COUNT = DEFAULTS.num_frames or 32
# Per-frame pixel budgets; 0 lets the engine choose.
MAX_PIXEL_CHOICES: list[tuple[str, int]] = [
    ("engine default", 0),
    ("224 × 224 (50k px)", 224 * 224),
    ("448 × 448 (200k px)", 448 * 448),
    ("640 × 360 (230k px)", 640 * 360),
    ("1280 × 720 (920k px)", 1280 * 720),
]


def runs_on_one_rank(strategy: str) -> bool:
    """Whether `strategy` always runs on a single rank (the FlashAttention baseline): the page hides its ranks."""
    return ranks_for(strategy, None) == 1


def check_sampling(frames: int | None, fps: float | None) -> None:
    """Refuse sampling settings outside the page's range (InputError); `Request.check` refuses the rest."""
    if frames is not None and fps is not None:
        raise InputError("give frames or fps, not both")
    if frames is not None and not 1 <= frames <= LIMITS.max_frames:
        raise InputError(f"frames must be between 1 and {LIMITS.max_frames}, got {frames}")
    if fps is not None and not fps > 0:
        raise InputError(f"frames per second must be above 0, got {fps}")


def page_sampling(sample_by: str, num_frames: float | None, fps: float | None) -> tuple[int | None, float | None]:
    """(frames, fps) of the page's sampling controls, only the chosen one set; an empty or out-of-range box is
    refused with the page's own message (InputError)."""
    by_frames = sample_by == SAMPLE_BY_FRAMES
    if (num_frames if by_frames else fps) is None:
        raise InputError(f"enter the {'number of frames' if by_frames else 'frames per second'} to sample")
    frames, rate = (int(num_frames), None) if by_frames else (None, float(fps))
    check_sampling(frames, rate)
    return frames, rate


def build_request(
    video_path: str,
    question: str,
    strategy: str = DEFAULTS.strategy,
    ranks: int | None = DEFAULTS.world_size,
    frames: int | None = None,
    fps: float | None = None,
    max_pixels: int | None = DEFAULTS.max_pixels,
    max_new_tokens: int = DEFAULTS.max_new_tokens,
    anchor_ratio: float | None = DEFAULTS.anchor_ratio,
    passing_ratio: float | None = DEFAULTS.passing_ratio,
    history: Sequence[Sequence[str]] | None = DEFAULTS.history,
) -> Request:
    """The request of a page turn or an API call. frames / fps: sample a number of frames or at a rate (at most
    one of them; neither: the engine's default). Raises InputError for settings out of the page's range; the engine
    checks the rest (`Request.check`). Numbers may come as text ("2") from API clients."""
    ranks, frames, max_pixels, max_new_tokens = (
        as_number(name, value, int)
        for name, value in (("ranks", ranks), ("frames", frames), ("max_pixels", max_pixels),
                            ("max_new_tokens", max_new_tokens))
    )  # fmt: skip
    fps, anchor_ratio, passing_ratio = (
        as_number(name, value, float)
        for name, value in (("fps", fps), ("anchor_ratio", anchor_ratio), ("passing_ratio", passing_ratio))
    )
    if not isinstance(question, str):
        raise InputError(f"the question must be text, got {type(question).__name__}")
    check_sampling(frames, fps)
    if strategy not in REQUEST_STRATEGIES:
        raise InputError(f"unknown strategy {strategy!r}; choose one of {', '.join(REQUEST_STRATEGIES)}")
    sampling = {} if frames is None and fps is None else {"num_frames": frames, "fps": fps}
    return Request(
        video_path=video_path,
        question=question,
        strategy=strategy,
        world_size=ranks_for(strategy, ranks),
        max_pixels=max_pixels or None,
        max_new_tokens=max_new_tokens,
        anchor_ratio=anchor_ratio,
        passing_ratio=passing_ratio,
        history=tuple(tuple(turn) if isinstance(turn, list) else turn for turn in history or ()),
        **sampling,
    )


def as_number(name: str, value: object, kind: type[int] | type[float]) -> int | float | None:
    """`value` as a finite `kind` (2, 2.0 and "2" are all the integer 2); None stays None; InputError otherwise."""
    if value is None:
        return None
    try:
        number = kind(value) if not isinstance(value, bool) else None
        exact = number is not None and math.isfinite(number) and (kind is float or float(value) == number)
    except (TypeError, ValueError, OverflowError):
        exact = False
    if not exact:
        raise InputError(f"{name} must be a {'whole number' if kind is int else 'number'}, got {value!r}")
    return number


def make_request(
    video_path: str,
    question: str,
    strategy: str,
    ranks: int,
    sample_by: str,
    num_frames: int | None,
    fps: float | None,
    max_pixels: int,
    max_new_tokens: int,
    anchor_ratio: float | None,
    passing_ratio: float | None,
    history: Sequence[Sequence[str]] = (),
) -> Request:
    """The request of one page turn, from the controls' values (the anchor/passing ratios are APB-V's; see
    `with_strategy`). An empty number box is refused with the page's own message."""
    frames, fps = page_sampling(sample_by, num_frames, fps)
    request = build_request(
        video_path,
        question,
        strategy,
        int(ranks),
        frames=frames,
        fps=fps,
        max_pixels=int(max_pixels),
        max_new_tokens=int(max_new_tokens),
        anchor_ratio=anchor_ratio,
        passing_ratio=passing_ratio,
        history=history,
    )
    return with_strategy(request, strategy, request.world_size)


def measured_under(request: Request, strategy: str, ranks: int | None) -> Request:
    """The same inputs under `strategy` as a measurement (Compare, the side-by-side baseline): prefilled in full,
    never continuing a cached conversation."""
    return replace(with_strategy(request, strategy, ranks), reuse_context=False)


def with_strategy(request: Request, strategy: str, ranks: int | None) -> Request:
    """The same inputs under another strategy: the baseline runs on one rank, and only APB-V keeps the page's
    anchor/passing ratios (the others use their own defaults; APB's passing budget is twice APB-V's)."""
    keep = strategy == RATIO_STRATEGY
    return replace(
        request,
        strategy=strategy,
        world_size=ranks_for(strategy, ranks),
        anchor_ratio=request.anchor_ratio if keep else None,
        passing_ratio=request.passing_ratio if keep else None,
    )


def comparison_strategies(asked: str, every: bool) -> list[str]:
    """What a comparison measures, the asked strategy first: every registered strategy, or the asked one and the
    baseline (APB-V when the baseline itself was asked)."""
    if every:
        return [asked, *(s for s in STRATEGY_NAMES if s != asked)]
    return [asked, RATIO_STRATEGY if asked == BASELINE else BASELINE]
