"""The in-process thread Comm used by the benchmark reproduces gloo bit for bit; the benchmark CLI runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from apbv.attention import distributed_attention, get_strategy
from apbv.attention.config import AttentionConfig
from apbv.bench.attention import main
from apbv.comm import Comm
from apbv.metrics import MetricsRecorder
from apbv.thread_comm import PROJECTED, ThreadWorld

from .distributed import run_ranks

N, LQ = 181, 4


def _outputs(rank: int, comm: Comm) -> dict:
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(h, N + LQ, 8, generator=g) for h in (4, 2, 2))
    outs = {}
    for name in ("ring", "star", "apb", "apbv"):
        strategy = get_strategy(AttentionConfig(name, 1 / 16, 1 / 32, align=8))
        plan = strategy.plan(N, LQ, comm.world_size)
        idx = plan.ranks[rank].local_to_global
        metrics = MetricsRecorder(rank, torch.device("cpu"))
        outs[name] = (strategy.prefill(q[:, idx], k[:, idx], v[:, idx], plan, 0, comm, metrics), dict(metrics.counters))
    token = comm.all_reduce_max(torch.tensor([rank + 7, -rank]))
    outs["decode"] = (distributed_attention(q[:, -1:], k[:, rank::3], v[:, rank::3], comm, MetricsRecorder(rank, "cpu")), {})
    outs["token"] = (token, {})
    return outs


def _gloo(rank: int, world: int) -> dict:
    return _outputs(rank, Comm())


@pytest.mark.multiprocess
def test_thread_comm_matches_gloo_bitwise():
    gloo = run_ranks(3, _gloo, timeout=90)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the gloo workers run single-threaded too
    try:
        with ThreadWorld(3) as world:
            local = world.run(_outputs)
            assert len({id(t) for t in world._threads}) == 3 and all(t.is_alive() for t in world._threads)
            threads_of_run = list(world._threads)
    finally:
        torch.set_num_threads(threads)
    assert all(b > 0 for b in world.busy)
    assert not any(t.is_alive() for t in threads_of_run)  # closed with the world
    for g_rank, t_rank in zip(gloo, local):
        assert g_rank.keys() == t_rank.keys()
        for name in g_rank:
            assert torch.equal(g_rank[name][0], t_rank[name][0]), name
            assert g_rank[name][1] == t_rank[name][1], name  # same pairs, flops and bytes


def test_thread_world_reports_failures():
    def fail_on_one(rank, comm):
        if rank == 1:
            raise ValueError("boom")
        return comm.all_gather(torch.zeros(1))

    try:
        with ThreadWorld(3) as world:
            world.run(fail_on_one)
    except ValueError as exc:
        assert "boom" in str(exc)
    else:
        raise AssertionError("the failure was swallowed")


LAYER = ["--tokens", "300", "--query-tokens", "5", "--world-size", "2", "--heads", "4", "--kv-heads", "1",
         "--head-dim", "16", "--dtype", "fp32", "--device", "cpu", "--repeats", "1"]  # fmt: skip


def test_benchmark_cli(tmp_path, capsys):
    out = tmp_path / "bench.json"
    main([*LAYER, "--json", str(out)])
    assert PROJECTED in capsys.readouterr().out
    rows = {r["strategy"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"dense", "ring", "star", "apb", "apbv"}
    assert rows["dense"]["attn_pairs_per_rank"] == [4 * 305 * 306 / 2] and rows["dense"]["speedup_vs_dense"] == 1.0
    assert sum(rows["ring"]["attn_pairs_per_rank"]) == rows["dense"]["attn_pairs_per_rank"][0]  # exact: same work
    assert rows["ring"]["world_size"] == 2 and rows["ring"]["bytes_per_layer"] > 0 and rows["ring"]["timing"] == PROJECTED
    # dense is one kernel call on one rank; the anchored strategies select, gather, attend per block and merge
    assert 1 <= rows["dense"]["ops_per_rank"] < rows["apbv"]["ops_per_rank"]


@pytest.mark.multiprocess
def test_benchmark_under_torchrun_measures_real_processes(tmp_path):
    """Two gloo processes launched by torchrun: measured timings, the same work and traffic per rank as threads."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",  # its own port
           "-m", "apbv.bench.attention", *LAYER, "--json", str(out)]  # fmt: skip
    done = subprocess.run(cmd, env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, f"torchrun exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    measured = json.loads(out.read_text())["rows"]
    projected = main(LAYER)
    for m, p in zip(measured, projected, strict=True):
        assert m["strategy"] == p.strategy
        assert m["timing"] == ("measured (2 processes, gloo)" if p.world_size > 1 else "measured")
        assert m["attn_pairs_per_rank"] == p.attn_pairs_per_rank and m["bytes_per_layer"] == p.bytes_per_layer
        assert m["slowest_rank_s"] > 0
