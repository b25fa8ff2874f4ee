"""The `auto` strategy's cost model: predictions from a calibration, the choice, finding and building calibrations."""

from __future__ import annotations

import json
import math

import pytest

from apbv.bench.calibrate import main as calibrate
from apbv.engine.cost_model import CALIBRATION_ENV, Calibration, choose

FAKE = Calibration("fake device", "test", {
    ("dense", 1): ((1_000, 0.1), (10_000, 1.0), (100_000, 10.0)),
    ("apbv", 4): ((1_000, 0.4), (10_000, 0.8), (100_000, 2.0)),
    ("apbv", 8): ((1_000, 0.6), (10_000, 0.9), (100_000, 1.5)),
    ("apb", 8): ((1_000, 0.3), (2_000, 0.35)),
})  # fmt: skip


def test_predictions_interpolate_in_log_space_and_stop_beyond_twice_the_measured_lengths():
    assert FAKE.predict("dense", 1, 10_000) == pytest.approx(1.0)
    assert FAKE.predict("dense", 1, 3_162) == pytest.approx(math.sqrt(0.1 * 1.0), rel=1e-4)  # halfway in log
    assert FAKE.predict("dense", 1, 200_000) == pytest.approx(20.0)  # the last segment's slope, up to 2x
    assert FAKE.predict("dense", 1, 200_001) is None and FAKE.predict("dense", 1, 499) is None
    assert FAKE.predict("ring", 8, 10_000) is None  # never measured


def test_choice_is_the_fastest_predicted_within_the_offered_ranks():
    assert (choose(1_000, 8, FAKE).strategy, choose(1_000, 8, FAKE).world_size) == ("dense", 1)
    long = choose(100_000, 8, FAKE)
    assert (long.strategy, long.world_size, long.predicted_s) == ("apbv", 8, pytest.approx(1.5))
    assert set(long.candidates) == {"dense@1", "apbv@4", "apbv@8"}  # APB was measured only up to 2,000 tokens
    assert (choose(100_000, 4, FAKE).strategy, choose(100_000, 4, FAKE).world_size) == ("apbv", 4)
    assert (choose(100_000, 1, FAKE).strategy, choose(100_000, 1, FAKE).world_size) == ("dense", 1)
    assert (choose(5_000, 8, None).strategy, choose(5_000, 8, None).predicted_s) == ("dense", None)
    no_dense = Calibration("d", "", {("apbv", 8): ((1_000, 0.01), (2_000, 0.02))})
    assert choose(1_500, 8, no_dense).strategy == "dense"  # no dense latency: no promise to beat it


def test_calibrations_are_found_by_device_newest_first_or_by_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(CALIBRATION_ENV, raising=False)
    for folder, device in (("2026-01-01-a", "GPU A"), ("2026-02-01-a", "GPU A"), ("2026-03-01-b", "GPU B")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "calibration.json").write_text(Calibration(device, folder, FAKE.points).to_json())
    assert "2026-02-01-a" in Calibration.find("GPU A", tmp_path).source
    assert Calibration.find("GPU C", tmp_path) is None
    named = tmp_path / "mine.json"
    named.write_text(FAKE.to_json())
    monkeypatch.setenv(CALIBRATION_ENV, str(named))
    assert Calibration.find("anything", tmp_path).points == FAKE.points


def test_calibration_from_speed_and_e2e_results(tmp_path):
    meta = {"device_name": "GPU A"}
    speed = [{"meta": meta, "strategy": "dense", "world_size": 1, "tokens": 1000, "slowest_rank_s": 0.1},
             {"meta": meta, "strategy": "apbv", "world_size": 2, "tokens": 1000, "slowest_rank_s": 0.3},
             {"meta": meta, "strategy": "ring", "world_size": 2, "oom": True}]  # fmt: skip
    (tmp_path / "speed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in speed))
    e2e = {"meta": meta, "rows": [{"strategy": "dense", "world_size": 1, "tokens": 50_000, "ttft_s": 9.0},
                                   {"strategy": "transformers", "world_size": 1, "tokens": 50_000, "ttft_s": 20.0}]}  # fmt: skip
    (tmp_path / "e2e.json").write_text(json.dumps(e2e))
    out = tmp_path / "calibration.json"
    built = calibrate(["--from", str(tmp_path / "speed.jsonl"), str(tmp_path / "e2e.json"), "--out", str(out)])
    assert built.points == {("dense", 1): ((1000, 0.1), (50_000, 9.0)), ("apbv", 2): ((1000, 0.3),)}
    assert Calibration.from_json(out.read_text()).points == built.points and built.device == "GPU A"
