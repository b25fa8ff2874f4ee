"""Prefill + decode loop for one request on one rank: sharded prefill, sampling, streamed tokens.

Every rank of the request's group runs `generate` with the same prompt; the tail rank (the one holding the last
prompt token) samples each token and broadcasts it, so all ranks stay in lock-step and yield the same ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generator

import torch

from apbv.attention.base import Strategy
from apbv.comm import Comm
from apbv.errors import Cancelled
from apbv.inputs import Prompt
from apbv.metrics import (
    ATTENTION,
    COMM_WAIT,
    DECODE,
    OTHER_LAYERS,
    MetricsRecorder,
    NullRecorder,
)
from apbv.model.cache import ShardedKVCache
from apbv.model.qwen2_5_vl import QwenVLRank
from apbv.model.sampling import Sampler, SamplingParams


@dataclass
class KVContext:
    """The conversation so far as this rank holds it: its share of the K/V and the tokens the cache holds, in order
    (the prompt's, then each answer token fed back)."""

    cache: ShardedKVCache
    token_ids: list[int]
    reused: int = 0  # leading prompt tokens already in the cache when this request started (0: prefilled)


class StoppedTurn(Cancelled):
    """The request was stopped at a token boundary; `context` holds the conversation up to the last token the
    model has seen (so that the next turn can still continue it)."""

    def __init__(self, context: KVContext) -> None:
        super().__init__("cancelled")
        self.context = context


def generate(
    rank_model: QwenVLRank,
    prompt: Prompt,
    video_embeds: torch.Tensor | None,
    strategy: Strategy,
    comm: Comm,
    metrics: MetricsRecorder,
    sampling: SamplingParams,
    should_stop: Callable[[], bool] = lambda: False,
    context: KVContext | None = None,
) -> Generator[int, None, KVContext]:
    """Yield generated token ids (identical on every rank); stop tokens are not yielded. Returns the conversation's
    K/V afterwards (for a follow-up turn).

    video_embeds: every video token's embedding in token order (`QwenVLRank.encode_video` / the engine's video
    pipeline); None with a `context` that holds the prompt's first `context.reused` tokens (all video tokens among
    them), whose K/V are kept and only the rest of the prompt is prefilled (`QwenVLRank.extend`, exact attention
    over the cache). `should_stop` is polled on rank 0 at every token boundary; when it returns True all ranks raise
    StoppedTurn (a Cancelled) with the conversation so far.
    """
    plan = strategy.plan(prompt.n_context, prompt.n_query, comm.world_size)
    metrics.remainder(OTHER_LAYERS, span="prefill", minus=(ATTENTION, COMM_WAIT))
    is_tail = comm.rank == plan.tail_rank
    positions = rank_model.global_positions(prompt)
    sampler = Sampler(sampling, prompt.input_ids) if is_tail else None

    def next_token(hidden: torch.Tensor | None, recorder: MetricsRecorder) -> int:
        """The tail rank's sample and rank 0's stop flag, shared with every rank in one all-reduce (max); one rank
        alone keeps them on the host."""
        chosen = sampler(rank_model.logits(hidden)) if is_tail else -1
        stop = int(comm.rank == 0 and should_stop())
        if comm.world_size > 1:
            token, stop = comm.all_reduce_max(torch.tensor([chosen, stop], device=comm.device), recorder).tolist()
        else:
            token = chosen
        if stop:
            raise StoppedTurn(context)
        return int(token)

    with metrics.span("prefill"):  # the first token's lm_head and all-reduce count as prefill (time to first token)
        if context is None:
            cache = ShardedKVCache(rank_model.num_layers, reserve=sampling.max_new_tokens if is_tail else 0)
            hidden = rank_model.prefill(prompt, video_embeds, positions, strategy, plan, comm, metrics, cache)
            context = KVContext(cache, [])
        else:
            new_rows = prompt.input_ids.numel() - context.reused + max(sampling.max_new_tokens, 0)
            context.cache.continue_from(context.reused, reserve=new_rows if is_tail else 0)
            hidden = rank_model.extend(prompt, context.reused, positions, comm, metrics, context.cache, is_tail)
        context.token_ids = prompt.input_ids.tolist()
        del video_embeds
        if sampling.max_new_tokens < 1:  # prefill only
            return context
        token = next_token(hidden, metrics)
    if token in sampling.stop_ids:
        return context
    yield token
    # Each new token sits one past the previous one on all three M-RoPE axes (the prompt ends with text, where they
    # agree), as in transformers' generate and its teacher-forced forward. This is not prompt length + rope delta:
    # transformers 5 continues text after a video from its spatial extent, so the delta (from the largest position,
    # a long video's last time step) would place decode tokens up to thousands of positions too far.
    last_position = int(positions[0, -1])
    quiet = NullRecorder()  # decode is one time category: its inner attention and waits are not split out
    with metrics.span("decode"), metrics.timed(DECODE):
        for step in range(1, sampling.max_new_tokens):
            hidden = rank_model.decode_step(token, last_position + step, comm, quiet, context.cache, is_tail)
            if is_tail:
                context.cache.add_rows(torch.tensor([len(context.token_ids)]))
            context.token_ids.append(token)
            token = next_token(hidden, quiet)
            if token in sampling.stop_ids:
                return context
            yield token
    return context
