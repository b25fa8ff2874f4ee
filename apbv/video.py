"""Open, validate and sample a video the way qwen-vl-utils prepares one for Qwen2.5-VL.

Reading: every file is first probed with PyAV (container opens, has a video stream, the first frame decodes), so
garbage never reaches a reader that could misbehave on it. Frames are then read with decord (the `decord2`
package) when it is installed, with PyAV as the fallback. Sampling and resizing follow qwen-vl-utils'
`fetch_video`: `nframes` uniformly spaced frames (an even number, at least 2), each resized with `smart_resize`
to multiples of 28 pixels within per-frame bounds and an even share of a total pixel budget.
"""

from __future__ import annotations

import math
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from PIL import Image

from apbv.errors import NoFrames, UnsupportedVideo, VideoNotFound, VideoUnreadable

try:
    import decord
except ImportError:  # decord2 is optional; PyAV reads everything it reads
    decord = None

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
MAX_SOURCE_PIXELS = 8192 * 8192  # larger frames would take gigabytes per decoded batch
MIN_FPS, MAX_FPS = 0.01, 1000.0  # frame rates a real video header gives (a broken one: 0, 0.0005, 90000)

# Named resolutions of the speed test, as (height, width).
RESOLUTIONS: dict[str, tuple[int, int]] = {
    "360p": (360, 640),
    "720p": (720, 1280),
    "1080p": (1080, 1920),
    "1440p": (1440, 2560),
}

_READ_CHUNK = 32  # frames decoded per decord batch (bounds memory at source resolution)


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


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about a video, after validation."""

    frame_count: int
    fps: float
    height: int
    width: int
    codec: str

    @property
    def duration_s(self) -> float:
        return self.frame_count / self.fps


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
    max_pixels: int = VIDEO_MAX_PIXELS,
    total_pixels: int | None = None,
) -> tuple[int, int]:
    """(height, width) every sampled frame is resized to: `smart_resize` with the per-frame cap lowered to an even
    share of `total_pixels` (default: qwen-vl-utils' budget of 90% of 128k tokens), never below 1.05 * min_pixels."""
    total = VIDEO_TOTAL_PIXELS if total_pixels is None else total_pixels
    cap = max(min(max_pixels, total / num_frames * FRAME_FACTOR), int(min_pixels * 1.05))
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


def estimate_visual_tokens(height: int, width: int, num_frames: int, **pixels: int | None) -> int:
    """Visual tokens (merged 2x2 patches over temporal pairs) of `num_frames` sampled frames of a height x width
    source, resized as `read_video` does; `pixels`: `frame_size`'s min_pixels, max_pixels, total_pixels."""
    h, w = frame_size(height, width, num_frames, **pixels)
    return _ceil_even(num_frames) // FRAME_FACTOR * (h // IMAGE_FACTOR) * (w // IMAGE_FACTOR)


def check_video_file(path: str | Path) -> Path:
    """The path of a regular file (a symbolic link to one is followed), told apart from what is missing and what
    no reader may open (a directory; a FIFO or device, whose reading could block). Raises VideoNotFound or
    VideoUnreadable; opens nothing."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        broken = " (a broken symbolic link)" if p.is_symlink() else ""
        raise VideoNotFound(f"no such video file: {path}{broken}") from None
    except ValueError:  # a NUL byte, or a surrogate no file system name encodes to
        raise VideoNotFound(f"no file can have the name {path!a}") from None
    except OSError as e:  # permission denied, name too long, a loop of links
        raise VideoUnreadable(f"cannot open {path} ({e.strerror or e})") from None
    if stat.S_ISDIR(mode):
        raise VideoUnreadable(f"{path} is a directory, not a video file")
    if not stat.S_ISREG(mode):
        raise VideoUnreadable(f"{path} is not a regular file (a pipe, socket or device); give a video file")
    return p


def probe_video(path: str | Path) -> VideoInfo:
    """Validate a video file with PyAV and return its metadata. Raises the typed errors of `read_video`, and
    UnsupportedVideo for frames narrower than qwen-vl-utils' aspect-ratio bound (MAX_RATIO) or above
    MAX_SOURCE_PIXELS."""
    p = check_video_file(path)
    if p.stat().st_size == 0:
        raise VideoUnreadable(f"{p.name} is empty (0 bytes)")
    try:
        with av.open(str(p)) as container:
            if not container.streams.video:
                raise NoFrames(f"{p.name} has no video stream")
            stream = container.streams.video[0]
            first = next(container.decode(stream), None)
            if first is None:
                raise NoFrames(f"{p.name} has a video stream but no decodable frames")
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            if not MIN_FPS <= fps <= MAX_FPS:  # e.g. an MP4 whose time scale is 0
                raise VideoUnreadable(f"{p.name} has no usable frame rate ({fps:.3g} frames per second)")
            frame_count = stream.frames or _count_packets(p)
            if first.height * first.width > MAX_SOURCE_PIXELS:
                raise UnsupportedVideo(f"{p.name} is {first.width}x{first.height}: larger than 8192x8192 frames")
            ratio = max(first.height, first.width) / min(first.height, first.width)
            if ratio > MAX_RATIO:
                raise UnsupportedVideo(
                    f"{p.name} is {first.width}x{first.height}: an aspect ratio of {ratio:.0f}:1, beyond the "
                    f"model's {MAX_RATIO}:1"
                )
            return VideoInfo(frame_count, fps, first.height, first.width, stream.codec_context.name)
    except av.FFmpegError as e:
        raise VideoUnreadable(f"{p.name} is not a readable video ({_reason(e)})") from e


def read_video(
    path: str | Path,
    *,
    num_frames: int | None = None,
    fps: float | None = None,
    max_frames: int = FPS_MAX_FRAMES,
    min_pixels: int = VIDEO_MIN_PIXELS,
    max_pixels: int = VIDEO_MAX_PIXELS,
    total_pixels: int | None = None,
    backend: str | None = None,
) -> SampledVideo:
    """Validate, sample and resize a video file (see the module docstring).

    num_frames / fps: how many frames to sample (mutually exclusive; default 2 frames per second).
    backend: "decord" or "pyav" to force a reader; None tries decord first and falls back to PyAV.
    Raises VideoNotFound, VideoUnreadable (not a video, corrupt, truncated, undecodable) or NoFrames.
    """
    info = probe_video(path)
    if backend not in (None, "decord", "pyav"):
        raise ValueError(f"unknown backend {backend!r}")
    if backend == "decord" and decord is None:
        raise ValueError("backend 'decord' requested but decord is not installed")
    sampling = {"num_frames": num_frames, "fps": fps, "max_frames": max_frames}
    pixels = {"min_pixels": min_pixels, "max_pixels": max_pixels, "total_pixels": total_pixels}
    if decord is not None and backend != "pyav":
        try:
            return _sample(path, _DecordReader(path, info), sampling, pixels)
        except (RuntimeError, decord.DECORDError) as e:  # decord raises plain RuntimeError on open failures
            if backend == "decord":
                raise VideoUnreadable(f"decord cannot read {Path(path).name} ({_reason(e)})") from e
    return _sample(path, _PyAVReader(path, info), sampling, pixels)


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


class _DecordReader:
    """Frames by index through decord (frame count and fps as decord reports them, like qwen-vl-utils)."""

    def __init__(self, path: str | Path, info: VideoInfo) -> None:
        self._vr = decord.VideoReader(str(path))
        self.frame_count = len(self._vr)
        self.fps = float(self._vr.get_avg_fps()) or info.fps

    def frames(self, indices: list[int]) -> Iterator[np.ndarray]:
        for start in range(0, len(indices), _READ_CHUNK):
            yield from self._vr.get_batch(indices[start : start + _READ_CHUNK]).asnumpy()


class _PyAVReader:
    """Frames by index through one sequential PyAV decode (seeking is slow on sparse keyframes)."""

    def __init__(self, path: str | Path, info: VideoInfo) -> None:
        self._path = Path(path)
        self.frame_count = info.frame_count
        self.fps = info.fps

    def frames(self, indices: list[int]) -> Iterator[np.ndarray]:
        wanted = iter(indices)  # sorted, may repeat
        target = next(wanted, None)
        last = None
        try:
            with av.open(str(self._path)) as container:
                for i, frame in enumerate(container.decode(video=0)):
                    if target is None:
                        return
                    if i < target:
                        continue
                    last = frame.to_ndarray(format="rgb24")
                    while target == i:
                        yield last
                        target = next(wanted, None)
        except av.FFmpegError as e:
            raise VideoUnreadable(f"{self._path.name} is corrupt or truncated ({_reason(e)})") from e
        if last is None:
            raise NoFrames(f"{self._path.name} has no decodable frames")
        while target is not None:  # the header promised more frames than the stream holds
            yield last
            target = next(wanted, None)


def _sample(path: str | Path, reader: _DecordReader | _PyAVReader, sampling: dict, pixels: dict) -> SampledVideo:
    """Read the sampled frames (`sample_frame_count(**sampling)` of them) and resize them (`frame_size(**pixels)`)."""
    n = sample_frame_count(reader.frame_count, reader.fps, **sampling)
    out: np.ndarray | None = None
    for k, frame in enumerate(reader.frames(sample_indices(reader.frame_count, n))):
        if out is None:
            out = np.empty((n, *frame_size(*frame.shape[:2], n, **pixels), 3), dtype=np.uint8)
        out[k] = _resize(frame, *out.shape[1:3])
    return SampledVideo(
        frames=out,
        sample_fps=n / reader.frame_count * reader.fps,
        source_fps=reader.fps,
        duration_s=reader.frame_count / reader.fps,
        source_path=str(path),
    )


def _resize(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    if frame.shape[:2] == (height, width):
        return frame
    return np.asarray(Image.fromarray(frame).resize((width, height), Image.Resampling.BICUBIC))


def _count_packets(path: Path) -> int:
    """Frame count for containers whose header has none (e.g. Matroska): count video packets."""
    with av.open(str(path)) as container:
        return sum(1 for packet in container.demux(video=0) if packet.size)


def _reason(e: Exception) -> str:
    """A short one-line reason: FFmpeg's error text without errno and file name, else the first message line."""
    text = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text[:160]


def _ceil_even(x: float) -> int:
    return math.ceil(x / FRAME_FACTOR) * FRAME_FACTOR


def _floor_even(x: float) -> int:
    return math.floor(x / FRAME_FACTOR) * FRAME_FACTOR
