"""Per-rank cache of conversations' K/V, so that a follow-up question prefills only its new turn.

After a request, every rank of its group keeps its share of the K/V of the prompt and the answer
(`apbv.model.generate.KVContext`) under what they depend on besides the tokens (`ContextKey`: the video's cache
key, the strategy and its parameters, the ranks). A later request under the same key whose tokens start with
those of a cached conversation (its history is that conversation: same video, earlier question and answer)
continues it: the shared tokens' K/V are kept and only the rest of its prompt is prefilled, with exact attention
over the cache (`QwenVLRank.extend`); reading and encoding the video are skipped. Bounded in bytes per rank, least
recently stored first out, identically on every rank of a group (`ContextCache`); the ranks also check that
they took the same entry (`continued_context`), so a mismatch means a full prefill on all, never a hang.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from apbv.attention.config import AttentionConfig
from apbv.comm import Comm
from apbv.metrics import MetricsRecorder
from apbv.model.generate import KVContext

from .video_cache import VideoKey


@dataclass(frozen=True)
class ContextKey:
    video: VideoKey
    attention: AttentionConfig
    world_size: int


class ContextCache:
    """Conversations' K/V on this rank's device, about `max_bytes` of them per number of ranks (0: off).

    Every rank of a group must keep and evict the same entries, so an entry is accounted by what every rank
    computes alike (its tokens x the K/V bytes of one token / its ranks; a rank's real share differs by the tail's
    answer rows) and entries are kept apart by their number of ranks (rank 0 alone holds the single-rank ones)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._groups: dict[int, OrderedDict[str, tuple[ContextKey, KVContext]]] = {}

    def used_bytes(self, world_size: int) -> int:
        return sum(_accounted(key, context) for key, context in self._groups.get(world_size, {}).values())

    def take(self, key: ContextKey, token_ids: Sequence[int], at_least: int) -> tuple[str, KVContext | None, int]:
        """The conversation under `key` that shares the most leading tokens with `token_ids`, at least `at_least`
        of them (the earliest stored on a tie), with its id and how many it shares (at most all but the last
        token, which must run to give the next one's logits); ("", None, 0) when none does. The entry leaves the
        cache: the request continues it in place."""
        group = self._groups.get(key.world_size, OrderedDict())
        best, shared = None, 0
        ids = np.asarray(token_ids, dtype=np.int64)
        for entry_id, (entry_key, context) in group.items():
            if entry_key != key:
                continue
            n = _common_prefix(ids, np.asarray(context.token_ids, dtype=np.int64))
            if n > shared:
                best, shared = entry_id, n
        shared = min(shared, len(ids) - 1)
        if best is None or shared < at_least:
            return "", None, 0
        return best, group.pop(best)[1], shared

    def put(self, entry_id: str, key: ContextKey, context: KVContext) -> None:
        """Keep `context` as `entry_id` (the same on every rank: the request's id), evicting the least recently
        stored entries of its number of ranks to stay within max_bytes (one larger than that is not kept)."""
        size = _accounted(key, context)
        if size > self.max_bytes:
            return
        group = self._groups.setdefault(key.world_size, OrderedDict())
        while group and self.used_bytes(key.world_size) + size > self.max_bytes:
            group.popitem(last=False)
        group[entry_id] = (key, context)

    def __len__(self) -> int:
        return sum(len(group) for group in self._groups.values())


def continued_context(
    cache: ContextCache, key: ContextKey, token_ids: Sequence[int], at_least: int, comm: Comm,
    metrics: MetricsRecorder,
) -> KVContext | None:  # fmt: skip
    """The cached conversation this request continues, with `reused` set, when every rank of `comm` took the same
    one (same entry, shared length and tokens); else None on every rank (a full prefill)."""
    entry_id, context, shared = cache.take(key, token_ids, at_least)
    digest = _digest(entry_id, context.token_ids) if context is not None else 0
    mine = torch.tensor([[shared, digest]], dtype=torch.int64, device=comm.device)
    views = comm.all_gather(mine)  # 16 bytes before any stage: not counted as communication of one
    if context is None or any(not torch.equal(view, views[0]) for view in views):
        return None
    context.reused = shared
    metrics.add("context_reused_tokens", shared)
    return context


def _digest(entry_id: str, token_ids: Sequence[int]) -> int:
    """The same number on every rank for the same entry (Python's str hash differs per process)."""
    data = entry_id.encode() + np.asarray(token_ids, dtype=np.int64).tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=7).digest(), "little")


def _accounted(key: ContextKey, context: KVContext) -> int:
    """An entry's size as every rank of its group computes it: its share of the group's K/V."""
    return len(context.token_ids) * context.cache.bytes_per_row // key.world_size


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n
