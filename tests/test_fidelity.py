"""apbv.bench.fidelity on a tiny setting: the numbers it reports are sane (self-check exact, exact strategies
exact, APB-V exact where its budget covers whole hosts and where the rows are exact by construction)."""

from __future__ import annotations

import json

import pytest

from apbv.bench.fidelity import main


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fidelity") / "fidelity.json"
    result = main(["--frames", "16", "--world-sizes", "2", "--n", "2", "--aligns", "16", "--passing-ratios", "0", "1",
                   "--threads", "1", "--out", str(out)])  # fmt: skip
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert "| 2 | apbv | 16 | 1/128 |" in out.with_suffix(".md").read_text()
    return result


def row(result: dict, strategy: str, passing: float | None = None) -> dict:
    return next(r for r in result["rows"] if r["strategy"] == strategy and passing in (None, r["passing_ratio"]))


def test_meta_records_the_run(result):
    meta = result["meta"]
    assert meta["command"].startswith("python -m apbv.bench.fidelity --frames 16")
    assert meta["torch"] and meta["transformers"] and meta["date"]


def test_dense_self_check_and_exact_strategies(result):
    dense = row(result, "dense")
    assert dense["agreement"] == 1.0 and dense["kl_max"] == 0.0 and max(dense["rel_err_per_layer"]) == 0.0
    for strategy in ("ring", "star"):  # star at W = 2: rank 1 holds the anchor plus the rest, so it is exact too
        r = row(result, strategy)
        assert r["agreement"] == 1.0 and r["kl_max"] < 1e-5 and max(r["rel_err_per_layer"]) < 1e-4


def test_apbv_exact_when_budget_covers_hosts_and_on_first_layer_query_rows(result):
    full = row(result, "apbv", 1.0)
    assert full["passing_budget"] >= full["n_context"]
    assert full["agreement"] == 1.0 and max(full["rel_err_per_layer"]) < 1e-4
    none = row(result, "apbv", 0.0)
    assert none["passing_budget"] == 0 and none["rel_err_per_layer"][0] > 1e-3  # the approximation is exercised
    assert none["rel_err_query_per_layer"][0] < 1e-5  # query rows see the whole context exactly
    assert none["attn_pairs_vs_dense"] < row(result, "apbv", 1 / 128)["attn_pairs_vs_dense"] < 1.0
    for r in result["rows"]:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["kl_mean"] >= 0.0 and r["n"] == 2
