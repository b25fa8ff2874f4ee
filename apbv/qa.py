"""Answer one video question in-process with any strategy on W thread-ranks, recording what fidelity needs.

The ranks are threads of this process (`apbv.thread_comm.ThreadWorld`): real strategy code, real collectives
by reference, one rank computing at a time. Each rank runs the engine's job code (`apbv.engine.job.run_job`) on
its own temporal patches exactly as an engine worker does; on top, the first-token logits and (optionally) every
layer's attention output, assembled in global token order, are kept for comparison with dense.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from apbv.attention.base import SequencePlan, Strategy
from apbv.attention.config import AttentionConfig
from apbv.attention.registry import get_strategy, ranks_for
from apbv.comm import Comm
from apbv.engine.job import build_header, run_job
from apbv.inputs import Prompt, build_prompt, shard_frames
from apbv.metrics import MetricsRecorder
from apbv.model.loading import LoadedModel
from apbv.model.qwen2_5_vl import QwenVLRank
from apbv.model.sampling import SamplingParams
from apbv.thread_comm import ThreadWorld
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


class _RecordingStrategy(Strategy):
    """A strategy that records each rank's prefill outputs of the strategy it wraps."""

    def __init__(self, inner: Strategy, recorder: _Recorder) -> None:
        super().__init__(inner.config)
        self.inner, self.recorder = inner, recorder
        self.name, self.exact = inner.name, inner.exact

    def plan(self, n_context: int, n_query: int, world_size: int) -> SequencePlan:
        return self.inner.plan(n_context, n_query, world_size)

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
    """Greedy answer of `question` about `video` with config.strategy on world_size thread-ranks, each running the
    engine's own job code (`apbv.engine.job`) on its share of the frames."""
    model, spec = loaded.rank_model.model, loaded.spec
    prompt = build_prompt(loaded.tokenizer, video, question, spec)
    sampling = SamplingParams(max_new_tokens=max_new_tokens, stop_ids=loaded.stop_ids, answers=loaded.answers)
    world_size = ranks_for(config.strategy, world_size)
    header = build_header("qa", prompt, video.num_frames, world_size, config, sampling, spec)
    recorder = _Recorder(prompt.input_ids.numel())
    strategy = _RecordingStrategy(get_strategy(config), recorder) if record_layers else None

    def rank_fn(rank: int, comm: Comm) -> tuple[list[int], Tensor | None, float]:
        view = _FirstLogits(model)
        frames = shard_frames(video.frames, header.patch_ranges[rank], spec)
        metrics = MetricsRecorder(rank, comm.device)
        ids = list(run_job(header, view, spec, comm, metrics, lambda: False, frames=frames, strategy=strategy))
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
