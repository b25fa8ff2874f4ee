"""Per-rank cache of encoded videos: the vision embeddings of recent requests, so that follow-up questions,
comparisons and reruns on the same video skip reading it and the vision encoder.

Keyed by what determines the embeddings (`VideoKey`: the file's content hash, the sampled frame indices and sizes,
the processor), never by path: a changed file is a different key. Bounded in bytes, least recently used first out.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from apbv.inputs import ProcessorSpec
from apbv.video import VideoPlan


@dataclass(frozen=True)
class VideoKey:
    content_hash: str
    indices: tuple[int, ...]
    sizes: tuple[tuple[int, int], ...]
    spec: ProcessorSpec

    @staticmethod
    def of(plan: VideoPlan, spec: ProcessorSpec) -> VideoKey:
        return VideoKey(plan.content_hash, plan.indices, plan.sizes, spec)


class VideoCache:
    """Encoded videos on this rank's device, at most `max_bytes` of them (0: off)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[VideoKey, torch.Tensor] = OrderedDict()

    @property
    def used_bytes(self) -> int:
        return sum(_size(t) for t in self._entries.values())

    def get(self, key: VideoKey) -> torch.Tensor | None:
        """The embeddings stored under `key` (now the most recently used), or None."""
        if key not in self._entries:
            return None
        self._entries.move_to_end(key)
        return self._entries[key]

    def put(self, key: VideoKey, embeddings: torch.Tensor) -> None:
        """Keep `embeddings`, evicting the least recently used entries to stay within max_bytes (an entry larger
        than the whole cache is not kept)."""
        self._entries.pop(key, None)
        if _size(embeddings) > self.max_bytes:
            return
        while self._entries and self.used_bytes + _size(embeddings) > self.max_bytes:
            self._entries.popitem(last=False)
        self._entries[key] = embeddings

    def __len__(self) -> int:
        return len(self._entries)


def _size(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
