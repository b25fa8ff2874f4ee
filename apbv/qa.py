"""Answer one video question in-process with any strategy on W thread-ranks, recording what fidelity needs.

The ranks are threads of this process (`apbv.bench.threads.ThreadWorld`): real strategy code, real collectives
by reference, one rank computing at a time. Each rank patchifies its own temporal patches, encodes them and
runs `generate` exactly as an engine worker does; on top, the first-token logits and (optionally) every
layer's attention output, assembled in global token order, are kept for comparison with dense.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from apbv.attention import get_strategy
from apbv.attention.base import SequencePlan, Strategy
from apbv.attention.layout import split_temporal_patches
from apbv.bench.threads import ThreadWorld
from apbv.comm import Comm
from apbv.config import AttentionConfig
from apbv.inputs import ProcessorSpec, Prompt, build_prompt, patchify
from apbv.metrics import MetricsRecorder
from apbv.model.generate import SamplingParams, VideoShard, generate
from apbv.model.loading import LoadedModel
from apbv.model.qwen2_5_vl import QwenVLRank
from apbv.video import SampledVideo


@dataclass
class Answer:
    """token_ids: generated ids (stop token excluded); first_logits: (V,) float32 logits of the first token;
    layer_outputs: per layer, the attention output (Hq, L, D) of every prompt row (None unless recorded);
    attn_pairs: attention (row, key) pairs of the prefill summed over ranks and layers."""

    text: str
    token_ids: list[int]
    first_logits: Tensor
    attn_pairs: float
    prompt: Prompt
    layer_outputs: list[Tensor] | None = None


@dataclass
class _Recorder:
    """Collects rank-local attention outputs into global row order. Rows replicated on every rank (anchor, query)
    hold the same values on all ranks; the last writer's copy is kept."""

    n_total: int
    outputs: dict[int, Tensor] = field(default_factory=dict)

    def put(self, layer_idx: int, rows: Tensor, out: Tensor) -> None:
        full = self.outputs.setdefault(layer_idx, out.new_zeros(out.shape[0], self.n_total, out.shape[2]))
        full[:, rows] = out.float()


class _RecordingStrategy:
    """Delegates to a strategy and records each rank's prefill outputs (duck-types `Strategy` for generate)."""

    def __init__(self, inner: Strategy, recorder: _Recorder) -> None:
        self.inner = inner
        self.recorder = recorder
        self.plan = inner.plan

    def prefill(self, q, k, v, plan: SequencePlan, layer_idx: int, comm: Comm, metrics: MetricsRecorder) -> Tensor:
        out = self.inner.prefill(q, k, v, plan, layer_idx, comm, metrics)
        self.recorder.put(layer_idx, plan.ranks[comm.rank].local_to_global, out)
        return out


class _FirstLogits(QwenVLRank):
    """A rank view of the shared model that keeps the logits of the first sampled token."""

    first: Tensor | None = None

    def logits(self, hidden: Tensor) -> Tensor:
        out = super().logits(hidden)
        if self.first is None:
            self.first = out.detach().cpu()
        return out


def ask(
    loaded: LoadedModel,
    video: SampledVideo,
    question: str,
    config: AttentionConfig = AttentionConfig("dense"),
    world_size: int = 1,
    max_new_tokens: int = 8,
    record_layers: bool = False,
) -> Answer:
    """Greedy answer of `question` about `video` with config.strategy on world_size thread-ranks."""
    model = loaded.rank_model.model
    spec: ProcessorSpec = loaded.spec
    world_size = 1 if config.strategy == "dense" else world_size
    prompt = build_prompt(loaded.tokenizer, video, question, spec)
    grid = prompt.video_grid_thw[0]
    patches = split_temporal_patches(int(grid[0]), world_size)
    tokens_per_rank = [len(r) * int(grid[1] * grid[2]) // spec.merge_size**2 for r in patches]
    recorder = _Recorder(prompt.input_ids.numel())
    strategy = get_strategy(config)
    if record_layers:
        strategy = _RecordingStrategy(strategy, recorder)
    sampling = SamplingParams(max_new_tokens=max_new_tokens, stop_ids=loaded.stop_ids)
    def rank_fn(rank: int, comm: Comm) -> tuple[list[int], Tensor | None, float]:
        view = _FirstLogits(model)
        frames = video.frames[2 * patches[rank].start : 2 * patches[rank].stop]
        pixels, local_grid = patchify(frames, spec)
        shard = VideoShard(pixels=pixels, grid_thw=local_grid, tokens_per_rank=tokens_per_rank)
        metrics = MetricsRecorder(rank, comm.device)
        ids = list(generate(view, prompt, shard, strategy, comm, metrics, sampling))
        return ids, view.first, metrics.counters.get("attn_pairs", 0.0)

    with ThreadWorld(world_size, loaded.rank_model.device) as world:
        results = world.run(rank_fn)
    ids = results[0][0]
    first = next(r[1] for r in results if r[1] is not None)
    layers = [recorder.outputs[i] for i in sorted(recorder.outputs)] if record_layers else None
    return Answer(
        text=loaded.tokenizer.decode(ids, skip_special_tokens=True).strip(),
        token_ids=ids,
        first_logits=first,
        attn_pairs=sum(r[2] for r in results),
        prompt=prompt,
        layer_outputs=layers,
    )
