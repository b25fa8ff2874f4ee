"""Making the vision tower run near the GPU's peak without changing what it computes.

- `pad_mlp_widths`: Qwen2.5-VL's vision MLP is 3420 wide, not a multiple of 8, which keeps cuBLAS off its Hopper
  kernels. Zero rows appended to gate/up (and zero columns to down) pad it to a multiple of 64: the padded units
  are act(0) * up = 0 and contribute nothing, so the output is unchanged. Done at load, in memory only.
- `compile_blocks`: `torch.compile` of each block (the attention kernel itself stays the packed varlen call, outside
  the compiled graph), which fuses the norms, rotary embedding, activations and residuals; shapes are dynamic, so
  one compilation serves every video size.
"""

from __future__ import annotations

import torch
from torch import nn

PAD_MULTIPLE = 64


def pad_mlp_widths(visual: nn.Module, multiple: int = PAD_MULTIPLE) -> int:
    """Pad every vision block's MLP width to a multiple of `multiple` (in place); returns the padded width (or
    the width itself when nothing needed padding). Blocks without a gate/up/down MLP are left alone."""
    widths = set()
    for block in getattr(visual, "blocks", []):
        mlp = getattr(block, "mlp", None)
        if not all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj")):
            continue
        width = mlp.gate_proj.out_features
        extra = -width % multiple
        if extra:
            mlp.gate_proj, mlp.up_proj = (_more_outputs(p, extra) for p in (mlp.gate_proj, mlp.up_proj))
            mlp.down_proj = _more_inputs(mlp.down_proj, extra)
        widths.add(width + extra)
    return max(widths, default=0)


def _more_outputs(linear: nn.Linear, extra: int) -> nn.Linear:
    grown = _like(linear, linear.in_features, linear.out_features + extra)
    with torch.no_grad():
        grown.weight[: linear.out_features] = linear.weight
        grown.weight[linear.out_features :] = 0
        if linear.bias is not None:
            grown.bias[: linear.out_features] = linear.bias
            grown.bias[linear.out_features :] = 0
    return grown


def _more_inputs(linear: nn.Linear, extra: int) -> nn.Linear:
    grown = _like(linear, linear.in_features + extra, linear.out_features)
    with torch.no_grad():
        grown.weight[:, : linear.in_features] = linear.weight
        grown.weight[:, linear.in_features :] = 0
        if linear.bias is not None:
            grown.bias.copy_(linear.bias)
    return grown


def _like(linear: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=linear.bias is not None, device=linear.weight.device,
                     dtype=linear.weight.dtype).requires_grad_(linear.weight.requires_grad)  # fmt: skip


def compile_blocks(visual: nn.Module) -> None:
    """torch.compile every vision block (dynamic shapes), in place."""
    for block in visual.blocks:
        block.forward = torch.compile(block.forward, dynamic=True)
