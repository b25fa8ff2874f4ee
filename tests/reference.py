"""Independent float64 references for the tests (written from the spec; shares no code with apbv.attention).

- `masked_attention`: softmax attention under an explicit boolean mask, float64, with lse.
- `causal_mask`: bottom-right causal mask.
- `anchored_mask`: the APB-V / APB / Star visibility pattern of spec Appendix A, including the query-aware
  selection (fp32 scores, max-pool inside each host, per-KV-head top-k with ties to the earlier position).
- `spec_layout`: anchor, host ranges, selection counts and budgets straight from the spec formulas (§1.2, §7).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float | None = None) -> tuple[Tensor, Tensor]:
    """q (Hq, Sq, D), k/v (Hkv, Sk, D), mask (Hkv or 1, Sq, Sk) True = visible. Returns float64 (out, lse)."""
    hq, d = q.shape[0], q.shape[-1]
    group = hq // k.shape[0]
    scale = 1 / math.sqrt(d) if scale is None else scale
    kk = k.double().repeat_interleave(group, 0)
    vv = v.double().repeat_interleave(group, 0)
    m = mask.repeat_interleave(group, 0) if mask.shape[0] > 1 else mask
    scores = (q.double() @ kk.transpose(1, 2)) * scale
    scores = scores.masked_fill(~m, -math.inf)
    lse = torch.logsumexp(scores, -1)
    probs = torch.where(m, torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None]), 0.0)
    return probs @ vv, lse


def causal_mask(sq: int, sk: int) -> Tensor:
    """(1, sq, sk): row i sees key j iff j <= i + sk - sq."""
    rows = torch.arange(sq)[:, None]
    return (torch.arange(sk)[None, :] <= rows + sk - sq)[None]


def spec_layout(strategy: str, n: int, w: int, align: int, anchor_ratio: float, passing_ratio: float):
    """(A, host ranges, k per host) for the anchored strategies, from the spec formulas."""

    def aligned(x: float) -> int:
        return align * math.ceil(math.floor(x) / align)

    if strategy == "star":
        a = math.ceil(n / w)
        hosts = [(min(n, a + i * a), min(n, a + (i + 1) * a)) for i in range(w - 1)]
        return a, hosts, [0] * len(hosts)
    a = min(n, aligned(n * anchor_ratio))
    budget = aligned(n * passing_ratio) * (2 if strategy == "apb" else 1)
    n_hosts = 2 * w if strategy == "apbv" else w
    bl = math.ceil((n - a) / n_hosts)
    hosts = [(min(n, a + h * bl), min(n, a + (h + 1) * bl)) for h in range(n_hosts)]
    return a, hosts, [min(budget, e - s) for s, e in hosts]


def anchored_mask(q: Tensor, k: Tensor, n: int, anchor: int, hosts, counts, pool: int) -> Tensor:
    """(Hkv, S, S) visibility of the anchored pattern over the global sequence [context n | query]."""
    hkv, s = k.shape[0], k.shape[1]
    hq, d = q.shape[0], q.shape[-1]
    qbar = q[:, n:].float().reshape(hkv, hq // hkv, s - n, d).mean(dim=(1, 2))
    mask = causal_mask(s, s).repeat(hkv, 1, 1)  # anchor rows and query rows: dense causal
    selected = [[_top(k[h, a:b].float() @ qbar[h], c, pool, a) for h in range(hkv)] for (a, b), c in zip(hosts, counts)]
    for g, (a, b) in enumerate(hosts):
        for h in range(hkv):
            visible = torch.zeros(s, dtype=torch.bool)
            visible[:anchor] = True
            for j in range(g):
                visible[selected[j][h]] = True
            mask[h, a:b, :a] = visible[:a]  # rows of host g: passing + anchor, then their own block causally
    return mask


def _top(raw: Tensor, count: int, pool: int, offset: int) -> list[int]:
    """Global indices of the `count` best max-pooled scores inside one block; ties to the earlier position."""
    half = pool // 2
    pooled = [max(raw[max(0, t - half) : t + half + 1].tolist()) for t in range(raw.numel())]
    order = sorted(range(len(pooled)), key=lambda t: (-pooled[t], t))
    return [offset + t for t in order[:count]]


def antialiased_bicubic(frames, size: tuple[int, int]):
    """Float64 antialiased bicubic resize of (T, H, W, 3) frames to `size`, as torchvision computes it (Keys cubic
    with a = -0.5, its support widened by the scale when shrinking, weights normalised, separable): the reference
    for qwen-vl-utils' resize. Returns float64 (T, h, w, 3), unrounded."""
    import numpy as np

    def weights(n_in: int, n_out: int) -> np.ndarray:
        scale = n_in / n_out
        support, stretch = (2 * scale, 1 / scale) if scale >= 1 else (2.0, 1.0)
        out = np.zeros((n_out, n_in))
        for i in range(n_out):
            center = scale * (i + 0.5)
            lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
            x = np.abs((np.arange(lo, hi) - center + 0.5) * stretch)
            w = np.where(x < 1, (1.5 * x - 2.5) * x * x + 1, np.where(x < 2, ((-0.5 * x + 2.5) * x - 4) * x + 2, 0.0))
            out[i, lo:hi] = w / w.sum()
        return out

    x = np.asarray(frames, dtype=np.float64)
    rows, cols = weights(x.shape[1], size[0]), weights(x.shape[2], size[1])
    return np.einsum("oh,thwc->towc", rows, np.einsum("pw,thwc->thpc", cols, x))
