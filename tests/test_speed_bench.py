"""The end-to-end speed sweep on a tiny architecture (CPU): every point and strategy measured and written as JSON
lines with the run's record, a table and a plot; speedups computed against dense at the same point."""

from __future__ import annotations

import json

from apbv.bench.speed import main
from apbv.config import STRATEGIES


def test_speed_sweep_writes_every_point(tmp_path):
    out = tmp_path / "speed"
    rows = main(["--arch", "tiny", "--resolutions", "360p", "--frames", "4", "8", "--world-size", "2",
                 "--warmup", "0", "--repeats", "1", "--device", "cpu", "--out", str(out)])  # fmt: skip
    assert [(r["frames"], r["strategy"]) for r in rows] == [(f, s) for f in (4, 8) for s in STRATEGIES]
    lines = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert len(lines) == len(rows)
    for line, row in zip(lines, rows):
        assert line["meta"]["command"].startswith("python -m") and line["meta"]["torch"] and line["meta"]["date"]
        assert line["slowest_rank_s"] == row["slowest_rank_s"] > 0
        assert line["timing"] == ("measured" if row["strategy"] == "dense" else
                                  "projected (sequential ranks, no communication)")  # fmt: skip
        dense = next(r for r in rows if r["frames"] == row["frames"] and r["strategy"] == "dense")
        assert row["speedup_vs_dense"] == dense["slowest_rank_s"] / row["slowest_rank_s"]
        assert row["tokens"] == dense["tokens"] and row["ranks"][0]["counters"]["attn_pairs"] > 0
    table = out.with_suffix(".md").read_text()
    assert "| 360p | 8 |" in table and "(1.00x)" in table
    assert "plotly" in out.with_suffix(".html").read_text()
