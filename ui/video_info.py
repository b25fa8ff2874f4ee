"""The page's view of an uploaded video: validated header facts and the visual-token estimate, via apbv.video."""

from __future__ import annotations

from apbv.errors import ApbvError
from apbv.video import VideoInfo, probe_video, sample_frame_count
from apbv.video import estimate_visual_tokens as _estimate

__all__ = ["VideoInfo", "probe", "sampled_frames", "estimate_visual_tokens"]


def probe(path: str) -> VideoInfo | None:
    """Header facts of a readable video; None when it is missing or not a video."""
    try:
        return probe_video(path)
    except ApbvError:
        return None


def sampled_frames(info: VideoInfo, num_frames: int | None, fps: float | None) -> int:
    """Frames the engine will sample (num_frames wins, as in `Request`)."""
    return sample_frame_count(info.frame_count, info.fps, num_frames=num_frames or None, fps=None if num_frames else fps)


def estimate_visual_tokens(info: VideoInfo, num_frames: int | None, fps: float | None, pixels: dict[str, int]) -> int:
    """Visual tokens the engine will build for these settings; `pixels`: the per-frame bounds it reads videos
    with (`ProcessorSpec.read_video_pixels`: the model's, a request's max_pixels over them)."""
    frames = sampled_frames(info, num_frames, fps)
    return int(_estimate(info.height, info.width, frames, **pixels))
