"""The sharded KV cache: each rank keeps its own share of every layer's keys and values.

After prefill, rank r holds K/V of the rows its `RankLayout.cache_rows` names (the union over ranks is every
prompt token exactly once). During decoding only the tail rank appends the new token's K/V; every rank attends
the new query to its share and the partials are merged across ranks by log-sum-exp
(`apbv.attention.decode.distributed_attention`), which is exact.
"""

from __future__ import annotations

import torch


class ShardedKVCache:
    """Per-layer K/V storage for one rank, (Hkv, S, D) per layer, with room reserved for decode tokens."""

    def __init__(self, num_layers: int, reserve: int) -> None:
        self._keys: list[torch.Tensor | None] = [None] * num_layers
        self._values: list[torch.Tensor | None] = [None] * num_layers
        self._lengths = [0] * num_layers
        self._reserve = reserve

    def store(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Keep this rank's prefill share of one layer (copied into a buffer with `reserve` spare rows)."""
        hkv, n, d = keys.shape
        kbuf = keys.new_empty(hkv, n + self._reserve, d)
        vbuf = values.new_empty(hkv, n + self._reserve, d)
        kbuf[:, :n] = keys
        vbuf[:, :n] = values
        self._keys[layer_idx], self._values[layer_idx], self._lengths[layer_idx] = kbuf, vbuf, n

    def append(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append decode-token K/V (Hkv, t, D), growing the buffer when the reserve is used up."""
        n, t = self._lengths[layer_idx], keys.shape[1]
        kbuf, vbuf = self._keys[layer_idx], self._values[layer_idx]
        if n + t > kbuf.shape[1]:
            capacity = max(n + t, 2 * kbuf.shape[1])
            kbuf, vbuf = (self._grown(buf, n, capacity) for buf in (kbuf, vbuf))
            self._keys[layer_idx], self._values[layer_idx] = kbuf, vbuf
        kbuf[:, n : n + t] = keys
        vbuf[:, n : n + t] = values
        self._lengths[layer_idx] = n + t

    @staticmethod
    def _grown(buf: torch.Tensor, used: int, capacity: int) -> torch.Tensor:
        out = buf.new_empty(buf.shape[0], capacity, buf.shape[2])
        out[:, :used] = buf[:, :used]
        return out

    def get(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = self._lengths[layer_idx]
        return self._keys[layer_idx][:, :n], self._values[layer_idx][:, :n]

