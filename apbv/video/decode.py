"""Decode only the frames a rank needs: seek to the keyframe before the first, decode forward with FFmpeg's frame
threads, seek again past the rest of a GOP when the next wanted frame lies in a later one, convert just the wanted
frames to RGB.

Frames are matched by presentation timestamp against the probe's packet index (`VideoInfo.frame_pts`), so seeking
never shifts an index; streams without timestamps are decoded from the start and counted.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from pathlib import Path

import av
import numpy as np

from apbv.errors import NoFrames, VideoUnreadable

from .probe import VideoInfo, reason

# frames a jump to a later keyframe must skip to be worth it: a seek flushes FFmpeg's frame threads, which then
# refill their pipeline (about one frame per thread)
RESEEK_MIN_FRAMES = 16


def decode_frames(path: str | Path, info: VideoInfo, indices: Sequence[int], threads: int = 0) -> Iterator[np.ndarray]:
    """Frames `indices` (ascending, repeats allowed) of the video probed as `info`, as (H, W, 3) uint8 RGB, in
    order. threads: FFmpeg decoding threads (0: FFmpeg's choice). An index past the frames the stream really holds
    repeats its last frame (headers can promise more than there is).

    Raises VideoUnreadable (corrupt or truncated data) or NoFrames."""
    if list(indices) != sorted(indices):
        raise ValueError("frame indices must be ascending")
    if not indices:
        return
    wanted = iter(indices)
    target = next(wanted)
    last = None
    name = Path(path).name
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            stream.codec_context.thread_count = threads
            keyframe = info.keyframe_before(target)
            while True:  # decode forward from `keyframe`; jump ahead where the next frame wanted is a later GOP's
                if keyframe is not None:
                    container.seek(keyframe, stream=stream, backward=True, any_frame=False)
                keyframe = None
                for position, frame in _numbered(container.decode(stream), info):
                    if position < target:
                        continue
                    last = frame.to_ndarray(format="rgb24")
                    while target is not None and target <= position:
                        yield last
                        target = next(wanted, None)
                    if target is None:
                        return
                    ahead = info.keyframe_before(target)
                    if ahead is not None and frame.pts is not None and ahead > frame.pts:
                        skipped = bisect.bisect_left(info.frame_pts, ahead) - position - 1
                        if skipped >= RESEEK_MIN_FRAMES:  # the rest of this GOP is not wanted: jump over it
                            keyframe = ahead
                            break
                if keyframe is None:  # the stream ended
                    break
    except av.FFmpegError as e:
        raise VideoUnreadable(f"{name} is corrupt or truncated ({reason(e)})") from e
    if last is None:
        raise NoFrames(f"{name} has no decodable frames")
    while target is not None:
        yield last
        target = next(wanted, None)


def _numbered(frames: Iterator[av.VideoFrame], info: VideoInfo) -> Iterator[tuple[int, av.VideoFrame]]:
    """(frame index, frame): by timestamp in the packet index, else by counting from the start."""
    if not info.frame_pts:
        yield from enumerate(frames)
        return
    for frame in frames:
        at = bisect.bisect_left(info.frame_pts, frame.pts) if frame.pts is not None else len(info.frame_pts)
        if at < len(info.frame_pts) and info.frame_pts[at] == frame.pts:
            yield at, frame
