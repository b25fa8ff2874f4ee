"""The frame resize of qwen-vl-utils: torchvision's bicubic with antialias on float pixels, rounded back to uint8.

`torch.nn.functional.interpolate(x.float(), size, mode="bicubic", align_corners=False, antialias=True)`, clamped to
[0, 255] and rounded, is what `torchvision.transforms.functional.resize(uint8 video, size, BICUBIC, antialias=True)`
computes; it runs on whatever device the frames are on (a GPU rank resizes on its GPU). Frames are resized in
chunks so that the float copies stay small at 1440p.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resize_frames(frames: torch.Tensor, size: tuple[int, int], chunk: int | None = None) -> torch.Tensor:
    """(T, H, W, 3) uint8 frames -> (T, height, width, 3) uint8 on the same device. chunk: frames per step (default:
    16 on a GPU; 1 on a CPU, where one preallocated frame is faster than large temporary buffers)."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got {tuple(frames.shape)} {frames.dtype}")
    if tuple(frames.shape[1:3]) == tuple(size):
        return frames
    chunk = chunk or (16 if frames.device.type == "cuda" else 1)
    out = torch.empty((frames.shape[0], *size, 3), dtype=torch.uint8, device=frames.device)
    buffer = None
    for start in range(0, frames.shape[0], chunk):
        part = frames[start : start + chunk].permute(0, 3, 1, 2)
        if buffer is None or buffer.shape[0] != part.shape[0]:
            buffer = torch.empty(part.shape, dtype=torch.float32, device=frames.device)
        buffer.copy_(part)
        resized = F.interpolate(buffer, size=tuple(size), mode="bicubic", align_corners=False, antialias=True)
        out[start : start + chunk] = resized.clamp_(0, 255).round_().permute(0, 2, 3, 1)
    return out
