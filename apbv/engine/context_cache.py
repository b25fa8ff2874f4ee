"""Per-rank cache of conversations' K/V, so that a follow-up question prefills only its new turn.

After a request, every rank of its group keeps its share of the K/V of the prompt and the answer
(`apbv.model.generate.KVContext`) under what they depend on besides the tokens (`ContextKey`: the video's cache
key, the strategy and its parameters, the ranks). A later request under the same key whose tokens start with
those of a cached conversation (its history is that conversation: same video, earlier question and answer)
continues it: the shared tokens' K/V are kept and only the rest of its prompt is prefilled, with exact attention
over the cache (`QwenVLRank.extend`); reading and encoding the video are skipped. Bounded in bytes per rank, least
recently used first out. The ranks agree on every use (`continued_context`), so an entry evicted on one rank only
means a full prefill on all.
"""

from __future__ import annotations

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
    """Conversations' K/V on this rank's device, at most `max_bytes` of them (0: off)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, tuple[ContextKey, KVContext]] = OrderedDict()
        self._next_id = 0

    @property
    def used_bytes(self) -> int:
        return sum(context.cache.num_bytes for _, context in self._entries.values())

    def take(self, key: ContextKey, token_ids: Sequence[int], at_least: int) -> tuple[KVContext | None, int]:
        """The conversation under `key` that shares the most leading tokens with `token_ids`, at least `at_least`
        of them, and how many it shares (at most all but the last token, which must run to give the next one's
        logits); (None, 0) when none does. The entry leaves the cache: the request continues it in place."""
        best, shared = None, 0
        ids = np.asarray(token_ids, dtype=np.int64)
        for entry_id, (entry_key, context) in self._entries.items():
            if entry_key != key:
                continue
            n = _common_prefix(ids, np.asarray(context.token_ids, dtype=np.int64))
            if n > shared:
                best, shared = entry_id, n
        shared = min(shared, len(ids) - 1)
        if best is None or shared < at_least:
            return None, 0
        return self._entries.pop(best)[1], shared

    def put(self, key: ContextKey, context: KVContext) -> None:
        """Keep `context`, evicting the least recently used entries to stay within max_bytes (one larger than the
        whole cache is not kept)."""
        size = context.cache.num_bytes
        if size > self.max_bytes:
            return
        while self._entries and self.used_bytes + size > self.max_bytes:
            self._entries.popitem(last=False)
        self._entries[self._next_id] = (key, context)
        self._next_id += 1

    def __len__(self) -> int:
        return len(self._entries)


def continued_context(
    cache: ContextCache, key: ContextKey, token_ids: Sequence[int], at_least: int, comm: Comm,
    metrics: MetricsRecorder,
) -> KVContext | None:  # fmt: skip
    """The cached conversation this request continues, with `reused` set, when every rank of `comm` holds the same
    one (same shared length and tokens); else None on every rank (a full prefill)."""
    context, shared = cache.take(key, token_ids, at_least)
    digest = hash(tuple(context.token_ids)) if context is not None else 0
    mine = torch.tensor([[shared, digest]], dtype=torch.int64, device=comm.device)
    views = comm.all_gather(mine)  # 16 bytes before any stage: not counted as communication of one
    if context is None or any(not torch.equal(view, views[0]) for view in views):
        return None
    context.reused = shared
    metrics.add("context_reused_tokens", shared)
    return context


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n
