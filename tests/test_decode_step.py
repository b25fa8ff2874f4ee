"""A token decoded alone on one rank (the whole-token path, one CUDA graph on a GPU) equals the same token decoded
on two ranks over the sharded cache (the piecewise path with the cross-rank merge), float32 on CPU, including
when the cache runs out of spare rows and grows."""

from __future__ import annotations

import torch

from apbv.comm import Comm
from apbv.metrics import NullRecorder
from apbv.model.cache import ShardedKVCache
from apbv.model.decode_step import DecodeStep
from apbv.model.tiny import tiny_config
from apbv.thread_comm import ThreadWorld

PROMPT, TOKENS, RESERVE = 37, 24, 5  # the reserve runs out after 5 tokens: the cache grows twice


def _model():
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration._from_config(tiny_config(), dtype=torch.float32).eval()
    model.set_attn_implementation({"text_config": "sdpa", "vision_config": "sdpa"})
    return model


def _decode(model, comm: Comm, shares: list[torch.Tensor]) -> tuple[list[int], torch.Tensor]:
    text = model.model.language_model
    is_tail = comm.rank == comm.world_size - 1
    cache = ShardedKVCache(len(text.layers), reserve=RESERVE if is_tail else 0)
    for layer, kv in enumerate(shares[comm.rank]):
        cache.store(layer, kv, kv * 0.5)
    step, token, tokens, hiddens = DecodeStep(text, use_graphs=False), 3, [], []
    for i in range(TOKENS):
        hidden = step(token, PROMPT + i, comm, NullRecorder(), cache, is_tail)
        token = int(torch.argmax(model.lm_head(hidden)))
        tokens.append(token)
        hiddens.append(hidden)
    assert cache.length == (PROMPT if comm.world_size == 1 else shares[comm.rank][0].shape[1]) + TOKENS * is_tail
    return tokens, torch.stack(hiddens)


@torch.inference_mode()
def test_one_rank_whole_token_equals_two_rank_pieces():
    model = _model()
    text = model.model.language_model
    heads, dim = text.config.num_key_value_heads, text.config.hidden_size // text.config.num_attention_heads
    prompt = [torch.randn(heads, PROMPT, dim) for _ in text.layers]
    alone = _decode(model, Comm.single("cpu"), [prompt])
    halves = [[kv[:, :20] for kv in prompt], [kv[:, 20:] for kv in prompt]]
    with ThreadWorld(2) as world:
        sharded = world.run(lambda rank, comm: _decode(model, comm, halves))
    for tokens, hiddens in sharded:  # identical on both ranks
        assert tokens == alone[0]
        torch.testing.assert_close(hiddens, alone[1], rtol=1e-5, atol=1e-5)
    assert len(set(alone[0])) > 1  # the tokens depend on the cache: not one repeated argmax


@torch.inference_mode()
def test_a_dropped_cache_frees_its_buffers_though_its_token_was_decoded_last():
    """The decode step keeps no reference to the last cache it decoded over (a conversation evicted from the
    context cache must free its K/V), and decodes the next cache as before."""
    import gc
    import weakref

    model = _model()
    text = model.model.language_model
    heads, dim = text.config.num_key_value_heads, text.config.hidden_size // text.config.num_attention_heads
    step = DecodeStep(text, use_graphs=False)

    def cache_of(rows: int) -> ShardedKVCache:
        cache = ShardedKVCache(len(text.layers), reserve=2)
        for layer in range(len(text.layers)):
            kv = torch.randn(heads, rows, dim)
            cache.store(layer, kv, kv)
        return cache

    first = cache_of(10)
    step(3, 10, Comm.single("cpu"), NullRecorder(), first, is_tail=True)
    freed = weakref.ref(first.buffers()[0][0])
    del first
    gc.collect()
    assert freed() is None
    second = cache_of(12)
    step(3, 12, Comm.single("cpu"), NullRecorder(), second, is_tail=True)
    assert second.length == 13
