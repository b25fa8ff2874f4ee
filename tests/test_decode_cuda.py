"""CUDA only: decode with CUDA graphs gives exactly the tokens and hidden states of eager decode on one rank (the
whole token in one graph, its attention over the cache buffers up to a device-side length), also while the cache
grows past its reserve (the graph is captured again). The W-rank path (pieces around the merged attention) equals
the one-rank path in `tests/test_decode_step.py`."""

from __future__ import annotations

import pytest
import torch

from apbv.comm import Comm
from apbv.metrics import NullRecorder
from apbv.model.cache import ShardedKVCache
from apbv.model.decode_step import DecodeStep
from apbv.model.tiny import tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PROMPT, TOKENS, RESERVE = 300, 40, 25


def _decode(model, use_graphs: bool, comm: Comm, prompt: list[torch.Tensor]) -> tuple[list[int], torch.Tensor]:
    text = model.model.language_model
    cache = ShardedKVCache(len(text.layers), reserve=RESERVE)
    for layer, kv in enumerate(prompt):
        cache.store(layer, kv, kv)
    step, token, tokens, hiddens = DecodeStep(text, use_graphs=use_graphs), 5, [], []
    for i in range(TOKENS):  # past the reserve: the cache grows (and the one-rank graph is captured again)
        hidden = step(token, PROMPT + i, comm, NullRecorder(), cache, is_tail=True)
        token = int(torch.argmax(model.lm_head(hidden)))
        tokens.append(token)
        hiddens.append(hidden.float())
    return tokens, torch.stack(hiddens)


@torch.inference_mode()
def test_graph_decode_equals_eager_decode_token_for_token():
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration._from_config(tiny_config(), dtype=torch.bfloat16).cuda().eval()
    text = model.model.language_model
    model.set_attn_implementation({"text_config": "sdpa", "vision_config": "sdpa"})
    heads, dim = text.config.num_key_value_heads, text.config.hidden_size // text.config.num_attention_heads
    prompt = [torch.randn(heads, PROMPT, dim, device="cuda", dtype=torch.bfloat16) for _ in text.layers]
    runs = {}
    for use_graphs in (True, False):
        runs[use_graphs] = _decode(model, use_graphs, Comm.single("cuda"), prompt)
    assert runs[True][0] == runs[False][0]
    torch.testing.assert_close(runs[True][1], runs[False][1], rtol=0, atol=0)
