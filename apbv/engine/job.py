"""One request as the ranks execute it.

Rank 0 turns a `Request` into a `JobHeader` (reads and samples the video, builds the prompt, validates it against
the limits and the strategy's layout) so that bad input is rejected before any other rank is involved. Every rank
of the request's group then receives its own frames, patchifies them and runs `generate`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from transformers import PreTrainedTokenizerBase

from apbv.attention.base import Strategy
from apbv.attention.config import AttentionConfig
from apbv.attention.registry import get_strategy
from apbv.comm import Comm
from apbv.config import Limits
from apbv.engine.api import Request
from apbv.errors import TooFewFrames
from apbv.inputs import (
    ProcessorSpec,
    Prompt,
    build_prompt,
    shard_frames,
    temporal_shards,
    video_shard,
)
from apbv.metrics import READ, MetricsRecorder
from apbv.model.generate import SamplingParams, generate
from apbv.model.qwen2_5_vl import QwenVLRank
from apbv.video import read_video


@dataclass(frozen=True)
class JobHeader:
    """Everything every rank needs to run one request (no pixels: frames travel separately per rank)."""

    request_id: str
    world_size: int
    attention: AttentionConfig
    sampling: SamplingParams
    prompt: Prompt
    frames_shape: tuple[int, int, int, int]  # (T, H, W, 3) of the sampled frames
    patch_ranges: tuple[range, ...]  # temporal patches per rank (`temporal_shards`)
    started_s: float = 0.0  # rank 0's request time when it sent the header: where the other ranks' clocks start


def attention_config(request: Request) -> AttentionConfig:
    """The request's strategy parameters on top of the paper's defaults."""
    config = AttentionConfig(strategy=request.strategy)
    if request.anchor_ratio is not None:
        config = replace(config, anchor_ratio=request.anchor_ratio)
    if request.passing_ratio is not None:
        config = replace(config, passing_ratio=request.passing_ratio)
    return config


def build_header(
    request_id: str,
    prompt: Prompt,
    frames_shape: tuple[int, ...],
    world_size: int,
    attention: AttentionConfig,
    sampling: SamplingParams,
    spec: ProcessorSpec,
) -> JobHeader:
    """The header of a job on world_size ranks; raises TooFewFrames or LayoutError when it cannot be split."""
    temporal_patches = int(prompt.video_grid_thw[0, 0])
    if temporal_patches < world_size:
        tp = spec.temporal_patch_size
        raise TooFewFrames(
            f"{world_size} ranks need at least {tp * world_size} frames ({world_size} temporal patches); "
            f"the video gave {tp * temporal_patches} (or allow fewer ranks)"
        )
    get_strategy(attention).plan(prompt.n_context, prompt.n_query, world_size)  # raises LayoutError early
    return JobHeader(
        request_id=request_id,
        world_size=world_size,
        attention=attention,
        sampling=sampling,
        prompt=prompt,
        frames_shape=tuple(frames_shape),
        patch_ranges=temporal_shards(frames_shape[0], world_size, spec),
    )


def prepare_job(
    request_id: str,
    request: Request,
    world_size: int,
    tokenizer: PreTrainedTokenizerBase,
    spec: ProcessorSpec,
    limits: Limits,
    stop_ids: tuple[int, ...],
    metrics: MetricsRecorder,
) -> tuple[JobHeader, np.ndarray]:
    """Rank 0: read the video and build the header of a checked request (`Request.check`) on world_size ranks;
    raises InputError subclasses for bad videos and requests too large or too short for the ranks."""
    with metrics.span("read"), metrics.timed(READ):
        video = read_video(
            request.video_path,
            num_frames=request.num_frames,
            fps=None if request.num_frames else request.fps,
            max_frames=limits.max_frames,
            **spec.read_video_pixels(request.max_pixels),
        )
        prompt = build_prompt(tokenizer, video, request.question, spec, limits.max_prompt_tokens, request.history)
    if request.allow_fewer_ranks:
        world_size = min(world_size, int(prompt.video_grid_thw[0, 0]))
    sampling = SamplingParams(
        max_new_tokens=request.max_new_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        seed=request.seed,
        stop_ids=stop_ids,
    )
    header = build_header(request_id, prompt, video.frames.shape, world_size, attention_config(request), sampling, spec)
    return header, video.frames


def distribute_frames(header: JobHeader, frames: np.ndarray | None, comm: Comm, spec: ProcessorSpec) -> np.ndarray:
    """Rank 0 sends each rank the frames of its temporal patches; returns this rank's frames (uint8)."""
    if comm.rank == 0:
        sends = [
            comm.isend(torch.from_numpy(np.ascontiguousarray(shard_frames(frames, patches, spec))).to(comm.device), rank)
            for rank, patches in enumerate(header.patch_ranges)
            if rank > 0
        ]
        for handle in sends:
            handle.wait()
        return shard_frames(frames, header.patch_ranges[0], spec)
    count = len(shard_frames(range(header.frames_shape[0]), header.patch_ranges[comm.rank], spec))
    buffer = torch.empty((count, *header.frames_shape[1:]), dtype=torch.uint8, device=comm.device)
    return comm.irecv(buffer, src=0).wait().cpu().numpy()


def run_job(
    header: JobHeader,
    local_frames: np.ndarray,
    rank_model: QwenVLRank,
    spec: ProcessorSpec,
    comm: Comm,
    metrics: MetricsRecorder,
    should_stop: Callable[[], bool],
    strategy: Strategy | None = None,
) -> Iterator[int]:
    """This rank's share of the request: patchify its own frames, then generate (yields token ids). `strategy`:
    the header's own by default (the fidelity benchmark passes a recording one)."""
    shard = video_shard(local_frames, header.patch_ranges, spec)
    strategy = strategy or get_strategy(header.attention)
    yield from generate(rank_model, header.prompt, shard, strategy, comm, metrics, header.sampling, should_stop)


def gather_metrics(metrics: dict | None, world_size: int) -> list[dict]:
    """Collect every rank's metrics record on rank 0 over the world group (ranks outside the job give None)."""
    if world_size == 1:
        return [metrics] if metrics else []
    out: list[dict | None] = [None] * world_size if dist.get_rank() == 0 else None
    dist.gather_object(metrics, out, dst=0)
    return [m for m in out or [] if m is not None]
