"""One rank's video, from the file to every rank's vision embeddings.

Each rank decodes only the frames of its own temporal patches (`apbv.video.decode_frames`, seeking to the keyframe
before them) in a background thread, while the main thread moves each decoded chunk to the rank's device, resizes
and patchifies it there and runs the vision encoder on it: decoding hides behind the encoder where it can. The
embeddings are then all-gathered. A video encoded before (`VideoCache`, same content and sampling) skips all of it;
when only rank 0 has it, rank 0 broadcasts it. A rank that cannot read the file's path (no shared storage) gets the
compressed file from rank 0, never decoded frames.

Time categories: READ is the time the rank waited for decoded frames (what decoding did not hide), PREPROCESS the
resize and patchify, VISION the encoder; the counter "read_busy_s" is the decoder thread's own time.
"""

from __future__ import annotations

import os
import queue
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from apbv.comm import Comm
from apbv.engine.protocol import check_video_decoder
from apbv.errors import ERROR_CODES, InputError, VideoUnreadable, error_from_code
from apbv.inputs import ProcessorSpec, patchify, shard_frames
from apbv.metrics import PREPROCESS, READ, MetricsRecorder
from apbv.model.qwen2_5_vl import QwenVLRank
from apbv.video import VideoPlan, decode_frames, resize_frames
from apbv.video.nvdec import nvdec_frames, nvdec_unavailable, open_nvdec, say_once

from .video_cache import VideoCache, VideoKey

T = TypeVar("T")
# pixel rows (14x14 patches) the encoder gets per chunk: on a GPU enough to fill it (and memory stays bounded); on
# a CPU a few temporal patches, so that resizing them overlaps the decoding of the next ones
PATCH_ROWS_PER_CHUNK = {"cuda": 65_536, "cpu": 8_192}
_PREFETCH = 2  # decoded chunks waiting at most


def chunk_frames(plan_size: tuple[int, int], spec: ProcessorSpec, device: torch.device) -> int:
    """Frames per chunk: whole temporal patches, about PATCH_ROWS_PER_CHUNK pixel rows for `device`'s kind."""
    rows_per_patch = (plan_size[0] // spec.patch_size) * (plan_size[1] // spec.patch_size)
    rows = PATCH_ROWS_PER_CHUNK["cuda" if device.type == "cuda" else "cpu"]
    return spec.temporal_patch_size * max(1, rows // rows_per_patch)


@dataclass(frozen=True)
class VideoReading:
    """How a rank reads videos. ship: it never opens the path itself (its node has no copy): rank 0 sends it the
    file; decoder: "cpu" (FFmpeg through PyAV: the frames qwen-vl-utils' readers give) or "nvdec" (the GPU's
    video engines, `apbv.video.nvdec`, on the CPU where they cannot)."""

    ship: bool = False
    decoder: str = "cpu"

    def __post_init__(self) -> None:
        check_video_decoder(self.decoder)


def decoded_chunks(
    path: str, plan: VideoPlan, indices: tuple[int, ...], frames_per_chunk: int, metrics: MetricsRecorder,
    device: torch.device, decoder: str = "cpu",
) -> Iterator[torch.Tensor]:
    """Frames `indices` of the planned video in chunks of `frames_per_chunk` ((t, H, W, 3) uint8): on `device` from
    NVDEC when `decoder` is "nvdec" and it can, else from the CPU (pinned for a fast copy to a GPU). Where NVDEC
    fails part way, the CPU decodes the rest. The counter "nvdec" says whether NVDEC started."""
    pin = device.type == "cuda"
    batches = None
    if decoder == "nvdec":
        reason = nvdec_unavailable(plan.info, device)
        if reason is None:
            try:
                session = open_nvdec(path, plan.info, device)
                batches = _finished_on_cpu(nvdec_frames(path, plan.info, indices, device, frames_per_chunk, session),
                                           path, plan, indices, frames_per_chunk, pin)  # fmt: skip
            except VideoUnreadable as err:
                reason = str(err)
        if batches is None:
            say_once(reason)
    metrics.add("nvdec", int(batches is not None))
    if batches is None:
        batches = _cpu_chunks(path, plan, indices, frames_per_chunk, pin)
    while True:
        start = time.perf_counter()
        chunk = next(batches, None)
        if chunk is None:
            return
        metrics.add("read_busy_s", time.perf_counter() - start)
        yield chunk


def _finished_on_cpu(
    batches: Iterator[torch.Tensor], path: str, plan: VideoPlan, indices: tuple[int, ...], per_chunk: int, pin: bool
) -> Iterator[torch.Tensor]:
    """NVDEC's `batches`; where NVDEC fails (a profile it lacks, no free session, a seek it gets wrong), the frames
    it did not give, from the CPU decoder (which raises the typed error if the data is really unreadable)."""
    done = 0
    try:
        for batch in batches:
            done += batch.shape[0]
            yield batch
    except VideoUnreadable as err:
        say_once(str(err))
        yield from _cpu_chunks(path, plan, indices[done:], per_chunk, pin)


def _cpu_chunks(
    path: str, plan: VideoPlan, indices: tuple[int, ...], per_chunk: int, pin: bool
) -> Iterator[torch.Tensor]:
    frames = decode_frames(path, plan.info, indices, torch.get_num_threads())
    while batch := [frame for _, frame in zip(range(per_chunk), frames)]:
        chunk = torch.from_numpy(np.stack(batch))
        yield chunk.pin_memory() if pin else chunk


def prefetched(items: Iterable[T], depth: int = _PREFETCH) -> Iterator[T]:
    """`items`, produced by a background thread up to `depth` ahead; its exceptions are raised here."""
    done = object()
    box: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                box.put(item)
            box.put(done)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            box.put(exc)

    thread = threading.Thread(target=produce, name="apbv-decode", daemon=True)
    thread.start()
    try:
        while (item := box.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue, then let it finish
            try:
                box.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)


def encode_chunks(
    chunks: Iterator[torch.Tensor],
    sizes: tuple[tuple[int, int], ...],
    rank_model: QwenVLRank,
    spec: ProcessorSpec,
    metrics: MetricsRecorder,
) -> torch.Tensor:
    """This rank's embeddings: each chunk of frames to the device, resized through `sizes`, patchified, encoded."""
    parts = []
    while True:
        with metrics.timed(READ):
            chunk = next(chunks, None)
        if chunk is None:
            break
        with metrics.timed(PREPROCESS):
            frames = chunk.to(rank_model.device, non_blocking=True)
            for size in sizes:
                frames = resize_frames(frames, size)
            pixels, grid = patchify(frames, spec)
        parts.append(rank_model.encode_patches(pixels, grid, metrics))
    return torch.cat(parts)


def video_embeddings(
    plan: VideoPlan | None,
    patch_ranges: tuple[range, ...],
    tokens_per_rank: tuple[int, ...],
    rank_model: QwenVLRank,
    spec: ProcessorSpec,
    comm: Comm,
    metrics: MetricsRecorder,
    cache: VideoCache | None = None,
    frames: torch.Tensor | None = None,
    reading: VideoReading = VideoReading(),
) -> torch.Tensor:
    """Every video token's embedding in token order, on every rank of `comm`.

    plan: the video to read (None: `frames`, this rank's frames already read and resized, e.g. in-memory tests).
    reading: how this rank reads it (whether rank 0 ships it the file; the decoder).
    """
    mine = patch_ranges[comm.rank]
    if plan is None:
        chunks = iter([torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames])
        local = encode_chunks(chunks, (), rank_model, spec, metrics)
        return rank_model.gather_video(local, tokens_per_rank, comm, metrics)
    key = VideoKey.of(plan, spec)
    cached = cache.get(key) if cache is not None else None
    has_file = comm.rank == 0 or (not reading.ship and _same_file(plan))
    mine_flags = torch.tensor([[cached is not None, has_file]], dtype=torch.int32, device=comm.device)
    flags = comm.all_gather(mine_flags, metrics=metrics)
    hits, files = [bool(f[0, 0]) for f in flags], [bool(f[0, 1]) for f in flags]
    if hits[0]:  # rank 0 has it: whoever does not gets it from rank 0
        metrics.add("video_cache_hit", 1)
        if not all(hits):
            shape = (sum(tokens_per_rank), rank_model.config.text_config.hidden_size)
            received = comm.broadcast(cached if cached is not None else
                                      torch.empty(shape, dtype=rank_model.dtype, device=comm.device), 0, metrics)  # fmt: skip
            cached = cached if cached is not None else received
            if cache is not None:
                cache.put(key, cached)
        return cached
    indices = shard_frames(plan.indices, mine, spec)
    failure = None
    try:
        with _readable_path(plan, comm, files, metrics) as path:
            chunks = decoded_chunks(path, plan, indices, chunk_frames(plan.sizes[0], spec, rank_model.device), metrics,
                                    rank_model.device, reading.decoder)  # fmt: skip
            local = encode_chunks(prefetched(chunks), plan.sizes, rank_model, spec, metrics)
    except InputError as err:  # corrupt or truncated data past what the probe saw, found by this rank
        failure = err
    _raise_any_rank_failure(failure, comm, metrics)
    embeddings = rank_model.gather_video(local, tokens_per_rank, comm, metrics)
    if cache is not None:
        cache.put(key, embeddings)
    return embeddings


def _raise_any_rank_failure(failure: InputError | None, comm: Comm, metrics: MetricsRecorder) -> None:
    """Every rank learns whether any rank could not read its frames, and then all raise that rank's typed error
    together (the group stays in step: no rank waits in a collective for one that gave up)."""
    code = ERROR_CODES.index(failure.code) if failure is not None else -1
    codes = [int(c) for c in comm.all_gather(torch.tensor([code], dtype=torch.int32, device=comm.device), metrics=metrics)]
    failed = [(rank, c) for rank, c in enumerate(codes) if c >= 0]
    if not failed:
        return
    rank, c = failed[0]
    if rank == comm.rank:
        raise failure
    raise error_from_code(ERROR_CODES[c], f"rank {rank} could not read its frames of the video ({ERROR_CODES[c]})")


def _same_file(plan: VideoPlan) -> bool:
    """This node can read the planned file at its path (same size: the content hash is rank 0's to check)."""
    try:
        return os.path.isfile(plan.path) and os.path.getsize(plan.path) == plan.file_size
    except OSError:
        return False


@contextmanager
def _readable_path(plan: VideoPlan, comm: Comm, files: list[bool], metrics: MetricsRecorder) -> Iterator[str]:
    """The planned file's path on this rank: its own, or a temporary copy of the bytes rank 0 broadcasts to the
    ranks that cannot read it."""
    if all(files):
        yield plan.path
        return
    data = torch.empty(plan.file_size, dtype=torch.uint8, device=comm.device)
    if comm.rank == 0:
        with open(plan.path, "rb") as f:
            data.copy_(torch.frombuffer(bytearray(f.read()), dtype=torch.uint8))
    with metrics.timed(READ):
        comm.broadcast(data, 0, metrics)
    if files[comm.rank]:
        yield plan.path
        return
    with tempfile.NamedTemporaryFile(suffix=os.path.splitext(plan.path)[1], prefix="apbv-video-") as copy:
        copy.write(data.cpu().numpy().tobytes())
        copy.flush()
        del data
        yield copy.name
