"""apbv.bench.fidelity on a tiny setting, on both held-out sets (needles over held-out real footage, and over grey):
the numbers it reports are sane (self-check exact, exact strategies exact, APB-V exact where its budget covers
whole hosts and where the rows are exact by construction)."""

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
    table = out.with_suffix(".md").read_text()
    assert "| 2 | apbv | 16 | 1/128 |" in table and "## footage: 16 frames" in table and "## grey: 16 frames" in table
    return result


SETS = ("footage", "grey")


def row(result: dict, held_out_set: str, strategy: str, passing: float | None = None) -> dict:
    return next(r for r in result["rows"] if (r["set"], r["strategy"]) == (held_out_set, strategy)
                and passing in (None, r["passing_ratio"]))  # fmt: skip


def test_meta_records_the_run(result):
    meta = result["meta"]
    assert meta["command"].startswith("python -m apbv.bench.fidelity --frames 16")
    assert meta["torch"] and meta["transformers"] and meta["date"] and meta["sets"] == list(SETS)
    assert {r["set"] for r in result["rows"]} == set(SETS)


@pytest.mark.parametrize("held_out_set", SETS)
def test_dense_self_check_and_exact_strategies(result, held_out_set):
    dense = row(result, held_out_set, "dense")
    assert dense["agreement"] == 1.0 and dense["kl_max"] == 0.0 and max(dense["rel_err_per_layer"]) == 0.0
    for strategy in ("ring", "star"):  # star at W = 2: rank 1 holds the anchor plus the rest, so it is exact too
        r = row(result, held_out_set, strategy)
        assert r["agreement"] == 1.0 and r["kl_max"] < 1e-5 and max(r["rel_err_per_layer"]) < 1e-4


@pytest.mark.parametrize("held_out_set", SETS)
def test_apbv_exact_when_budget_covers_hosts_and_on_first_layer_query_rows(result, held_out_set):
    full = row(result, held_out_set, "apbv", 1.0)
    assert full["passing_budget"] >= full["n_context"]
    assert full["agreement"] == 1.0 and max(full["rel_err_per_layer"]) < 1e-4
    none = row(result, held_out_set, "apbv", 0.0)
    assert none["passing_budget"] == 0 and none["rel_err_per_layer"][0] > 1e-3  # the approximation is exercised
    assert none["rel_err_query_per_layer"][0] < 1e-5  # query rows see the whole context exactly
    assert none["attn_pairs_vs_dense"] < row(result, held_out_set, "apbv", 1 / 128)["attn_pairs_vs_dense"] < 1.0
    for r in result["rows"]:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["kl_mean"] >= 0.0 and r["n"] == 2
