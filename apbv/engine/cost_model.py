"""The `auto` strategy: pick the strategy and the number of ranks predicted fastest for a request's prompt length,
from latencies measured on this kind of machine (a calibration), so that no request runs slower than dense on one
GPU would.

A calibration holds, per (strategy, ranks), measured latencies of a request (prefill and the first token, the
video read and encoded) at several prompt lengths; a prediction interpolates them linearly in log(tokens) and
log(seconds) and extends the outermost segments at most EXTRAPOLATION times beyond them (farther, no prediction:
the strategy is not a candidate there). `python -m apbv.bench.calibrate` writes one from
benchmark results; the engine reads the one named by APBV_CALIBRATION, else the newest under bench/results/ whose
device matches its own. Without one, `auto` is dense on one rank (never slower than dense).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from apbv.attention.registry import BASELINE, STRATEGIES

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"
CALIBRATION_ENV = "APBV_CALIBRATION"
CALIBRATION_FILE = "calibration.json"
EXTRAPOLATION = 2.0  # predictions reach at most this factor beyond the measured prompt lengths


@dataclass(frozen=True)
class Choice:
    """What `auto` picked, with the prediction behind it (seconds) and every candidate's."""

    strategy: str
    world_size: int
    predicted_s: float | None
    candidates: dict[str, float] = field(default_factory=dict)  # "strategy@ranks" -> predicted seconds
    calibration: str = ""  # where the calibration came from ("" without one)

    def to_dict(self) -> dict:
        return {"strategy": self.strategy, "world_size": self.world_size, "predicted_s": self.predicted_s,
                "candidates": dict(self.candidates), "calibration": self.calibration}  # fmt: skip


@dataclass(frozen=True)
class Calibration:
    """Measured latencies per (strategy, ranks): points[(strategy, ranks)] = ((tokens, seconds), ...)."""

    device: str
    source: str
    points: dict[tuple[str, int], tuple[tuple[int, float], ...]]

    def predict(self, strategy: str, world_size: int, tokens: int) -> float | None:
        """Predicted seconds, or None when (strategy, ranks) was not measured near this length."""
        pts = sorted(self.points.get((strategy, world_size), ()))
        if not pts or not pts[0][0] / EXTRAPOLATION <= tokens <= pts[-1][0] * EXTRAPOLATION:
            return None
        if len(pts) == 1:
            return pts[0][1] * tokens / pts[0][0]
        logs = [(math.log(n), math.log(s)) for n, s in pts]
        x = math.log(tokens)
        i = min(max(1, sum(1 for lx, _ in logs if lx < x)), len(logs) - 1)  # the segment holding x, or the nearest
        (x0, y0), (x1, y1) = logs[i - 1], logs[i]
        return math.exp(y0 + (y1 - y0) * (x - x0) / (x1 - x0))

    def to_json(self) -> str:
        rows = [{"strategy": s, "world_size": w, "points": [list(p) for p in pts]} for (s, w), pts in self.points.items()]
        return json.dumps({"device": self.device, "source": self.source, "latencies": rows}, indent=2) + "\n"

    @staticmethod
    def from_json(text: str, origin: str = "") -> Calibration:
        data = json.loads(text)
        points = {(r["strategy"], int(r["world_size"])): tuple((int(n), float(s)) for n, s in r["points"])
                  for r in data["latencies"]}  # fmt: skip
        return Calibration(data["device"], origin or data.get("source", ""), points)

    @staticmethod
    def find(device_name: str, results: Path = RESULTS) -> Calibration | None:
        """APBV_CALIBRATION's file, else the newest calibration under `results` for `device_name`, else None."""
        named = os.environ.get(CALIBRATION_ENV)
        if named:
            return Calibration.from_json(Path(named).read_text(), named)
        for path in sorted(results.glob(f"*/{CALIBRATION_FILE}"), reverse=True):  # folders start with the date
            calibration = Calibration.from_json(path.read_text(), str(path.relative_to(results.parent.parent)))
            if calibration.device == device_name:
                return calibration
        return None


def choose(tokens: int, ranks: int, calibration: Calibration | None) -> Choice:
    """The fastest predicted of dense on one rank and every other strategy on each calibrated number of ranks up to
    `ranks`; dense when nothing is calibrated or a strategy has no prediction."""
    if calibration is None:
        return Choice(BASELINE, 1, None)
    candidates = {}
    for strategy, entry in STRATEGIES.items():
        sizes = [1] if entry.single_rank else sorted({w for s, w in calibration.points if s == strategy and w <= ranks})
        for w in sizes:
            predicted = calibration.predict(strategy, w, tokens)
            if predicted is not None:
                candidates[f"{strategy}@{w}"] = predicted
    if f"{BASELINE}@1" not in candidates:  # cannot promise "never slower than dense" without dense's own latency
        return Choice(BASELINE, 1, None, candidates, calibration.source)
    best = min(candidates, key=candidates.get)
    strategy, w = best.split("@")
    return Choice(strategy, int(w), candidates[best], candidates, calibration.source)
