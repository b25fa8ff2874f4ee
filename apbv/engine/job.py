"""One request as the ranks execute it.

Rank 0 turns a `Request` into a `JobHeader`: it probes the video and plans which frames to read at what size
(`apbv.video.plan_video`), builds the prompt and validates it against the limits and the strategy's layout, so that
bad input is rejected before any other rank is involved. Every rank of the request's group then continues a cached
conversation the prompt extends (`context_cache`: a follow-up question), or reads, encodes and gathers the video
(`video_pipeline.video_embeddings`: its own frames only, or the video cache), and runs `generate`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from apbv.attention.base import Strategy
from apbv.attention.config import AttentionConfig
from apbv.attention.registry import AUTO, STRATEGIES, get_strategy
from apbv.comm import Comm
from apbv.config import Limits
from apbv.engine.api import Request
from apbv.errors import TooFewFrames
from apbv.inputs import ProcessorSpec, Prompt, build_prompt, temporal_shards
from apbv.metrics import READ, MetricsRecorder
from apbv.model.generate import StoppedTurn, generate
from apbv.model.loading import LoadedModel
from apbv.model.qwen2_5_vl import QwenVLRank
from apbv.model.sampling import SamplingParams
from apbv.video import VideoPlan, plan_video

from .context_cache import ContextCache, ContextKey, continued_context
from .cost_model import Calibration, Choice, choose
from .video_cache import VideoCache, VideoKey
from .video_pipeline import VideoReading, video_embeddings


@dataclass(frozen=True)
class JobHeader:
    """Everything every rank needs to run one request: the prompt, the plan of the frames to read (each rank reads
    its own), how the temporal patches are split, the strategy and the sampling."""

    request_id: str
    world_size: int
    attention: AttentionConfig
    sampling: SamplingParams
    prompt: Prompt
    video: VideoPlan | None  # None: the frames come from memory (`run_job`'s frames)
    patch_ranges: tuple[range, ...]  # temporal patches per rank (`temporal_shards`)
    choice: Choice | None = None  # what "auto" picked
    continue_context: bool = False  # continue a cached conversation's K/V where the prompt extends it, keep its own
    started_s: float = 0.0  # rank 0's request time when it sent the header: where the other ranks' clocks start

    @property
    def tokens_per_rank(self) -> tuple[int, ...]:
        """Merged visual tokens each rank encodes (the sizes of the embeddings' all-gather)."""
        per_patch = self.prompt.visual_tokens // int(self.prompt.video_grid_thw[0, 0])
        return tuple(len(r) * per_patch for r in self.patch_ranges)


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
    num_frames: int,
    world_size: int,
    attention: AttentionConfig,
    sampling: SamplingParams,
    spec: ProcessorSpec,
    video: VideoPlan | None = None,
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
        video=video,
        patch_ranges=temporal_shards(num_frames, world_size, spec),
    )


def prepare_job(
    request_id: str,
    request: Request,
    world_size: int,
    loaded: LoadedModel,
    limits: Limits,
    metrics: MetricsRecorder,
    calibration: Calibration | None = None,
) -> JobHeader:
    """Rank 0: plan the video and build the header of a checked request (`Request.check`) on up to world_size ranks,
    with the sampling of the model's generation config and the request's overrides, and for strategy "auto" the
    strategy and ranks `calibration` predicts fastest; raises InputError subclasses for bad videos and requests too
    large or too short for the ranks."""
    tokenizer, spec = loaded.tokenizer, loaded.spec
    with metrics.span("read"), metrics.timed(READ):
        video = plan_video(
            request.video_path,
            num_frames=request.num_frames,
            fps=None if request.num_frames else request.fps,
            max_frames=limits.max_frames,
            uncapped=request.uncapped_pixels,
            processor_bounds=None if request.uncapped_pixels else spec.bounds,
            **spec.read_video_pixels(request.max_pixels),
        )
        prompt = build_prompt(tokenizer, video, request.question, spec, limits.max_prompt_tokens, request.history)
    if request.allow_fewer_ranks or request.strategy == AUTO:
        world_size = min(world_size, int(prompt.video_grid_thw[0, 0]))
    choice = None
    if request.strategy == AUTO:
        choice = choose(prompt.n_context + prompt.n_query, world_size, calibration)
        request, world_size = replace(request, strategy=choice.strategy), choice.world_size
    sampling = SamplingParams.resolve(
        loaded.generation_config, loaded.stop_ids, request.max_new_tokens, request.seed, request.temperature,
        request.top_p, request.top_k, request.repetition_penalty, loaded.answers,
    )  # fmt: skip
    attention = attention_config(request)
    header = build_header(request_id, prompt, video.num_frames, world_size, attention, sampling, spec, video)
    reuse = STRATEGIES[request.strategy].exact if request.reuse_context is None else request.reuse_context
    return replace(header, choice=choice, continue_context=reuse)


def run_job(
    header: JobHeader,
    rank_model: QwenVLRank,
    spec: ProcessorSpec,
    comm: Comm,
    metrics: MetricsRecorder,
    should_stop: Callable[[], bool],
    *,
    cache: VideoCache | None = None,
    contexts: ContextCache | None = None,
    reading: VideoReading = VideoReading(),
    frames: np.ndarray | torch.Tensor | None = None,
    strategy: Strategy | None = None,
) -> Iterator[int]:
    """This rank's share of the request (yields token ids): the cached conversation its prompt continues (when
    the header asks for it and every rank has it), else the video's embeddings (read from the file, the cache, or
    `frames`, this rank's frames already read when the header has no video) and a full prefill; then generate.
    The conversation's K/V go into `contexts` afterwards, also when it was stopped. `strategy`: the header's own
    by default (the fidelity benchmark passes a recording one)."""
    key = context = None
    if contexts is not None and header.continue_context and header.video is not None:
        key = ContextKey(VideoKey.of(header.video, spec), header.attention, header.world_size)
        ids = header.prompt.input_ids.numpy()
        context = continued_context(contexts, key, ids, header.prompt.n_context, comm, metrics)
    embeddings = None
    if context is None:
        with metrics.span("vision"):
            embeddings = video_embeddings(header.video, header.patch_ranges, header.tokens_per_rank, rank_model,
                                          spec, comm, metrics, cache, frames, reading)  # fmt: skip
    strategy = strategy or get_strategy(header.attention)
    try:
        context = yield from generate(rank_model, header.prompt, embeddings, strategy, comm, metrics,
                                      header.sampling, should_stop, context)  # fmt: skip
    except StoppedTurn as stopped:  # a stopped turn is kept too: the next question continues what it got to
        if key is not None:
            contexts.put(header.request_id, key, stopped.context)
        raise
    if key is not None:
        contexts.put(header.request_id, key, context)


def gather_metrics(metrics: dict | None, world_size: int) -> list[dict]:
    """Collect every rank's metrics record on rank 0 over the world group (ranks outside the job give None)."""
    if world_size == 1:
        return [metrics] if metrics else []
    out: list[dict | None] = [None] * world_size if dist.get_rank() == 0 else None
    dist.gather_object(metrics, out, dst=0)
    return [m for m in out or [] if m is not None]
