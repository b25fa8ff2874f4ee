"""Attention with log-sum-exp on the best available kernel, and the one LSE merge used everywhere.

Convention: q (Hq, Sq, D), k/v (Hkv, Sk, D), Hq % Hkv == 0, contiguous GQA grouping. `lse` is the natural-log
sum of exp(scaled scores) per query row, in float32 (float64 when the inputs are float64, so that float64 tests
can check exactness tightly). Rows that see no key get out 0 and lse -inf.

`causal` is bottom-right aligned (FlashAttention >= 2.1): row i sees key j iff j <= i + (Sk - Sq). PyTorch's
`is_causal` is top-left aligned, so a rectangular causal call is split into a non-causal prefix and a causal
square, merged by lse.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from functools import lru_cache, partial
from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

try:  # optional: the flash-attn package (CUDA only); never required
    from flash_attn import flash_attn_func as _flash_attn_func
except ImportError:  # pragma: no cover - depends on the machine
    _flash_attn_func = None

_FAST_DTYPES = (torch.float16, torch.bfloat16)
_MATH_ELEMENTS = 1 << 26  # score elements per step of the plain-math path (bounds its memory)
DECODE_ROWS = 16  # calls with at most this many query rows (decode steps) prefer kernels without per-shape plans

# (backend, dtype, q/k shapes, causal) of the calls a backend refused (not tried again for that call shape; other
# shapes still try it: kernels refuse some lengths or head counts but not others). Least recently used first and
# bounded: decode gives every step a new key length, so a long-running server would otherwise grow it forever.
_refused: OrderedDict[tuple, None] = OrderedDict()
REFUSED_MAX = 4096


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of lse and merges: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def attend(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float | None = None) -> tuple[Tensor, Tensor]:
    """Softmax attention of q over (k, v); returns (out (Hq, Sq, D) in q.dtype, lse (Hq, Sq))."""
    hq, sq, d = q.shape
    sk = k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if not causal:
        return _full(q, k, v, scale)
    if sq > sk:  # the first sq - sk rows see nothing, the rest form a causal square
        blind = sq - sk
        out, lse = _full(q[:, blind:], k, v, scale, causal=True)
        empty_out, empty_lse = _empty(q[:, :blind], lse.dtype)
        return torch.cat([empty_out, out], dim=1), torch.cat([empty_lse, lse], dim=1)
    prefix = sk - sq
    square = _full(q, k[:, prefix:], v[:, prefix:], scale, causal=True)
    if prefix == 0:
        return square
    out, lse = merge_partials([_full(q, k[:, :prefix], v[:, :prefix], scale), square])
    return out.to(q.dtype), lse


def attend_cached(q: Tensor, k: Tensor, v: Tensor, used: Tensor, scale: float | None = None) -> Tensor:
    """Attention of one decode row per head, q (Hq, 1, D), over the first `used` rows of whole cache buffers k/v
    (Hkv, C, D); `used` is a device tensor (int32, shape (1,)), so that one CUDA graph serves every length up to C.
    Returns out (Hq, 1, D) in q.dtype.

    CUDA: flash-attention's variable-length kernel, which stops at `seqused_k` (it reads the buffers in place and
    splits long caches across the GPU); elsewhere, or where that kernel refuses, SDPA with a length mask."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if q.device.type == "cuda" and q.dtype in _FAST_DTYPES and ("flash_cached", q.device) not in _refused:
        try:
            return _flash_cached(q, k, v, used, scale)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:  # no such kernel in this build or on this GPU: the masked path from now on
            _refused[("flash_cached", q.device)] = None
    return _masked_cached(q, k, v, used, scale)


def _flash_cached(q: Tensor, k: Tensor, v: Tensor, used: Tensor, scale: float) -> Tensor:
    # varlen layout (rows, heads, D): views of the (H, rows, D) buffers, no copy (the kernel takes row strides)
    cu_q, cu_k = cached_attention_lengths(q.device, k.shape[1])
    out = torch.ops.aten._flash_attention_forward(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), cu_q, cu_k, 1, k.shape[1], 0.0, False, False,
        scale=scale, seqused_k=used,
    )[0]  # fmt: skip
    return out.transpose(0, 1)


@lru_cache(maxsize=64)
def cached_attention_lengths(device: torch.device, capacity: int) -> tuple[Tensor, Tensor]:
    """The cumulative lengths `attend_cached`'s flash kernel reads on `device`: one sequence of one query row over
    `capacity` key rows. Made once (a graph capture cannot copy from the host); a CUDA graph that captured them
    must keep a reference, since this cache may drop them."""
    lengths = (torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0, capacity], dtype=torch.int32))
    return tuple(t.to(device) for t in lengths)


def _masked_cached(q: Tensor, k: Tensor, v: Tensor, used: Tensor, scale: float) -> Tensor:
    valid = (torch.arange(k.shape[1], device=k.device) < used.to(k.device))[None]  # (1, C): one query row
    with sdpa_kernel(_MASKED_BACKENDS):  # no cuDNN: it builds an execution plan per shape
        out = torch.nn.functional.scaled_dot_product_attention(
            q[None], k[None], v[None], attn_mask=valid, scale=scale, enable_gqa=True
        )
    return out[0]


_MASKED_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def merge_partials(parts: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Merge attention partials (out, lse) over disjoint key sets, all at once (`merge_stacked`).

    Returns (out, lse) in float32 (float64 if any part is float64). (0, -inf) is an exact identity.
    """
    if not parts:
        raise ValueError("merge_partials needs at least one partial")
    if len(parts) == 1:
        [(out, lse)] = parts
        acc_dtype = lse_dtype(torch.promote_types(out.dtype, lse.dtype))
        return out.to(acc_dtype), lse.to(acc_dtype)
    return merge_stacked(torch.stack([o for o, _ in parts]), torch.stack([l for _, l in parts]))


def merge_stacked(outs: Tensor, lses: Tensor) -> tuple[Tensor, Tensor]:
    """Merge P partials stacked as outs (P, H, S, D) and lses (P, H, S), max-shifted, never NaN: the same dozen
    operators for any P (a fold dispatched ~15 per partial; the query rows of W ranks merge W of them).

    Returns (out, lse) in float32 (float64 if either input is float64).
    """
    acc_dtype = lse_dtype(torch.promote_types(outs.dtype, lses.dtype))
    outs, lses = outs.to(acc_dtype), lses.to(acc_dtype)
    m = torch.nan_to_num(lses.amax(dim=0), neginf=0.0)  # rows no partial sees: weights exp(-inf) = 0, not NaN
    weights = torch.exp(lses - m)
    total = weights.sum(dim=0)  # 0 where no partial sees the row, else >= 1 (the largest weight is exactly 1)
    out = (weights.unsqueeze(-1) * outs).sum(dim=0) / total.clamp_min(1.0).unsqueeze(-1)
    return out, m + torch.log(total)


def _empty(q: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The partial of rows that see no key: out 0, lse -inf."""
    return torch.zeros_like(q), torch.full(q.shape[:2], -math.inf, dtype=dtype, device=q.device)


def _full(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool = False) -> tuple[Tensor, Tensor]:
    """Non-causal attention, or top-left causal when causal=True (only called with Sq == Sk then)."""
    if q.shape[1] == 0 or k.shape[1] == 0:
        return _empty(q, lse_dtype(q.dtype))
    for name, fn in _backends(q):
        key = (name, q.dtype, tuple(q.shape), tuple(k.shape), causal)
        if key in _refused:
            _refused.move_to_end(key)
            continue
        try:
            out, lse = fn(q, k, v, causal, scale)
        except torch.OutOfMemoryError:  # not a refusal: the kernel exists, the device is full (the caller decides)
            raise
        except RuntimeError:  # this build/GPU has no such kernel for these inputs: remember and fall through
            _refused[key] = None
            if len(_refused) > REFUSED_MAX:
                _refused.popitem(last=False)
            continue
        return out, lse.reshape(q.shape[0], -1)[:, : q.shape[1]].to(lse_dtype(q.dtype))
    return _math(q, k, v, causal, scale)


Backend = Callable[[Tensor, Tensor, Tensor, bool, float], tuple[Tensor, Tensor]]


def _backends(q: Tensor) -> tuple[tuple[str, Backend], ...]:
    if q.device.type == "cuda" and q.dtype in _FAST_DTYPES:
        # decode rows: cuDNN builds an execution plan per new key length (~100 ms); flash kernels need none
        return _CUDA_DECODE if q.shape[1] <= DECODE_ROWS else _CUDA_PREFILL
    if q.device.type == "cpu":
        return _CPU
    return ()


def _batched(q: Tensor, k: Tensor, v: Tensor, expand: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(1, H, S, D) views; KV repeated to Hq heads when the kernel does not take GQA."""
    if expand and k.shape[0] != q.shape[0]:
        group = q.shape[0] // k.shape[0]
        k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
    return q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)


def _cpu_flash(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    qb, kb, vb = _batched(q, k, v, expand=False)  # takes GQA natively (environment.md)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qb, kb, vb, 0.0, causal, scale=scale)
    return out[0], lse[0]


def _sdpa_cudnn(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, expand: bool) -> tuple[Tensor, Tensor]:
    qb, kb, vb = (t.contiguous() for t in _batched(q, k, v, expand))
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(qb, kb, vb, None, True, 0.0, causal, False, scale=scale)
    return res[0][0], res[1][0]


def _sdpa_flash(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, expand: bool) -> tuple[Tensor, Tensor]:
    qb, kb, vb = (t.contiguous() for t in _batched(q, k, v, expand))
    res = torch.ops.aten._scaled_dot_product_flash_attention(qb, kb, vb, 0.0, causal, False, scale=scale)
    return res[0][0], res[1][0]


def _flash_attn(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    # flash-attn layout is (B, S, H, D); it takes GQA natively (causal is only used on squares here)
    qb, kb, vb = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    out, lse, _ = _flash_attn_func(qb, kb, vb, 0.0, scale, causal, return_attn_probs=True)
    return out[0].transpose(0, 1), lse[0]


# native GQA first; if a kernel refuses it, the same kernel with KV repeated to Hq heads
_CUDNN: tuple[tuple[str, Backend], ...] = (
    ("cudnn_gqa", partial(_sdpa_cudnn, expand=False)),
    ("cudnn", partial(_sdpa_cudnn, expand=True)),
)
_FLASH: tuple[tuple[str, Backend], ...] = (
    *((("flash_attn", _flash_attn),) if _flash_attn_func is not None else ()),
    ("sdpa_flash_gqa", partial(_sdpa_flash, expand=False)),
    ("sdpa_flash", partial(_sdpa_flash, expand=True)),
)
_CUDA_PREFILL, _CUDA_DECODE = _CUDNN + _FLASH, _FLASH + _CUDNN
_CPU: tuple[tuple[str, Backend], ...] = (("cpu_flash", _cpu_flash),)


def _math(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """Plain softmax in (at least) float32, chunked over query rows; any device and dtype."""
    acc = lse_dtype(q.dtype)
    group = q.shape[0] // k.shape[0]
    kf = k.to(acc).repeat_interleave(group, dim=0)
    vf = v.to(acc).repeat_interleave(group, dim=0)
    step = max(1, _MATH_ELEMENTS // (q.shape[0] * k.shape[1]))
    outs, lses = [], []
    for start in range(0, q.shape[1], step):
        qc = q[:, start : start + step].to(acc)
        scores = torch.matmul(qc, kf.transpose(1, 2)) * scale
        if causal:
            rows = torch.arange(start, start + qc.shape[1], device=q.device)
            hidden = torch.arange(k.shape[1], device=q.device)[None, :] > rows[:, None]
            scores = scores.masked_fill(hidden, -math.inf)
        lse = torch.logsumexp(scores, dim=-1)
        outs.append(torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), vf))
        lses.append(lse)
    return torch.cat(outs, dim=1).to(q.dtype), torch.cat(lses, dim=1)
