"""The end-to-end speed sweep on a tiny architecture (CPU): every point and strategy measured and written as JSON
lines with the run's record, a table and a plot; speedups computed against dense at the same point."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from apbv.attention.registry import STRATEGY_NAMES
from apbv.bench.speed import main
from apbv.comm import free_port


def test_speed_sweep_writes_every_point(tmp_path):
    out = tmp_path / "speed"
    rows = main(["--arch", "tiny", "--resolutions", "360p", "--frames", "4", "8", "--world-size", "2",
                 "--warmup", "0", "--repeats", "1", "--device", "cpu", "--out", str(out)])  # fmt: skip
    assert [(r["frames"], r["strategy"]) for r in rows] == [(f, s) for f in (4, 8) for s in STRATEGY_NAMES]
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


@pytest.mark.multiprocess
def test_speed_under_torchrun_measures_real_processes(tmp_path):
    """Two gloo processes launched by torchrun: the rows are measured (not projected), rank 0 alone writes them,
    and every strategy's work and traffic equal those of the thread-ranks run of the same point."""
    common = ["--arch", "tiny", "--resolutions", "360p", "--frames", "8", "--world-size", "2", "--warmup", "0",
              "--repeats", "1", "--device", "cpu", "--stages-at", "360p:8"]  # fmt: skip
    out = tmp_path / "speed-tiny-0.5"  # a prefix with dots, as bench/device_speed.sh writes them
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "apbv.bench.speed", *common, "--out", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True, env=env, timeout=600, capture_output=True)
    measured = [json.loads(line) for line in (tmp_path / "speed-tiny-0.5.jsonl").read_text().splitlines()]
    projected = main(common)
    assert [r["strategy"] for r in measured] == [r["strategy"] for r in projected] == list(STRATEGY_NAMES)
    for m, p in zip(measured, projected):
        assert m["meta"]["command"].startswith("python -m torch.distributed.run --nproc-per-node 2 -m apbv.bench.speed")
        assert m["timing"] == ("measured" if m["strategy"] == "dense" else "measured (2 processes, gloo)")
        assert m["slowest_rank_s"] == max(m["per_rank_s"]) > 0
        for key in ("attn_pairs", "attn_flops", "bytes_sent", "bytes_recv"):
            assert [r["counters"].get(key) for r in m["ranks"]] == [r["counters"].get(key) for r in p["ranks"]]
        assert m["prefill_bytes_per_layer"] == p["prefill_bytes_per_layer"]
        assert (m["prefill_bytes_per_layer"] > 0) == (m["strategy"] != "dense")
    assert (tmp_path / "speed-tiny-0.5.html").exists()
    table = (tmp_path / "speed-tiny-0.5.md").read_text()
    assert "measured (2 processes, gloo)" in table and "## Per rank at 360p x 8 frames" in table
    assert table.count("| balance |") == len(STRATEGY_NAMES)
