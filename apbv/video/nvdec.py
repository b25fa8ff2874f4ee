"""Optional: decode on the GPU's video engines (NVDEC) through NVIDIA's PyNvVideoCodec (`pip install
pynvvideocodec`; it brings its own demuxer and uses the driver's libnvcuvid).

Frames come out as RGB on the GPU, so nothing decoded crosses PCIe. A rank's frames are split at keyframes into
up to `SESSIONS` runs, each decoded forward by its own decoder session in a thread (a GPU has several NVDEC
engines), seeking again past unwanted GOPs where the CPU reader would (`decode.seek_segments`). PyNvVideoCodec's
random access by index seeks again for every frame, which on a 10 s GOP decoded 64 sampled frames 2.5x slower
than FFmpeg on 16 cores (measured 2026-12-03), so it is not used.

NVDEC converts YUV to RGB with its own kernels, so pixels can differ from FFmpeg's conversion (the CPU path, which
qwen-vl-utils' readers share) by a level or two: it is an option (`--video-decoder nvdec`), not the default. Where
it cannot serve a video (not installed, no GPU, a codec NVDEC lacks, a stream whose frame count differs from the
probe's) the rank decodes on the CPU instead and says why once.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from apbv.errors import VideoUnreadable

from .decode import seek_segments
from .probe import VideoInfo

CODECS = frozenset({"h264", "hevc", "av1", "vp9", "vp8", "mpeg2video", "mpeg4", "vc1", "mjpeg"})
SESSIONS = 4  # decoder sessions per rank at most (one per run of GOPs)
_BATCH = 8  # frames per call of a session's forward decoding
_warned: set[str] = set()


def nvdec_unavailable(info: VideoInfo, device: torch.device) -> str | None:
    """Why NVDEC cannot decode this video on `device` (None: it can be tried)."""
    if device.type != "cuda":
        return "the rank is not on a GPU"
    if importlib.util.find_spec("PyNvVideoCodec") is None:
        return "PyNvVideoCodec is not installed"
    if info.codec not in CODECS:
        return f"NVDEC does not decode {info.codec}"
    return None


def say_once(reason: str) -> None:
    """Tell the operator once per reason that a rank fell back to the CPU decoder."""
    if reason not in _warned:
        _warned.add(reason)
        print(f"video decoder: CPU instead of NVDEC ({reason})", file=sys.stderr, flush=True)


def open_nvdec(path: str | Path, info: VideoInfo, device: torch.device):
    """An NVDEC decoder session of the file on `device`, giving interleaved RGB in device memory. Raises
    VideoUnreadable where NVDEC cannot open it or counts its frames unlike the probe (the caller then decodes on
    the CPU)."""
    try:
        import PyNvVideoCodec as nvc

        decoder = nvc.SimpleDecoder(str(path), gpu_id=device.index or 0, use_device_memory=True,
                                    cuda_stream=torch.cuda.current_stream(device).cuda_stream,
                                    output_color_type=nvc.OutputColorType.RGB)  # fmt: skip
    except Exception as e:  # noqa: BLE001 - a broken install (no libnvcuvid), or its bindings' plain Exceptions
        raise VideoUnreadable(f"NVDEC could not open {Path(path).name}: {e}") from e
    if len(decoder) != info.frame_count:
        raise VideoUnreadable(f"NVDEC counts {len(decoder)} frames, the probe {info.frame_count}")
    return decoder


def nvdec_frames(
    path: str | Path, info: VideoInfo, indices: Sequence[int], device: torch.device, per_batch: int,
    first: object | None = None,
) -> Iterator[torch.Tensor]:
    """Frames `indices` (ascending, repeats allowed) as (t, H, W, 3) uint8 RGB tensors on `device`, `per_batch`
    frames at a time (the last batch may be shorter). `first`: an `open_nvdec` session to use for the first run.
    Raises VideoUnreadable for data NVDEC cannot decode."""
    last = info.frame_count - 1
    runs = gop_runs([min(i, last) for i in indices], info, SESSIONS)

    def decode(k: int) -> list[torch.Tensor]:
        with torch.cuda.device(device):
            session = first if k == 0 and first is not None else open_nvdec(path, info, device)
            return _decode_forward(session, runs[k], info)

    with ThreadPoolExecutor(len(runs), thread_name_prefix="apbv-nvdec") as pool:
        pending = [pool.submit(decode, k) for k in range(len(runs))]
        ready: list[torch.Tensor] = []
        for run in pending:
            ready += run.result()
            while len(ready) >= per_batch:
                yield torch.stack(ready[:per_batch])
                ready = ready[per_batch:]
        if ready:
            yield torch.stack(ready)


def gop_runs(indices: Sequence[int], info: VideoInfo, most: int) -> list[list[int]]:
    """`indices` cut at keyframes into at most `most` runs of consecutive GOPs, about equal in the span of frames
    their wanted indices cover (a run decodes its `seek_segments` forward, each from its keyframe)."""
    if not indices:
        return []
    gops: list[list[int]] = []
    for i in indices:
        if gops and info.keyframe_before(i) == info.keyframe_before(gops[-1][-1]):
            gops[-1].append(i)
        else:
            gops.append([i])
    spans = [g[-1] - g[0] + 1 for g in gops]
    share = sum(spans) / min(most, len(gops))
    runs, filled = [[]], 0.0
    for gop, span in zip(gops, spans):
        if runs[-1] and filled + span / 2 > share * len(runs) and len(runs) < most:
            runs.append([])
        runs[-1] += gop
        filled += span
    return runs


def _decode_forward(decoder, wanted: list[int], info: VideoInfo) -> list[torch.Tensor]:
    """Frames `wanted` (ascending, within one run): a seek to each of its `seek_segments` and forward decoding."""
    frames: list[torch.Tensor] = []
    try:
        for segment in seek_segments(wanted, info):
            decoder.seek_to_index(segment[0])
            position, todo = segment[0], list(segment)
            while todo:
                batch = decoder.get_batch_frames(min(_BATCH, todo[-1] - position + 1))
                if not batch:  # the stream ends early: its last frame stands in (as on the CPU path)
                    return frames + [frames[-1]] * (len(wanted) - len(frames))
                for frame in batch:
                    while todo and todo[0] == position:
                        frames.append(_as_hwc(torch.from_dlpack(frame)).clone())
                        todo.pop(0)
                    position += 1
    except Exception as e:  # noqa: BLE001 - its bindings raise plain Exceptions
        raise VideoUnreadable(f"NVDEC could not decode frames {wanted[0]}-{wanted[-1]}: {e}") from e
    return frames


def _as_hwc(frame: torch.Tensor) -> torch.Tensor:
    """(H, W, 3) uint8 from the decoder's interleaved RGB."""
    return frame if frame.shape[-1] == 3 else frame.permute(1, 2, 0)
