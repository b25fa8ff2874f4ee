"""Comparisons that can be trusted: every strategy, the asked one included, re-measured on the same inputs with
warm-ups and repeats, summarised by the median and the range.

The runs are interleaved (warm-ups first, then repeat 1 of every strategy, repeat 2, ...), so that drift in the
machine's speed spreads over all strategies instead of favouring the ones measured last.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Iterator, Sequence

from apbv.attention.registry import BASELINE, strategy_label
from apbv.engine.api import Request, Result
from ui.controls import measured_under
from ui.runner import Pool, RunState, stream, throttle

WARMUP, REPEATS = 1, 3
MAX_REPEATS = 10
# Result.summary() keys compared, with what a user reads for them.
METRICS: dict[str, str] = {
    "prefill_s": "prefill",
    "time_to_first_token_s": "time to first token",
    "wall_s": "end to end",
}


@dataclass(frozen=True)
class Spread:
    """Median and range of one metric over the repeats (seconds)."""

    median: float
    low: float
    high: float

    @staticmethod
    def of(values: Sequence[float]) -> Spread:
        return Spread(statistics.median(values), min(values), max(values))

    def to_dict(self) -> dict:
        return {"median": self.median, "min": self.low, "max": self.high}


@dataclass(frozen=True)
class StrategyRuns:
    """The measured runs (warm-ups left out) of one strategy."""

    strategy: str
    results: tuple[Result, ...]

    @property
    def world_size(self) -> int:
        return self.results[0].world_size

    def spread(self, metric: str) -> Spread | None:
        """None when no run measured it (no first token when the answer is empty)."""
        values = [r.summary()[metric] for r in self.results if r.summary()[metric] is not None]
        return Spread.of(values) if values else None

    @property
    def representative(self) -> Result:
        """The run whose prefill is the median (the lower middle one of an even count): what the plots show."""
        ordered = sorted(self.results, key=lambda r: r.stage_s("prefill"))
        return ordered[(len(ordered) - 1) // 2]

    @property
    def answer(self) -> str:
        return self.representative.answer


@dataclass(frozen=True)
class Comparison:
    baseline: str
    warmup: int
    repeats: int
    runs: tuple[StrategyRuns, ...]  # in the order asked

    def of(self, strategy: str) -> StrategyRuns:
        return next(r for r in self.runs if r.strategy == strategy)

    def speedup(self, runs: StrategyRuns, metric: str = "prefill_s") -> float:
        """How many times faster `runs` did `metric` than the baseline, median over median (nan if unmeasured)."""
        base, this = self.of(self.baseline).spread(metric), runs.spread(metric)
        return base.median / this.median if base and this and this.median > 0 else math.nan

    def to_dict(self) -> dict:
        """The comparison as data (seconds): per strategy its ranks, answer, median/min/max of every metric, the
        prefill speedup over the baseline and the summary of every measured run."""
        return {
            "baseline": self.baseline,
            "warmup": self.warmup,
            "repeats": self.repeats,
            "visual_tokens": self.runs[0].results[0].visual_tokens,
            "strategies": [
                {
                    "strategy": runs.strategy,
                    "label": strategy_label(runs.strategy),
                    "world_size": runs.world_size,
                    "answer": runs.answer,
                    **{m: (s.to_dict() if (s := runs.spread(m)) else None) for m in METRICS},
                    "prefill_speedup": self.speedup(runs),
                    "runs": [r.summary() for r in runs.results],
                }
                for runs in self.runs
            ],
        }


@dataclass(frozen=True)
class Step:
    """Progress of a comparison: run `index` (1-based) of `total`, a warm-up or a measured repeat."""

    strategy: str
    index: int
    total: int
    warmup: bool
    state: RunState


def measure(
    pool: Pool, request: Request, strategies: Sequence[str], warmup: int = WARMUP, repeats: int = REPEATS
) -> Iterator[Step | Comparison]:
    """Run `request` under each strategy, on its ranks (all of the engine's when it ran on one, as the baseline
    does; the baseline always on one): `warmup` unmeasured runs, then `repeats` measured ones, interleaved.
    Yields Steps as every run goes (`throttle`d), then the Comparison; ends after the Step of a run that failed or
    was stopped."""
    ranks = request.world_size if request.world_size != 1 else None
    requests = {s: measured_under(request, s, ranks) for s in strategies}
    order = [(s, True) for s in strategies for _ in range(warmup)] + [
        (s, False) for _ in range(repeats) for s in strategies
    ]
    measured: dict[str, list[Result]] = {s: [] for s in strategies}
    for index, (strategy, is_warmup) in enumerate(order, 1):
        state = RunState()
        for state in throttle(stream(pool, requests[strategy])):
            yield Step(strategy, index, len(order), is_warmup, state)
        if not state.ok:
            return
        if not is_warmup:
            measured[strategy].append(state.result)
    baseline = BASELINE if BASELINE in strategies else strategies[0]
    yield Comparison(baseline, warmup, repeats, tuple(StrategyRuns(s, tuple(measured[s])) for s in strategies))
