"""Cheap facts about an uploaded video (container header only, no decoding) and the visual-token estimate."""

from __future__ import annotations

from dataclasses import dataclass

import av


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    frames: int  # frames in the file (from the header, or duration x rate when the header has no count)
    fps: float
    duration_s: float


def probe(path: str) -> VideoInfo | None:
    """Reads size, frame count, rate and duration from the container header; None when it is not a video."""
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or 0)
            if stream.duration and stream.time_base:
                duration = float(stream.duration * stream.time_base)
            else:
                duration = (container.duration or 0) / av.time_base
            frames = stream.frames or round(duration * fps)
            return VideoInfo(stream.width, stream.height, int(frames), fps, duration)
    except (av.error.FFmpegError, IndexError, OSError):
        return None


def sampled_frames(info: VideoInfo, num_frames: int | None, fps: float | None) -> int:
    """Frames the engine will sample: num_frames wins (as in `Request`), else fps x duration; capped at the file's."""
    wanted = num_frames if num_frames else round((fps or 0) * info.duration_s)
    return max(1, min(wanted, info.frames)) if info.frames else max(1, wanted)


def estimate_visual_tokens(
    info: VideoInfo, num_frames: int | None, fps: float | None, max_pixels: int | None
) -> int | None:
    """Visual tokens the engine will build for these settings, via `apbv.video` (None until that module exists)."""
    try:
        from apbv.video import estimate_visual_tokens as engine_estimate
    except ImportError:
        return None
    return int(engine_estimate(info.height, info.width, sampled_frames(info, num_frames, fps), max_pixels=max_pixels))
