"""Padding the vision MLP to aligned widths changes nothing the vision tower computes (fp32, CPU)."""

from __future__ import annotations

import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from apbv.inputs import ProcessorSpec, patchify
from apbv.model.qwen2_5_vl import merged_vision_tokens
from apbv.model.tiny import tiny_config
from apbv.model.vision_attention import set_attention
from apbv.model.vision_tuning import PAD_MULTIPLE, pad_mlp_widths


def test_padded_vision_mlp_gives_the_same_embeddings():
    torch.manual_seed(0)
    config = tiny_config(vision_config={"intermediate_size": 100, "hidden_act": "silu"})
    model = Qwen2_5_VLForConditionalGeneration._from_config(config).eval()
    set_attention(model, "sdpa")
    frames = torch.randint(0, 256, (4, 112, 112, 3), dtype=torch.uint8)
    pixels, grid = patchify(frames, ProcessorSpec())
    with torch.inference_mode():
        before = merged_vision_tokens(model.model.visual, pixels, grid)
        assert pad_mlp_widths(model.model.visual) == 128 and 128 % PAD_MULTIPLE == 0
        after = merged_vision_tokens(model.model.visual, pixels, grid)
    mlp = model.model.visual.blocks[0].mlp
    assert (mlp.gate_proj.out_features, mlp.up_proj.out_features, mlp.down_proj.in_features) == (128, 128, 128)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    assert pad_mlp_widths(model.model.visual) == 128  # idempotent
