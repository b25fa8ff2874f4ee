"""Reading videos the way qwen-vl-utils prepares them for Qwen2.5-VL, fast: probe and plan on one rank, decode only
the sampled frames on every rank, resize on the rank's own device.

    plan_video(path, ...)        probe the container, choose frame indices and the frame size (`VideoPlan`)
    decode_frames(plan, indices) decode just those frames (seeking to the keyframe before them, FFmpeg threads)
    resize_frames(frames, size)  torchvision's bicubic + antialias resize, as qwen-vl-utils does, on any device
    read_video(path, ...)        all of it in one process (`SampledVideo`): tests, training and single-rank tools
"""

from .decode import decode_frames
from .plan import VideoPlan, content_hash, plan_video, read_video, resize_planned
from .probe import VideoInfo, check_video_file, probe_video
from .resize import resize_frames
from .sampling import (
    DEFAULT_FPS,
    FRAME_FACTOR,
    IMAGE_FACTOR,
    IMAGE_MAX_PIXELS,
    IMAGE_MIN_PIXELS,
    RESOLUTIONS,
    VIDEO_MAX_PIXELS,
    VIDEO_MIN_PIXELS,
    VIDEO_TOTAL_PIXELS,
    SampledVideo,
    estimate_visual_tokens,
    frame_size,
    sample_frame_count,
    sample_indices,
    smart_resize,
    synthetic_video,
)

__all__ = [
    "DEFAULT_FPS", "FRAME_FACTOR", "IMAGE_FACTOR", "IMAGE_MAX_PIXELS", "IMAGE_MIN_PIXELS", "RESOLUTIONS",
    "VIDEO_MAX_PIXELS", "VIDEO_MIN_PIXELS", "VIDEO_TOTAL_PIXELS", "SampledVideo", "VideoInfo", "VideoPlan",
    "check_video_file", "content_hash", "decode_frames", "estimate_visual_tokens", "frame_size", "plan_video", "probe_video", "read_video",
    "resize_frames", "resize_planned", "sample_frame_count", "sample_indices", "smart_resize", "synthetic_video",
]  # fmt: skip
