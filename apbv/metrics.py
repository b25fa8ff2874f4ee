"""Per-rank measurements of one request: stage timeline, per-category time totals, counters.

Every layer of the stack records into the rank's `MetricsRecorder`; `finish()` turns it into a JSON-serialisable
`RankMetrics`. On CUDA, time is measured with CUDA events on the current stream (so an interval around
`handle.wait()` measures how long the compute stream stalled on communication); on CPU with a monotonic clock.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Sequence

import torch

# Categories of time summed over the whole request (each interval belongs to exactly one).
ATTENTION = "attention"  # attention kernels (prefill), incl. scoring/selection
COMM_WAIT = "comm_wait"  # compute stream blocked on a collective / p2p transfer
VISION = "vision"
OTHER_LAYERS = "other_layers"  # projections, norms, MLP, lm_head during prefill
DECODE = "decode"
READ = "read"  # rank 0 probing and planning the video; every rank waiting for its decoded frames
PREPROCESS = "preprocess"  # resize, normalise and patchify the frames on the rank's device


def balance(values: Sequence[float]) -> float:
    """max / mean of per-rank work or time: 1.0 is perfectly balanced (nan when there is none)."""
    mean = sum(values) / len(values) if values else 0.0
    return max(values) / mean if mean > 0 else math.nan


@dataclass
class Span:
    """One coarse stage on the timeline, in seconds since the request started on this rank."""

    name: str
    start: float
    end: float


@dataclass
class RankMetrics:
    rank: int
    device: str
    spans: list[Span] = field(default_factory=list)
    totals: dict[str, float] = field(default_factory=dict)  # seconds per category
    counters: dict[str, float] = field(default_factory=dict)  # attn_pairs, attn_flops, bytes_sent, ...
    stage_counters: dict[str, dict[str, float]] = field(default_factory=dict)  # the counters split by span
    peak_memory_bytes: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "RankMetrics":
        return RankMetrics(
            rank=d["rank"],
            device=d["device"],
            spans=[Span(**s) for s in d["spans"]],
            totals=dict(d["totals"]),
            counters=dict(d["counters"]),
            stage_counters={k: dict(v) for k, v in d.get("stage_counters", {}).items()},
            peak_memory_bytes=d.get("peak_memory_bytes", 0),
        )


class _Clock:
    """Marks points in time; CUDA events on GPU, perf_counter on CPU. Resolved lazily by `seconds()`."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.origin = self.mark()

    def mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def seconds(self, point) -> float:
        """Seconds from the origin to `point` (synchronises on CUDA)."""
        if self.cuda:
            point.synchronize()
            return self.origin.elapsed_time(point) / 1e3
        return point - self.origin


class MetricsRecorder:
    """Collects one rank's measurements for one request."""

    def __init__(
        self, rank: int, device: torch.device, on_span: Callable[[str], None] | None = None, start_s: float = 0.0
    ) -> None:
        """start_s: where this recorder's clock starts on the request's timeline (ranks that join a request late
        start at the time rank 0 handed it to them, so that every rank's spans share one time axis)."""
        self.rank = rank
        self._on_span = on_span
        self.device = torch.device(device)
        self._clock = _Clock(self.device)
        self._start_s = start_s
        self._spans: list[tuple[str, object, object]] = []
        self._intervals: list[tuple[str, object, object]] = []
        self.counters: dict[str, float] = defaultdict(float)
        self.stage_counters: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self._open_spans: list[str] = []
        self._remainders: list[tuple[str, str, tuple[str, ...]]] = []
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def add(self, name: str, value: float) -> None:
        """Adds to a counter, in total and for the innermost open span."""
        self.counters[name] += value
        if self._open_spans:
            self.stage_counters[self._open_spans[-1]][name] += value

    @contextmanager
    def span(self, name: str) -> Iterator[None]:
        """A coarse timeline stage (read, vision, prefill, decode); announced to `on_span` as it starts."""
        if self._on_span is not None:
            self._on_span(name)
        start = self._clock.mark()
        self._open_spans.append(name)
        try:
            yield
        finally:
            self._open_spans.pop()
            self._spans.append((name, start, self._clock.mark()))

    @contextmanager
    def timed(self, category: str) -> Iterator[None]:
        """Adds the enclosed time to `category`'s total."""
        start = self._clock.mark()
        try:
            yield
        finally:
            self._intervals.append((category, start, self._clock.mark()))

    def remainder(self, category: str, span: str, minus: tuple[str, ...]) -> None:
        """At finish, set `category` to the time of `span` stages not covered by the `minus` categories
        (e.g. other_layers = prefill - attention - comm_wait)."""
        self._remainders.append((category, span, minus))

    def elapsed(self) -> float:
        """Seconds on the request's timeline now (synchronises on CUDA)."""
        return self._start_s + self._clock.seconds(self._clock.mark())

    def finish(self) -> RankMetrics:
        def sec(point) -> float:
            return self._start_s + self._clock.seconds(point)

        totals: dict[str, float] = defaultdict(float)
        intervals = [(category, sec(a), sec(b)) for category, a, b in self._intervals]
        spans = [Span(name, sec(a), sec(b)) for name, a, b in self._spans]
        for category, start, end in intervals:
            totals[category] += end - start
        for category, span_name, minus in self._remainders:
            for sp in (s for s in spans if s.name == span_name):
                inside = sum(e - b for c, b, e in intervals if c in minus and b >= sp.start and e <= sp.end)
                totals[category] += max(0.0, sp.end - sp.start - inside)
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else 0
        return RankMetrics(
            rank=self.rank,
            device=str(self.device),
            spans=spans,
            totals=dict(totals),
            counters=dict(self.counters),
            stage_counters={stage: dict(c) for stage, c in self.stage_counters.items()},
            peak_memory_bytes=int(peak),
        )


class NullRecorder(MetricsRecorder):
    """A recorder that records nothing (unit tests, warm-up runs)."""

    def __init__(self) -> None:
        super().__init__(rank=0, device=torch.device("cpu"))

    def add(self, name: str, value: float) -> None:
        pass

    @contextmanager
    def span(self, name: str) -> Iterator[None]:
        yield

    @contextmanager
    def timed(self, category: str) -> Iterator[None]:
        yield

    def remainder(self, category: str, span: str, minus: tuple[str, ...]) -> None:
        pass
