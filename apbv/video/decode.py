"""Decode only the frames a rank needs: seek to the keyframe before the first, decode forward with FFmpeg's frame
threads, seek again past the rest of a GOP when the next wanted frame lies in a later one (`seek_segments`), let
FFmpeg's H.264 and HEVC decoders skip the unwanted frames no other frame refers to (`SKIPPING_DECODERS`: exact,
nothing decodes from them), convert just the wanted frames to RGB.

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
# FFmpeg decoders that read skip_frame with every packet (libdav1d reads it once, when it opens, and would then drop
# wanted frames too) and whose NONREF skips only pictures no other picture refers to
SKIPPING_DECODERS = frozenset({"h264", "hevc"})


def seek_segments(indices: Sequence[int], info: VideoInfo) -> list[list[int]]:
    """`indices` (ascending) cut where decoding forward from one wanted frame to the next would pass
    RESEEK_MIN_FRAMES or more unwanted frames before the next one's keyframe: each segment is decoded from the
    keyframe before its first index, with one seek (both decoders read this way). Streams without a packet index
    make one segment."""
    segments: list[list[int]] = []
    for index in indices:
        if segments and not _worth_a_seek(segments[-1][-1], index, info):
            segments[-1].append(index)
        else:
            segments.append([index])
    return segments


def _worth_a_seek(previous: int, index: int, info: VideoInfo) -> bool:
    keyframe = info.keyframe_before(index)
    if keyframe is None:
        return False
    return bisect.bisect_left(info.frame_pts, keyframe) - previous - 1 >= RESEEK_MIN_FRAMES


def decode_frames(path: str | Path, info: VideoInfo, indices: Sequence[int], threads: int = 0) -> Iterator[np.ndarray]:
    """Frames `indices` (ascending, repeats allowed) of the video probed as `info`, as (H, W, 3) uint8 RGB, in
    order. threads: FFmpeg decoding threads (0: FFmpeg's choice). An index past the frames the stream really holds
    repeats its last frame (headers can promise more than there is).

    Raises VideoUnreadable (corrupt or truncated data) or NoFrames."""
    if list(indices) != sorted(indices):
        raise ValueError("frame indices must be ascending")
    if not indices:
        return
    last, given = None, 0
    name = Path(path).name
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            stream.codec_context.thread_count = threads
            skips = _skips_exactly(stream.codec_context)
            for segment in seek_segments(indices, info):
                keyframe = info.keyframe_before(segment[0])
                if keyframe is not None:
                    container.seek(keyframe, stream=stream, backward=True, any_frame=False)
                wanted = iter(segment)
                target = next(wanted)
                tail = None  # the latest frame decoded: where the stream ends, it stands in for the rest
                frames = _decode_skipping(container, stream, _must_decode(segment, info) if skips else None)
                for position, frame in _numbered(frames, info):
                    tail = frame
                    if position < target:
                        continue
                    last = frame.to_ndarray(format="rgb24")
                    while target is not None and target <= position:
                        yield last
                        given += 1
                        target = next(wanted, None)
                    if target is None:
                        break
                if target is not None:  # the stream ended
                    if tail is not None:
                        last = tail.to_ndarray(format="rgb24")
                    break
    except av.FFmpegError as e:
        raise VideoUnreadable(f"{name} is corrupt or truncated ({reason(e)})") from e
    if last is None:
        raise NoFrames(f"{name} has no decodable frames")
    for _ in range(len(indices) - given):
        yield last


def _skips_exactly(codec: av.codec.context.CodecContext) -> bool:
    """Whether this decoder may skip unwanted non-reference frames without changing any other: one of
    SKIPPING_DECODERS, and for HEVC no temporal sub-layers (a sub-layer's non-reference picture may be referred to
    from a higher one)."""
    return codec.name in SKIPPING_DECODERS and (codec.name != "hevc" or _hevc_sub_layers(codec.extradata) == 1)


def _must_decode(segment: Sequence[int], info: VideoInfo) -> frozenset[int] | None:
    """The timestamps of the frames that must be decoded: `segment`'s and the stream's last (the stand-in where the
    stream ends early); any other frame may be skipped where nothing refers to it. None, decode everything: no
    packet index, or an index past it."""
    if not info.frame_pts or segment[-1] >= len(info.frame_pts):
        return None
    return frozenset(info.frame_pts[i] for i in (*segment, -1))


def _hevc_sub_layers(extradata: bytes | None) -> int | None:
    """numTemporalLayers of an HEVC decoder configuration record (hvcC, ISO/IEC 14496-15 8.3.3.1.2: byte 21, bits
    3-5); None where the extradata is no such record (Annex B parameter sets) or says 0 (unknown)."""
    if not extradata or len(extradata) < 23 or extradata[0] != 1:
        return None
    return (extradata[21] >> 3) & 7 or None


def _decode_skipping(
    container: av.container.InputContainer, stream: av.VideoStream, wanted_pts: frozenset[int] | None
) -> Iterator[av.VideoFrame]:
    """The stream's frames from where the container stands, as `container.decode(stream)` gives them, except that
    each packet whose timestamp is not wanted is decoded with skip_frame NONREF (FFmpeg's H.264 and HEVC decoders
    then skip it when no other picture refers to it). FFmpeg's frame threads take the setting with each packet."""
    codec = stream.codec_context
    for packet in container.demux(stream):
        unwanted = wanted_pts is not None and packet.pts is not None and packet.pts not in wanted_pts
        codec.skip_frame = "NONREF" if unwanted else "DEFAULT"
        yield from packet.decode()


def _numbered(frames: Iterator[av.VideoFrame], info: VideoInfo) -> Iterator[tuple[int, av.VideoFrame]]:
    """(frame index, frame): by timestamp in the packet index, else by counting from the start."""
    if not info.frame_pts:
        yield from enumerate(frames)
        return
    for frame in frames:
        at = bisect.bisect_left(info.frame_pts, frame.pts) if frame.pts is not None else len(info.frame_pts)
        if at < len(info.frame_pts) and info.frame_pts[at] == frame.pts:
            yield at, frame
