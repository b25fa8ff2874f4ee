"""Run a transformers Qwen2.5-VL checkpoint rank-locally with a sequence-parallel attention strategy.

Nothing of the model is forked: embeddings, vision encoder, decoder layers, norms, MLP, M-RoPE and the LM head
are transformers' own modules. Only the text attention function is swapped, through transformers' attention
registry, for `_sequence_parallel_attention`, which hands the rank-local (post-RoPE) q/k/v to the active route:
the strategy's prefill, or the distributed decode over the sharded KV cache.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator, Sequence

import torch
from transformers import AttentionInterface, Qwen2_5_VLForConditionalGeneration

from apbv.attention.base import SequencePlan, Strategy
from apbv.attention.decode import distributed_attention
from apbv.comm import Comm
from apbv.inputs import Prompt
from apbv.metrics import VISION, MetricsRecorder
from apbv.model.cache import ShardedKVCache
from apbv.model.decode_step import DecodeStep
from apbv.model.vision_attention import set_attention
from apbv.model.vision_tuning import compile_blocks, pad_mlp_widths

ATTN_IMPLEMENTATION = "apbv_sequence_parallel"

# (layer_idx, q (Hq,S,D), k (Hkv,S,D), v (Hkv,S,D)) -> out (Hq,S,D)
AttentionRoute = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
_ACTIVE_ROUTE: ContextVar[AttentionRoute | None] = ContextVar("apbv_attention_route", default=None)


def _sequence_parallel_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention-interface entry: (1,H,S,D) in, (1,S,H,D) out."""
    route = _ACTIVE_ROUTE.get()
    if route is None:
        raise RuntimeError("sequence-parallel attention called outside a prefill/decode step")
    if query.shape[0] != 1:
        raise ValueError("batch size 1 only")
    if scaling is not None and abs(scaling - query.shape[-1] ** -0.5) > 1e-12:
        raise ValueError("only the default 1/sqrt(head_dim) attention scale is supported")
    out = route(module.layer_idx, query[0], key[0], value[0])
    return out.transpose(0, 1).unsqueeze(0), None


AttentionInterface.register(ATTN_IMPLEMENTATION, _sequence_parallel_attention)


@contextmanager
def _route(route: AttentionRoute) -> Iterator[None]:
    token = _ACTIVE_ROUTE.set(route)
    try:
        yield
    finally:
        _ACTIVE_ROUTE.reset(token)


def use_sequence_parallel_attention(model: Qwen2_5_VLForConditionalGeneration) -> None:
    """Route the language model's attention through the active strategy and the vision tower's through packed
    attention (one call for all its windows)."""
    set_attention(model, ATTN_IMPLEMENTATION)


def merged_vision_tokens(visual: torch.nn.Module, pixels: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    """The vision tower's output: one embedding per merged 2x2 patch, in token order (transformers 5 returns it as
    `pooler_output`, earlier versions as the tensor itself)."""
    out = visual(pixels, grid_thw=grid_thw)
    return out.pooler_output if hasattr(out, "pooler_output") else out


class QwenVLRank:
    """One rank's view of a Qwen2.5-VL model: frame-parallel vision, sharded prefill, distributed decode."""

    def __init__(self, model: Qwen2_5_VLForConditionalGeneration, compile_vision: bool = False) -> None:
        """compile_vision: torch.compile the vision blocks' norms and MLPs (GPUs; a one-time warm-up). The vision
        MLPs are always padded to aligned widths (exact; `vision_tuning`)."""
        self.model = model.eval()
        use_sequence_parallel_attention(model)
        pad_mlp_widths(model.model.visual)
        if compile_vision:
            compile_blocks(model.model.visual)
        self.text = model.model.language_model
        self.visual = model.model.visual
        self.config = model.config
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self._decode_steps = threading.local()  # a DecodeStep per thread: thread ranks share one QwenVLRank

    @property
    def num_layers(self) -> int:
        return len(self.text.layers)

    def global_positions(self, prompt: Prompt) -> torch.Tensor:
        """M-RoPE ids (3, L) of the whole prompt from the installed transformers' own rule."""
        positions, _ = self.model.model.get_rope_index(
            prompt.input_ids[None],
            mm_token_type_ids=prompt.mm_token_type_ids[None],
            video_grid_thw=prompt.video_grid_thw,
            second_per_grid_ts=prompt.second_per_grid_ts,
        )
        return positions[:, 0]

    @torch.inference_mode()
    def encode_video(
        self,
        local_pixels: torch.Tensor,
        local_grid_thw: torch.Tensor,
        tokens_per_rank: list[int],
        comm: Comm,
        metrics: MetricsRecorder,
    ) -> torch.Tensor:
        """Encode this rank's temporal patches and all-gather every rank's embeddings in token order."""
        local = self.encode_patches(local_pixels, local_grid_thw, metrics)
        return self.gather_video(local, tokens_per_rank, comm, metrics)

    @torch.inference_mode()
    def encode_patches(self, pixels: torch.Tensor, grid_thw: torch.Tensor, metrics: MetricsRecorder) -> torch.Tensor:
        """The vision tower on some temporal patches (pixel rows of `patchify`): one embedding per merged patch, in
        the model's dtype. Exact in pieces: no op of the Qwen2.5-VL vision tower crosses temporal patches (§2)."""
        with metrics.timed(VISION):
            if not pixels.shape[0]:
                return torch.empty(0, self.config.text_config.hidden_size, device=self.device, dtype=self.dtype)
            pixels = pixels.to(self.device, self.visual.dtype)
            return merged_vision_tokens(self.visual, pixels, grid_thw.to(self.device)).to(self.dtype)

    def gather_video(
        self, local: torch.Tensor, tokens_per_rank: Sequence[int], comm: Comm, metrics: MetricsRecorder
    ) -> torch.Tensor:
        """Every rank's video embeddings, in token order (an all-gather of uneven sizes)."""
        parts = comm.all_gather(local.contiguous(), sizes=tokens_per_rank, dim=0, metrics=metrics)
        return torch.cat(parts, dim=0)

    @torch.inference_mode()
    def prefill(
        self,
        prompt: Prompt,
        video_embeds: torch.Tensor,
        positions: torch.Tensor,
        strategy: Strategy,
        plan: SequencePlan,
        comm: Comm,
        metrics: MetricsRecorder,
        cache: ShardedKVCache,
    ) -> torch.Tensor | None:
        """Run the decoder on this rank's local sequence and fill `cache` with this rank's share. Returns the final
        hidden state of the last prompt token where this rank's local rows include it (every rank for the anchored
        strategies, which replicate the query; the tail rank for ring and dense), else None."""
        layout = plan.ranks[comm.rank]
        rows = layout.local_to_global.to(self.device)
        hidden = self._embed_local(prompt, video_embeds, rows)
        cos_sin = self.text.rotary_emb(hidden, positions.to(self.device)[:, rows][:, None, :])
        cache_rows = layout.cache_rows.to(self.device)

        def route(layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            out = strategy.prefill(q, k, v, plan, layer_idx, comm, metrics)
            cache.store(layer_idx, k[:, cache_rows], v[:, cache_rows])
            return out

        with _route(route):
            for layer in self.text.layers:
                hidden = layer(hidden, attention_mask=None, position_embeddings=cos_sin)
        cache.add_rows(layout.local_to_global[layout.cache_rows])
        last = (layout.local_to_global == prompt.input_ids.numel() - 1).nonzero()
        if last.numel() == 0:
            return None
        return self.text.norm(hidden[:, int(last[0, 0])])[0]

    @torch.inference_mode()
    def extend(
        self,
        prompt: Prompt,
        start: int,
        positions: torch.Tensor,
        comm: Comm,
        metrics: MetricsRecorder,
        cache: ShardedKVCache,
        is_tail: bool,
    ) -> torch.Tensor:
        """Prefill the prompt's text from row `start` on, over a cache that holds every earlier row (a follow-up
        turn after the conversation so far): the new rows run on every rank, attend exactly to the whole sharded
        cache (merged by log-sum-exp, causal among themselves) and are appended on the tail rank. Returns the
        final hidden state of the last prompt token (every rank)."""
        ids = prompt.input_ids[start:].to(self.device)
        if bool((ids == self.config.video_token_id).any()):
            raise ValueError("a cached context must hold every video token")
        hidden = self.text.embed_tokens(ids)[None]
        cos_sin = self.text.rotary_emb(hidden, positions.to(self.device)[:, start:][:, None, :])

        def route(layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if is_tail:
                cache.append(layer_idx, k, v)
            keys, values = cache.get(layer_idx)
            return distributed_attention(q, keys, values, comm, metrics, causal=is_tail)

        with _route(route):
            for layer in self.text.layers:
                hidden = layer(hidden, attention_mask=None, position_embeddings=cos_sin)
        if is_tail:
            cache.add_rows(torch.arange(start, prompt.input_ids.numel()))
        return self.text.norm(hidden[:, -1])[0]

    def _embed_local(self, prompt: Prompt, video_embeds: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Token embeddings of the local rows with each video pad replaced by its vision embedding."""
        ids = prompt.input_ids.to(self.device)
        is_video = ids == self.config.video_token_id
        video_index = torch.cumsum(is_video, 0) - 1  # global video-token ordinal of each position
        local_ids = ids[rows]
        hidden = self.text.embed_tokens(local_ids)
        local_video = is_video[rows]
        hidden[local_video] = video_embeds[video_index[rows][local_video]].to(hidden.dtype)
        return hidden[None]

    def decode_step(
        self,
        token_id: int,
        position: int,
        comm: Comm,
        metrics: MetricsRecorder,
        cache: ShardedKVCache,
        is_tail: bool,
    ) -> torch.Tensor:
        """One decode token on every rank: exact attention over the sharded cache. Returns final hidden (H,)."""
        step = getattr(self._decode_steps, "step", None)
        if step is None:
            step = self._decode_steps.step = DecodeStep(self.text)
        return step(token_id, position, comm, metrics, cache, is_tail)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden).float()

