"""Packed (variable-length) attention for the Qwen2.5-VL vision tower.

The vision tower attends within windows and within temporal patches: thousands of short, independent sequences
per video. With transformers' "sdpa" it loops over them in Python, one kernel launch each. Registered under a
name containing "flash", this function receives the packed sequence with its `cu_seq_lens` instead and runs it
in one call: PyTorch's varlen flash kernel on CUDA (fp16/bf16), else one batched SDPA call when all sequences
have the same length (frames of one size), else one SDPA call per sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface, PreTrainedModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

VISION_ATTN_IMPLEMENTATION = "apbv_flash_varlen"


@torch.compiler.disable  # compiled vision blocks call the kernel as it is, at a graph break
def packed_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    cu_seq_lens_q: Tensor | None = None,
    max_length_q: int | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """Non-causal attention of q, k, v (1, H, L, D) within the sequences [cu[i], cu[i+1]) -> (1, L, H, D)."""
    if cu_seq_lens_q is None:
        raise ValueError("packed_attention needs cu_seq_lens_q (it serves the vision tower only)")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (L, H, D)
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        from torch.nn.attention.varlen import varlen_attn

        cu = cu_seq_lens_q.to(device=q.device, dtype=torch.int32)
        max_len = int(max_length_q) if max_length_q is not None else int((cu[1:] - cu[:-1]).max())
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scaling)[None], None
    lengths = (cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).tolist()
    if len(set(lengths)) == 1:  # (n, H, l, D): one batched call
        n, length = len(lengths), lengths[0]
        qs, ks, vs = (t.reshape(n, length, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qs, ks, vs, scale=scaling).transpose(1, 2)
        return out.reshape(1, *q.shape), None
    outs = [
        F.scaled_dot_product_attention(*(t.transpose(0, 1) for t in chunk), scale=scaling).transpose(0, 1)
        for chunk in zip(*(torch.split(t, lengths) for t in (q, k, v)))
    ]
    return torch.cat(outs)[None], None


AttentionInterface.register(VISION_ATTN_IMPLEMENTATION, packed_attention)


def set_attention(model: PreTrainedModel, text: str, vision: str = VISION_ATTN_IMPLEMENTATION) -> None:
    """Run a Qwen2.5-VL model's language layers on the registered attention `text` and its vision tower on `vision`.

    The vision name is written to the vision config directly: set_attn_implementation preloads a flash-attention
    package for every name containing "flash" (transformers 5.25; 5.17 did not), and a registered function has
    none to load. The tower reads the name from its config when it runs, so nothing else changes.
    """
    if vision not in ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]:
        raise ValueError(f"{vision!r} is not a registered attention function")
    model.set_attn_implementation({"text_config": text, "vision_config": "sdpa"})
    model.config.vision_config._attn_implementation_internal = vision
