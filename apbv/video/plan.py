"""Which frames of a file to read and at what size (rank 0's job), and reading them all in one process."""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import CancelledError, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .decode import decode_frames
from .probe import VideoInfo, check_video_file, probe_video
from .resize import resize_frames
from .sampling import (
    FPS_MAX_FRAMES,
    IMAGE_FACTOR,
    VIDEO_MIN_PIXELS,
    SampledVideo,
    frame_size,
    sample_frame_count,
    sample_indices,
    smart_resize,
)

_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class VideoPlan:
    """A probed video and how it is sampled: frame `indices` (ascending), each resized through `sizes` (height,
    width): qwen-vl-utils' size, then the processor's where it differs. `content_hash` identifies the file's bytes
    (a changed file is a different video, whatever its path)."""

    path: str
    file_size: int
    content_hash: str
    info: VideoInfo
    indices: tuple[int, ...]
    sizes: tuple[tuple[int, int], ...]

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the frames the model sees."""
        return self.sizes[-1]

    @property
    def num_frames(self) -> int:
        return len(self.indices)

    @property
    def sample_fps(self) -> float:
        """Frames per second of the sampled sequence (second_per_grid_t = temporal_patch_size / sample_fps)."""
        return self.num_frames / self.info.frame_count * self.info.fps


def content_hash(path: str | Path, stop: threading.Event | None = None) -> str:
    """BLAKE2b of the file's bytes (hex). Raises CancelledError within a chunk of `stop` being set."""
    digest = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        while block := f.read(_HASH_CHUNK):
            if stop is not None and stop.is_set():
                raise CancelledError(f"hashing {path} was stopped")
            digest.update(block)
    return digest.hexdigest()


def plan_video(
    path: str | Path,
    *,
    num_frames: int | None = None,
    fps: float | None = None,
    max_frames: int = FPS_MAX_FRAMES,
    min_pixels: int = VIDEO_MIN_PIXELS,
    max_pixels: int | None = None,
    total_pixels: int | None = None,
    uncapped: bool = False,
    processor_bounds: tuple[int, int] | None = None,
) -> VideoPlan:
    """Probe `path` and choose its frames the way qwen-vl-utils' `fetch_video` does: `num_frames` or `fps` frames
    per second (default 2), uniformly spaced; the size from `frame_size` (max_pixels lowers qwen-vl-utils' per-frame
    cap; `uncapped` lets it exceed the cap). processor_bounds: the checkpoint processor's (min, max) pixels, which
    resizes frames outside them a second time, as transformers' video processor does.

    The file is hashed in a thread beside the probe (hashlib lets go of the GIL), once it is known to be a regular
    file; a probe that fails stops the hashing (a large file that is no video is not read through). Raises the
    probe's typed errors, and InputError for pixel bounds qwen-vl-utils refuses."""
    file, stop = check_video_file(path), threading.Event()
    with ThreadPoolExecutor(1, thread_name_prefix="content-hash") as hashing:
        digest = hashing.submit(content_hash, file, stop)
        try:
            info = probe_video(file)
        except BaseException:
            stop.set()
            raise
    n = sample_frame_count(info.frame_count, info.fps, num_frames=num_frames, fps=fps, max_frames=max_frames)
    sizes = [frame_size(info.height, info.width, n, min_pixels=min_pixels, max_pixels=max_pixels,
                        total_pixels=total_pixels, uncapped=uncapped)]  # fmt: skip
    if processor_bounds is not None and (again := smart_resize(*sizes[0], IMAGE_FACTOR, *processor_bounds)) != sizes[0]:
        sizes.append(again)
    indices = tuple(sample_indices(info.frame_count, n))
    return VideoPlan(str(path), file.stat().st_size, digest.result(), info, indices, tuple(sizes))


def resize_planned(frames: torch.Tensor, plan: VideoPlan) -> torch.Tensor:
    """Decoded frames of `plan` resized through its sizes, on their device."""
    for size in plan.sizes:
        frames = resize_frames(frames, size)
    return frames


def read_video(path: str | Path, threads: int = 0, **sampling: int | float | bool | None) -> SampledVideo:
    """`plan_video(path, **sampling)`, then every sampled frame decoded and resized on the CPU."""
    plan = plan_video(path, **sampling)
    decoded = np.stack(list(decode_frames(plan.path, plan.info, plan.indices, threads)))
    frames = resize_planned(torch.from_numpy(decoded), plan).numpy()
    return SampledVideo(frames, plan.sample_fps, plan.info.fps, plan.info.duration_s, plan.path)
