"""Query-aware key selection (spec §3.1–§3.3): which K/V entries of a host block are passed to later hosts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def mean_query(q_query: Tensor, n_kv_heads: int) -> Tensor:
    """(Hkv, D) float32: the query rows (Hq, Lq, D) averaged over query tokens and each contiguous GQA group."""
    hq, lq, d = q_query.shape
    return q_query.float().reshape(n_kv_heads, (hq // n_kv_heads) * lq, d).mean(dim=1)


def block_scores(k_block: Tensor, qbar: Tensor, pool_kernel: int) -> Tensor:
    """(Hkv, B) float32 scores of one host block: k . qbar (no scaling), max-pooled inside the block only."""
    raw = torch.einsum("hsd,hd->hs", k_block.float(), qbar)
    if pool_kernel == 1 or raw.shape[1] == 0:
        return raw
    # max_pool1d pads with -inf, so windows never reach outside the block (spec §9.5)
    return F.max_pool1d(raw.unsqueeze(1), pool_kernel, stride=1, padding=pool_kernel // 2).squeeze(1)


def top_indices(scores: Tensor, count: int) -> Tensor:
    """(Hkv, count) indices of the largest scores per row, ascending; ties at the cut go to the earlier positions
    (deterministic: max-pooled scores tie often). No full sort and no host synchronisation: one top-k finds each
    row's cut-off score, a second picks the kept positions (all above the cut, then the earliest at it)."""
    if count == 0:
        return scores.new_zeros(scores.shape[0], 0, dtype=torch.long)
    cut = torch.topk(scores, count, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
    above = scores > cut
    at_cut = (scores == cut) & (torch.cumsum(scores == cut, dim=1) <= count - above.sum(dim=1, keepdim=True))
    positions = torch.arange(scores.shape[1], device=scores.device, dtype=torch.float32)
    keys = torch.where(above | at_cut, -positions, -torch.inf)  # kept ones, earliest first
    return torch.topk(keys, count, dim=1).indices


def select_kv(k_block: Tensor, v_block: Tensor, qbar: Tensor, count: int, pool_kernel: int) -> Tensor:
    """The `count` best entries per KV head of a block, packed as (Hkv, count, 2D) = [K | V]."""
    idx = top_indices(block_scores(k_block, qbar, pool_kernel), count)
    idx = idx.unsqueeze(-1).expand(-1, -1, k_block.shape[-1])
    return torch.cat([k_block.gather(1, idx), v_block.gather(1, idx)], dim=-1)
