"""Packed vision attention: equal to block-diagonal attention in float64 (every path: batched equal lengths,
per-sequence unequal lengths, and PyTorch's varlen flash kernel on CUDA), and the vision tower gives the same
embeddings with it as with transformers' own SDPA loop."""

from __future__ import annotations

import pytest
import torch

from apbv.model.tiny import tiny_config
from apbv.model.vision_attention import VISION_ATTN_IMPLEMENTATION, packed_attention, set_attention

from .reference import masked_attention

BF16_TOL = 2e-2  # bf16 inputs and outputs: ~3 significant digits
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _block_reference(q, k, v, lengths):
    """float64 attention of (1, H, L, D) inputs under a block-diagonal mask -> (L, H, D)."""
    total = sum(lengths)
    mask = torch.zeros(1, total, total, dtype=torch.bool)
    start = 0
    for n in lengths:
        mask[:, start : start + n, start : start + n] = True
        start += n
    out, _ = masked_attention(*(t[0].cpu().double() for t in (q, k, v)), mask)
    return out.transpose(0, 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lengths", [[16, 16, 16, 16], [7, 64, 1, 30]])
def test_packed_attention_equals_block_diagonal_reference(device, lengths):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, sum(lengths), 32, generator=g).to(device, dtype) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    out, _ = packed_attention(None, q, k, v, None, scaling=32**-0.5, cu_seq_lens_q=cu, max_length_q=max(lengths))
    assert out.shape == (1, sum(lengths), 4, 32) and out.dtype == dtype
    tol = BF16_TOL if dtype == torch.bfloat16 else 1e-5  # fp32 accumulation over at most 64 keys
    torch.testing.assert_close(out[0].cpu().double(), _block_reference(q, k, v, lengths), atol=tol, rtol=tol)


def test_packed_attention_needs_sequence_boundaries():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="cu_seq_lens_q"):
        packed_attention(None, q, q, q, None)


@pytest.mark.parametrize("grid", [[[4, 8, 8]], [[2, 8, 8], [4, 6, 10]]])
def test_vision_tower_same_with_packed_attention(grid):
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration._from_config(tiny_config()).eval()
    grid_thw = torch.tensor(grid)
    pixels = torch.randn(int(grid_thw.prod(-1).sum()), 3 * 2 * 14 * 14)
    embeddings = {}
    for implementation in ("sdpa", VISION_ATTN_IMPLEMENTATION):
        set_attention(model, "sdpa", implementation)
        assert model.model.visual.blocks[0].attn.config._attn_implementation == implementation  # what the tower reads
        with torch.no_grad():
            embeddings[implementation] = model.model.visual(pixels, grid_thw=grid_thw).pooler_output
    torch.testing.assert_close(embeddings[VISION_ATTN_IMPLEMENTATION], embeddings["sdpa"], atol=1e-5, rtol=1e-5)
