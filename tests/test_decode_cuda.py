"""CUDA only: decode with CUDA graphs gives exactly the tokens and hidden states of eager decode."""

from __future__ import annotations

import pytest
import torch

from apbv.comm import Comm
from apbv.metrics import NullRecorder
from apbv.model.cache import ShardedKVCache
from apbv.model.decode_step import DecodeStep
from apbv.model.tiny import tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@torch.inference_mode()
def test_graph_decode_equals_eager_decode_token_for_token():
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration._from_config(tiny_config(), dtype=torch.bfloat16).cuda().eval()
    text = model.model.language_model
    model.set_attn_implementation({"text_config": "sdpa", "vision_config": "sdpa"})
    steps = {"graphs": DecodeStep(text, use_graphs=True), "eager": DecodeStep(text, use_graphs=False)}
    heads, dim = text.config.num_key_value_heads, text.config.hidden_size // text.config.num_attention_heads
    prefill = [torch.randn(heads, 300, dim, device="cuda", dtype=torch.bfloat16) for _ in text.layers]
    runs = {}
    for name, step in steps.items():
        cache = ShardedKVCache(len(text.layers), reserve=40)
        for layer, kv in enumerate(prefill):
            cache.store(layer, kv, kv)
        token, tokens, hiddens = 5, [], []
        for i in range(40):  # past the reserve: the cache grows while the graphs keep running
            hidden = step(token, 300 + i, Comm.single("cuda"), NullRecorder(), cache, is_tail=True)
            token = int(torch.argmax(model.lm_head(hidden)))
            tokens.append(token)
            hiddens.append(hidden.float())
        runs[name] = (tokens, torch.stack(hiddens))
    assert runs["graphs"][0] == runs["eager"][0]
    torch.testing.assert_close(runs["graphs"][1], runs["eager"][1], rtol=0, atol=0)
