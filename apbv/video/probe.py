"""What a container holds, without decoding it: size, rate, frame count, and where every frame and keyframe is.

The frame count comes from the header when it has one (as decord, qwen-vl-utils' reader, takes it), else from the
packets; frame i is the i-th frame in presentation order. The packet index (presentation timestamps of the frames
and of the keyframes) lets a rank seek straight to the keyframe before the frames it needs.
"""

from __future__ import annotations

import bisect
import stat
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av

from apbv.errors import NoFrames, UnsupportedVideo, VideoNotFound, VideoUnreadable

from .sampling import MAX_RATIO

MAX_SOURCE_PIXELS = 8192 * 8192  # larger frames would take gigabytes per decoded chunk
MIN_FPS, MAX_FPS = 0.01, 1000.0  # frame rates a real video header gives (a broken one: 0, 0.0005, 90000)


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about a video, after validation. codec: the format's name ("h264", "av1"), not the
    decoder's ("libdav1d"). frame_pts: presentation timestamps (in time_base units) of frames 0..n-1 in
    presentation order, from the packets (empty when the stream has none); keyframe_pts: those of the keyframes,
    sorted."""

    frame_count: int
    fps: float
    height: int
    width: int
    codec: str
    frame_pts: tuple[int, ...] = ()
    keyframe_pts: tuple[int, ...] = ()
    time_base: Fraction = Fraction(1, 1)

    @property
    def duration_s(self) -> float:
        return self.frame_count / self.fps

    def keyframe_before(self, index: int) -> int | None:
        """Timestamp of the last keyframe at or before frame `index` (None: decode from the start)."""
        if not self.frame_pts or not self.keyframe_pts:
            return None
        pts = self.frame_pts[min(index, len(self.frame_pts) - 1)]
        at = bisect.bisect_right(self.keyframe_pts, pts) - 1
        return self.keyframe_pts[at] if at >= 0 else None


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
    """Validate a video file with PyAV (opens, has a video stream, its first frame decodes) and index its packets.

    Raises VideoNotFound, VideoUnreadable (not a video, corrupt, truncated, no usable rate), NoFrames, and
    UnsupportedVideo for frames beyond qwen-vl-utils' aspect-ratio bound (MAX_RATIO) or above MAX_SOURCE_PIXELS.
    """
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
            if first.height * first.width > MAX_SOURCE_PIXELS:
                raise UnsupportedVideo(f"{p.name} is {first.width}x{first.height}: larger than 8192x8192 frames")
            ratio = max(first.height, first.width) / min(first.height, first.width)
            if ratio > MAX_RATIO:
                raise UnsupportedVideo(f"{p.name} is {first.width}x{first.height}: an aspect ratio of {ratio:.0f}:1, "
                                       f"beyond the model's {MAX_RATIO}:1")  # fmt: skip
            container.seek(0, stream=stream)
            frame_pts, keyframe_pts = _packet_index(container, stream)
            frame_count = stream.frames or len(frame_pts)
            return VideoInfo(frame_count, fps, first.height, first.width, stream.codec_context.codec.canonical_name,
                             frame_pts, keyframe_pts, stream.time_base or Fraction(1, 1))  # fmt: skip
    except av.FFmpegError as e:
        raise VideoUnreadable(f"{p.name} is not a readable video ({reason(e)})") from e


def _packet_index(container: av.container.InputContainer, stream: av.VideoStream) -> tuple[tuple[int, ...], ...]:
    """(sorted frame timestamps, sorted keyframe timestamps) from the stream's packets; both empty when any packet
    lacks a timestamp (the decoder then reads from the start and counts)."""
    frames, keys = [], []
    for packet in container.demux(stream):
        if not packet.size:
            continue
        if packet.pts is None:
            return (), ()
        frames.append(packet.pts)
        if packet.is_keyframe:
            keys.append(packet.pts)
    return tuple(sorted(frames)), tuple(sorted(keys))


def reason(e: Exception) -> str:
    """A short one-line reason: FFmpeg's error text without errno and file name, else the first message line."""
    text = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text[:160]
