"""The sharded KV cache: each rank keeps its own share of every layer's keys and values.

After prefill, rank r holds K/V of the rows its `RankLayout.cache_rows` names (the union over ranks is every
prompt token exactly once). During decoding only the tail rank appends the new token's K/V; every rank attends
the new query to its share and the partials are merged across ranks by log-sum-exp
(`apbv.attention.decode.distributed_attention`), which is exact. The cache knows the prompt position of each of its
rows, so that a follow-up turn can keep the rows of the tokens it shares with this one (`continue_from`) and append
its own.
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
        self._rows: list[torch.Tensor] = []  # the prompt position of each row, in order (the same for every layer)

    def store(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Keep this rank's prefill share of one layer (copied into a buffer with `reserve` spare rows)."""
        hkv, n, d = keys.shape
        kbuf = keys.new_empty(hkv, n + self._reserve, d)
        vbuf = values.new_empty(hkv, n + self._reserve, d)
        kbuf[:, :n], kbuf[:, n:] = keys, 0  # spare rows zero: a masked kernel multiplies them by 0, never NaN
        vbuf[:, :n], vbuf[:, n:] = values, 0
        self._keys[layer_idx], self._values[layer_idx], self._lengths[layer_idx] = kbuf, vbuf, n

    def append(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append decode-token K/V (Hkv, t, D), growing the buffer when the reserve is used up."""
        n, t = self._lengths[layer_idx], keys.shape[1]
        self._make_room(layer_idx, t)
        self._keys[layer_idx][:, n : n + t] = keys
        self._values[layer_idx][:, n : n + t] = values
        self._lengths[layer_idx] = n + t

    def make_room(self, rows: int) -> None:
        """Grow every layer's buffers (doubling) where fewer than `rows` spare rows are left."""
        for layer_idx in range(len(self._keys)):
            self._make_room(layer_idx, rows)

    def _make_room(self, layer_idx: int, rows: int) -> None:
        n, kbuf = self._lengths[layer_idx], self._keys[layer_idx]
        if n + rows > kbuf.shape[1]:
            capacity = max(n + rows, 2 * kbuf.shape[1])
            self._keys[layer_idx] = self._grown(kbuf, n, capacity)
            self._values[layer_idx] = self._grown(self._values[layer_idx], n, capacity)

    @property
    def length(self) -> int:
        """Rows held per layer (the same in every layer between tokens)."""
        return self._lengths[0]

    def buffers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's whole (keys, values) buffers, (Hkv, capacity, D): rows past `length` are spare."""
        return list(zip(self._keys, self._values))

    def advance(self, rows: int) -> None:
        """Count `rows` more rows in every layer, written into the spare rows of `buffers()` in place."""
        self._lengths = [n + rows for n in self._lengths]

    @staticmethod
    def _grown(buf: torch.Tensor, used: int, capacity: int) -> torch.Tensor:
        out = buf.new_empty(buf.shape[0], capacity, buf.shape[2])
        out[:, :used], out[:, used:] = buf[:, :used], 0
        return out

    def get(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = self._lengths[layer_idx]
        return self._keys[layer_idx][:, :n], self._values[layer_idx][:, :n]

    def add_rows(self, rows: torch.Tensor) -> None:
        """Record the prompt positions of rows just stored or appended (in every layer)."""
        self._rows.append(rows.to("cpu", torch.int64))

    @property
    def rows(self) -> torch.Tensor:
        """The prompt position of each row, in storage order."""
        if len(self._rows) != 1:
            self._rows = [torch.cat(self._rows) if self._rows else torch.empty(0, dtype=torch.int64)]
        return self._rows[0]

    def continue_from(self, position: int, reserve: int) -> None:
        """Make the cache hold a conversation up to `position`: drop the rows of positions >= `position` (every
        layer, the others kept in order) and make room for `reserve` more rows."""
        keep = self.rows < position
        spare = min(buf.shape[1] - n for buf, n in zip(self._keys, self._lengths))
        if bool(keep.all()) and spare >= reserve:
            return
        index = keep.nonzero()[:, 0]
        self._reserve = reserve
        for layer_idx in range(len(self._keys)):
            keys, values = self.get(layer_idx)
            device_index = index.to(keys.device)
            self.store(layer_idx, keys[:, device_index], values[:, device_index])
        self._rows = [self.rows[keep]]

    @property
    def bytes_per_row(self) -> int:
        """K/V bytes of one token over all layers (the same on every rank of a model)."""
        return sum(2 * k.shape[0] * k.shape[2] * k.element_size() for k in self._keys if k is not None)
