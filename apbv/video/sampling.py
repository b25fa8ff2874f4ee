"""qwen-vl-utils' sampling rules (vision_process.py, 0.0.14): how many frames, which ones, and at what size.

`nframes` uniformly spaced frames (an even number, at least 2; 2 per second by default), each resized with
`smart_resize` to multiples of 28 pixels within per-frame bounds, the upper one capped by an even share of a total
pixel budget. Also `SampledVideo`, frames already read, and random frames for the speed benchmarks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from apbv.errors import InputError

# qwen-vl-utils' constants (vision_process.py).
IMAGE_FACTOR = 28  # patch_size * merge_size
FRAME_FACTOR = 2  # temporal_patch_size
IMAGE_MIN_PIXELS = 4 * 28 * 28
IMAGE_MAX_PIXELS = 16384 * 28 * 28
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
VIDEO_TOTAL_PIXELS = int(128000 * 28 * 28 * 0.9)
DEFAULT_FPS = 2.0
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
MAX_RATIO = 200

# Named resolutions of the speed test, as (height, width).
RESOLUTIONS: dict[str, tuple[int, int]] = {
    "360p": (360, 640),
    "720p": (720, 1280),
    "1080p": (1080, 1920),
    "1440p": (1440, 2560),
}


@dataclass
class SampledVideo:
    """Sampled, resized frames of one video, ready for `apbv.inputs.patchify`.

    sample_fps: frames per second of the sampled sequence (so second_per_grid_t = temporal_patch_size / sample_fps).
    """

    frames: np.ndarray  # (T, H, W, 3) uint8, T even, H and W multiples of 28
    sample_fps: float
    source_fps: float
    duration_s: float
    source_path: str | None = None

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of every frame."""
        return int(self.frames.shape[1]), int(self.frames.shape[2])


def smart_resize(
    height: int,
    width: int,
    factor: int = IMAGE_FACTOR,
    min_pixels: int = IMAGE_MIN_PIXELS,
    max_pixels: int = IMAGE_MAX_PIXELS,
) -> tuple[int, int]:
    """qwen-vl-utils' rule: sides multiples of `factor`, area within [min_pixels, max_pixels], aspect kept."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(f"aspect ratio must be below {MAX_RATIO}, got {max(height, width) / min(height, width):.1f}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def frame_size(
    height: int,
    width: int,
    num_frames: int,
    *,
    min_pixels: int = VIDEO_MIN_PIXELS,
    max_pixels: int | None = None,
    total_pixels: int | None = None,
    uncapped: bool = False,
) -> tuple[int, int]:
    """(height, width) every sampled frame is resized to, as qwen-vl-utils' `fetch_video` decides it: `smart_resize`
    with the per-frame cap max(min(VIDEO_MAX_PIXELS, total_pixels / num_frames * 2), 1.05 * min_pixels) (total: 90%
    of 128k tokens by default). A given `max_pixels` can lower the cap, never raise it, unless `uncapped` (this
    project's option for runs beyond qwen-vl-utils' sizes, e.g. the speed tests at full 1440p).

    Raises InputError where qwen-vl-utils refuses: max_pixels below min_pixels."""
    total = VIDEO_TOTAL_PIXELS if total_pixels is None else total_pixels
    cap = max(min(VIDEO_MAX_PIXELS, total / num_frames * FRAME_FACTOR), int(min_pixels * 1.05))
    if max_pixels is not None:
        cap = max_pixels if uncapped else min(max_pixels, cap)
    if cap < min_pixels:
        raise InputError(f"max_pixels {int(cap)} is below the minimum of {min_pixels} pixels per frame")
    return smart_resize(height, width, IMAGE_FACTOR, min_pixels, cap)


def sample_frame_count(
    frame_count: int,
    video_fps: float,
    *,
    num_frames: int | None = None,
    fps: float | None = None,
    max_frames: int = FPS_MAX_FRAMES,
) -> int:
    """qwen-vl-utils' `smart_nframes`: `num_frames` rounded to even, or `fps` frames per second of video
    (default 2) kept within [4, max_frames]; never more than the video has (floored to even), never below 2."""
    if num_frames is not None and fps is not None:
        raise ValueError("pass num_frames or fps, not both")
    if num_frames is not None:
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        n = round(num_frames / FRAME_FACTOR) * FRAME_FACTOR
    else:
        fps = DEFAULT_FPS if fps is None else fps
        if fps <= 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        min_frames = _ceil_even(FPS_MIN_FRAMES)
        n = min(max(frame_count / video_fps * fps, min_frames), _floor_even(min(max_frames, frame_count)))
    return max(FRAME_FACTOR, min(_floor_even(n), _floor_even(max_frames), _floor_even(frame_count)))


def sample_indices(frame_count: int, n: int) -> list[int]:
    """`n` uniformly spaced frame indices from first to last (qwen-vl-utils: linspace, rounded)."""
    return np.linspace(0, frame_count - 1, n).round().astype(np.int64).tolist()


def estimate_visual_tokens(height: int, width: int, num_frames: int, **pixels: int | bool | None) -> int:
    """Visual tokens (merged 2x2 patches over temporal pairs) of `num_frames` sampled frames of a height x width
    source, resized as `plan_video` does; `pixels`: `frame_size`'s min_pixels, max_pixels, total_pixels, uncapped."""
    h, w = frame_size(height, width, num_frames, **pixels)
    return _ceil_even(num_frames) // FRAME_FACTOR * (h // IMAGE_FACTOR) * (w // IMAGE_FACTOR)


def synthetic_video(
    resolution: str | tuple[int, int],
    num_frames: int,
    seed: int = 0,
    *,
    fps: float = DEFAULT_FPS,
) -> SampledVideo:
    """Random RGB frames at a named resolution ("360p" ... "1440p") or (height, width), resized like the speed
    test's list of PIL frames: qwen-vl-utils' per-image bounds (no total budget), frame count padded to even by
    repeating the last frame. 1440p -> 1428x2548 -> 51x91 = 4641 visual tokens per temporal patch."""
    height, width = RESOLUTIONS[resolution] if isinstance(resolution, str) else resolution
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    out_h, out_w = smart_resize(height, width, IMAGE_FACTOR, IMAGE_MIN_PIXELS, IMAGE_MAX_PIXELS)
    rng = np.random.default_rng(seed)
    frames = np.empty((_ceil_even(num_frames), out_h, out_w, 3), dtype=np.uint8)
    for i in range(num_frames):
        frames[i] = _resize(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), out_h, out_w)
    frames[num_frames:] = frames[num_frames - 1]
    return SampledVideo(frames, sample_fps=fps, source_fps=fps, duration_s=num_frames / fps, source_path=None)


def _resize(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    if frame.shape[:2] == (height, width):
        return frame
    return np.asarray(Image.fromarray(frame).resize((width, height), Image.Resampling.BICUBIC))


def _ceil_even(x: float) -> int:
    return math.ceil(x / FRAME_FACTOR) * FRAME_FACTOR


def _floor_even(x: float) -> int:
    return math.floor(x / FRAME_FACTOR) * FRAME_FACTOR
