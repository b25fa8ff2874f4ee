"""Micro-benchmark: one prefill attention layer per strategy on random inputs.

    python -m apbv.bench.attention --tokens 4096 --world-size 4 [--query-tokens 16] [--dtype bf16]
        [--device cuda] [--strategies dense,ring,star,apb,apbv] [--repeats 3] [--json out.json]

--tokens is the context length N (the query adds --query-tokens). Launched by torchrun (one process per GPU,
`python -m torch.distributed.run --nproc-per-node W -m apbv.bench.attention ...`), the W ranks are real processes
and their times are measured, communication included (apbv.bench.processes). Otherwise all W ranks run as threads
on one device, one after another (apbv.thread_comm), so multi-rank timings are "projected (sequential ranks, no
communication)": per-rank compute time only. Dense runs on one rank. Only per-rank buffers are allocated (nothing
quadratic), so --tokens 148480 --world-size 8 fits on one GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from apbv.attention import get_strategy
from apbv.attention.config import AttentionConfig
from apbv.attention.registry import BASELINE, STRATEGY_NAMES, ranks_for
from apbv.metrics import MetricsRecorder, balance
from apbv.run_record import environment, write_json

from .processes import bench_device, bench_world, reporting_rank

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Row:
    strategy: str
    world_size: int
    slowest_rank_s: float
    mean_rank_s: float
    speedup_vs_dense: float | None
    attn_pairs_per_rank: list[float]
    pair_balance: float  # max/mean of attn_pairs over ranks
    time_balance: float  # max/mean of rank time
    bytes_per_layer: float  # bytes sent, summed over ranks
    ops_per_rank: int  # PyTorch operators the busiest rank dispatches, views excepted (~ kernel launches on a GPU)
    timing: str


def bench_strategy(name: str, q, k, v, n_context: int, n_query: int, world_size: int, args) -> Row:
    config = AttentionConfig(name, overlap=True)
    world_size = ranks_for(name, world_size)
    strategy = get_strategy(config)
    plan = strategy.plan(n_context, n_query, world_size)
    device = q.device
    local = [
        tuple(t.index_select(1, r.local_to_global.to(device)) for t in (q, k, v)) for r in plan.ranks
    ]
    world = bench_world(world_size, device)

    def layer(rank, comm):
        metrics = MetricsRecorder(rank, device)
        strategy.prefill(*local[rank], plan, 0, comm, metrics)
        return dict(metrics.counters)

    times, counters = [], None
    with world:
        world.run(layer)  # warm-up
        for _ in range(args.repeats):
            counters = world.run(layer)
            times.append(list(world.busy))
        ops = max(world.run(lambda rank, comm: _count_ops(layer, rank, comm)))
        if args.profile:
            _profile(world, layer, f"{args.profile}-{name}-w{world_size}.txt")
    per_rank = [statistics.median(t[r] for t in times) for r in range(world_size)]
    pairs = [c.get("attn_pairs", 0.0) for c in counters]
    return Row(
        strategy=name,
        world_size=world_size,
        slowest_rank_s=max(per_rank),
        mean_rank_s=statistics.mean(per_rank),
        speedup_vs_dense=None,
        attn_pairs_per_rank=pairs,
        pair_balance=balance(pairs),
        time_balance=balance(per_rank),
        bytes_per_layer=sum(c.get("bytes_sent", 0.0) for c in counters),
        ops_per_rank=ops,
        timing=world.timing,
    )


class _OpCounter(TorchDispatchMode):
    """Counts the operators dispatched under it, views excepted (each costs the host a launch on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view
        return func(*args, **(kwargs or {}))


def _count_ops(layer, rank: int, comm) -> int:
    """One more (untimed) run of `layer` on this rank, counting its operators."""
    with _OpCounter() as counter:
        layer(rank, comm)
    return counter.count


def _profile(world, layer, path: str) -> None:
    """One more run under torch.profiler: the operators and kernels by device time, and how many were launched."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        world.run(layer)
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key.startswith(("cudaLaunchKernel", "cuLaunchKernel")))
    table = events.table(sort_by="self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total",
                         row_limit=30)  # fmt: skip
    Path(path).write_text(f"kernel launches (all ranks): {launches}\n{table}\n")


def main(argv: list[str] | None = None) -> list[Row]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, required=True, help="context length N")
    p.add_argument("--query-tokens", type=int, default=16)
    p.add_argument("--world-size", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--strategies", default=",".join(STRATEGY_NAMES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_path")
    p.add_argument("--profile", metavar="PREFIX", help="also profile one run per strategy: PREFIX-NAME-wW.txt")
    args = p.parse_args(argv)
    with bench_device(args.device) as device:
        return run(args, device)


def run(args: argparse.Namespace, device: torch.device) -> list[Row]:
    """Every strategy on one random layer; rank 0 prints and writes (--json)."""
    names = [s for s in args.strategies.split(",") if s]
    dtype = DTYPES[args.dtype]
    total = args.tokens + args.query_tokens
    g = torch.Generator(device=device).manual_seed(args.seed)
    q = torch.randn(args.heads, total, args.head_dim, generator=g, device=device, dtype=dtype)
    k = torch.randn(args.kv_heads, total, args.head_dim, generator=g, device=device, dtype=dtype)
    v = torch.randn(args.kv_heads, total, args.head_dim, generator=g, device=device, dtype=dtype)

    rows = [bench_strategy(n, q, k, v, args.tokens, args.query_tokens, args.world_size, args) for n in names]
    dense = next((r for r in rows if r.strategy == BASELINE), None)
    for r in rows:
        if dense is not None:
            r.speedup_vs_dense = dense.slowest_rank_s / r.slowest_rank_s
    if not reporting_rank():  # torchrun: every process has the rows, rank 0 reports them
        return rows
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    _print_table(rows, args, device_name)
    if args.json_path:
        meta = {k: v for k, v in vars(args).items() if k != "json_path"} | environment(device)
        write_json(args.json_path, meta, [asdict(r) for r in rows])
    return rows


def _print_table(rows: list[Row], args, device_name: str) -> None:
    print(
        f"one attention layer: N={args.tokens} Lq={args.query_tokens} W={args.world_size} "
        f"Hq={args.heads} Hkv={args.kv_heads} D={args.head_dim} {args.dtype} on {device_name}"
    )
    print(f"{'strategy':9} {'W':>2} {'slowest ms':>11} {'mean ms':>9} {'speedup':>8} {'pairs/rank':>11} "
          f"{'pair bal':>8} {'time bal':>8} {'MB/layer':>9} {'ops/rank':>8}  timing")
    for r in rows:
        speedup = f"{r.speedup_vs_dense:.2f}x" if r.speedup_vs_dense else "-"
        print(
            f"{r.strategy:9} {r.world_size:>2} {r.slowest_rank_s * 1e3:>11.2f} {r.mean_rank_s * 1e3:>9.2f} "
            f"{speedup:>8} {statistics.mean(r.attn_pairs_per_rank):>11.3g} {r.pair_balance:>8.3f} "
            f"{r.time_balance:>8.3f} {r.bytes_per_layer / 1e6:>9.3f} {r.ops_per_rank:>8}  {r.timing}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
