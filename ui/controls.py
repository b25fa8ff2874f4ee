"""What the page's controls offer, and how their values become an engine `Request`."""

from __future__ import annotations

from dataclasses import replace

from apbv.attention.registry import STRATEGIES, ranks_for
from apbv.engine.api import Request

# Dropdown choices as (label, value), in the registry's order.
STRATEGY_CHOICES: list[tuple[str, str]] = [(e.label, e.name) for e in STRATEGIES.values()]
DEFAULT_STRATEGY = "apbv"
SAMPLE_BY_FRAMES, SAMPLE_BY_FPS = "frame count", "frames per second"
# Per-frame pixel budgets; 0 lets the engine choose.
MAX_PIXEL_CHOICES: list[tuple[str, int]] = [
    ("engine default", 0),
    ("224 × 224 (50k px)", 224 * 224),
    ("448 × 448 (200k px)", 448 * 448),
    ("640 × 360 (230k px)", 640 * 360),
    ("1280 × 720 (920k px)", 1280 * 720),
]


def make_request(
    video_path: str,
    question: str,
    strategy: str,
    ranks: int,
    sample_by: str,
    num_frames: int,
    fps: float,
    max_pixels: int,
    max_new_tokens: int,
    anchor_ratio: float,
    passing_ratio: float,
) -> Request:
    """Builds the request for one turn (anchor/passing ratios are APB-V's; see `with_strategy`)."""
    by_frames = sample_by == SAMPLE_BY_FRAMES
    request = Request(
        video_path=video_path,
        question=question,
        num_frames=int(num_frames) if by_frames else None,
        fps=None if by_frames else float(fps),
        max_pixels=int(max_pixels) or None,
        max_new_tokens=int(max_new_tokens),
        anchor_ratio=float(anchor_ratio),
        passing_ratio=float(passing_ratio),
    )
    return with_strategy(request, strategy, int(ranks))


def with_strategy(request: Request, strategy: str, ranks: int) -> Request:
    """The same inputs under another strategy: the baseline runs on one rank, and only APB-V keeps the page's
    anchor/passing ratios (the others use their own defaults; APB's passing budget is twice APB-V's)."""
    keep = strategy == "apbv"
    return replace(
        request,
        strategy=strategy,
        world_size=ranks_for(strategy, ranks),
        anchor_ratio=request.anchor_ratio if keep else None,
        passing_ratio=request.passing_ratio if keep else None,
    )
