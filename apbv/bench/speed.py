"""End-to-end speed of prefill + first token per strategy on a real architecture (random bf16 weights).

    python -m apbv.bench.speed --arch qwen2.5-vl-3b --resolutions 360p 720p 1080p 1440p --frames 16 32 64 128 \
        --world-size 8 [--strategies dense,ring,star,apb,apbv] [--warmup 3] [--repeats 5] [--out PREFIX]

Each measured run is the paper's speed-test unit: frame-parallel vision encoder + sharded prefill + one generated
token (frames are patchified beforehand, as the reference's preprocessing is not timed either). Dense runs on one
rank (the single-GPU FlashAttention baseline, on the fastest kernel `attend` finds).

Launched by torchrun with one process per GPU (`python -m torch.distributed.run --nproc-per-node 8 -m
apbv.bench.speed --world-size 8 ...`), the W ranks are real processes over NCCL, timed from a common barrier to
each rank's end: measured latency, communication and its overlap included (apbv.bench.processes). Otherwise the
W ranks run as threads on one device, one at a time (apbv.thread_comm): their per-rank times are "projected
(sequential ranks, no communication)", i.e. compute only; the slowest rank is the projected latency.

Per point and strategy the rows carry every rank's metrics; `--stages-at RES:FRAMES` adds that point's per-rank
stage times, attention pairs and bytes sent to the table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch

from apbv.attention import get_strategy
from apbv.attention.config import AttentionConfig
from apbv.attention.registry import STRATEGY_NAMES, ranks_for
from apbv.inputs import (
    ProcessorSpec,
    VideoShard,
    build_prompt,
    shard_frames,
    temporal_shards,
    video_shard,
)
from apbv.metrics import ATTENTION, COMM_WAIT, OTHER_LAYERS, VISION, MetricsRecorder, balance
from apbv.model.generate import generate
from apbv.model.qwen2_5_vl import QwenVLRank
from apbv.model.sampling import SamplingParams
from apbv.model.tiny import build_tokenizer
from apbv.run_record import environment
from apbv.video import synthetic_video

from .architectures import add_run_arguments, model_dtype, random_model
from .processes import bench_device, bench_world, reporting_rank


def shards(frames, world_size: int, spec: ProcessorSpec, device: torch.device, dtype) -> list[VideoShard]:
    """Every rank's patchified temporal patches, on the device, prepared before timing."""
    patches = temporal_shards(frames.shape[0], world_size, spec)
    out = [video_shard(shard_frames(frames, p, spec), patches, spec) for p in patches]
    return [replace(s, pixels=s.pixels.to(device, dtype)) for s in out]


def run_strategy(name: str, rank_model: QwenVLRank, prompt, video_shards, world_size: int, args) -> dict:
    strategy = get_strategy(AttentionConfig(name))
    world = bench_world(world_size, rank_model.device)
    sampling = SamplingParams(max_new_tokens=1)

    def request(rank, comm):
        metrics = MetricsRecorder(rank, rank_model.device)
        shard = video_shards[rank]
        with metrics.span("vision"):
            embeds = rank_model.encode_video(shard.pixels, shard.grid_thw, shard.tokens_per_rank, comm, metrics)
        list(generate(rank_model, prompt, embeds, strategy, comm, metrics, sampling))
        return metrics.finish().to_dict()

    busy, records = [], None
    with world:
        for _ in range(args.warmup):
            world.run(request)
        for _ in range(args.repeats):
            records = world.run(request)
            busy.append(list(world.busy))
    per_rank = [statistics.median(b[r] for b in busy) for r in range(world_size)]
    pairs = [rec["counters"].get("attn_pairs", 0.0) for rec in records]
    prefill_bytes = sum(rec["stage_counters"].get("prefill", {}).get("bytes_sent", 0.0) for rec in records)
    return {
        "strategy": name, "world_size": world_size, "slowest_rank_s": max(per_rank),
        "mean_rank_s": statistics.mean(per_rank), "per_rank_s": per_rank,
        "time_balance": balance(per_rank),
        "attn_pair_balance": balance(pairs),
        "layers": rank_model.num_layers,
        "prefill_bytes_per_layer": prefill_bytes / rank_model.num_layers,  # sent, all ranks together
        "ranks": records, "timing": world.timing,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolutions", nargs="+", default=["1440p"])
    p.add_argument("--world-size", type=int, default=8)
    p.add_argument("--strategies", default=",".join(STRATEGY_NAMES))
    p.add_argument("--out", type=Path, help="PREFIX: PREFIX.jsonl (a line per point, written as it is measured), "
                   "PREFIX.md (table) and PREFIX.html (speedup vs frames)")  # fmt: skip
    p.add_argument("--stages-at", default="1440p:64", help="RES:FRAMES, the point whose per-rank stages are tabled")
    add_run_arguments(p, warmup=3, repeats=5)
    args = p.parse_args(argv)

    with bench_device(args.device) as device:
        return sweep(args, device)


def sweep(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Every (resolution, frames) point, every strategy; rank 0 prints and writes (--out)."""
    dtype = model_dtype(device)
    report = reporting_rank()
    rank_model = QwenVLRank(random_model(args.arch, device, dtype))
    spec, tokenizer = ProcessorSpec(), build_tokenizer()
    meta = vars(args) | environment(device) | {"out": str(args.out) if args.out else None}
    if args.out and report:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        _output(args.out, ".jsonl").write_text("")
    rows = []
    for resolution in args.resolutions:
        for frames in args.frames:
            video = synthetic_video(resolution, frames)
            prompt = build_prompt(tokenizer, video, "What is in this video?", spec)
            point = {"arch": args.arch, "resolution": resolution, "frames": frames,
                     "tokens": int(prompt.input_ids.numel()), "visual_tokens": prompt.visual_tokens}  # fmt: skip
            if report:
                print(f"{args.arch} {resolution} x{frames}: {point['tokens']} tokens, W={args.world_size}", flush=True)
            point_rows, sharded = [], (0, [])  # (world size, its shards): reused by the strategies of equal W
            for name in [s for s in args.strategies.split(",") if s]:
                w = ranks_for(name, args.world_size)
                try:
                    if sharded[0] != w:
                        sharded = (0, [])  # free the other world size's pixels before patchifying again
                        sharded = (w, shards(video.frames, w, spec, device, dtype))
                    row = run_strategy(name, rank_model, prompt, sharded[1], w, args)
                except torch.cuda.OutOfMemoryError:
                    row = {"strategy": name, "world_size": w, "oom": True}
                    torch.cuda.empty_cache()
                point_rows.append(point | row)
            _add_speedups(point_rows)
            for row in point_rows if report else []:
                print("  " + _line(row), flush=True)
                if args.out:
                    with _output(args.out, ".jsonl").open("a") as f:
                        f.write(json.dumps({"meta": meta, **row}) + "\n")
            rows += point_rows
    if args.out and report:
        _output(args.out, ".md").write_text(to_markdown(meta, rows))
        if importlib.util.find_spec("plotly") is not None:  # optional where it is not installed (GPU images)
            speedup_figure(rows).write_html(_output(args.out, ".html"), include_plotlyjs="cdn")
    return rows


def _output(prefix: Path, extension: str) -> Path:
    """PREFIX + extension (prefixes such as speed-qwen2.5-vl-3b contain dots: no with_suffix)."""
    return prefix.with_name(prefix.name + extension)


def _add_speedups(rows: list[dict]) -> None:
    """speedup_vs_S: S's latency over this row's, for every strategy S measured at this point."""
    latency = {r["strategy"]: r["slowest_rank_s"] for r in rows if "slowest_rank_s" in r}
    for r in rows:
        if "slowest_rank_s" in r:
            r.update({f"speedup_vs_{s}": t / r["slowest_rank_s"] for s, t in latency.items()})


def _line(r: dict) -> str:
    if r.get("oom"):
        return f"{r['strategy']:6} W={r['world_size']}  OOM"
    return (f"{r['strategy']:6} W={r['world_size']}  slowest {r['slowest_rank_s'] * 1e3:9.1f} ms  "
            f"mean {r['mean_rank_s'] * 1e3:9.1f} ms  speedup {r.get('speedup_vs_dense', 1.0):6.2f}x  "
            f"pair balance {r['attn_pair_balance']:.3f}  {r['timing']}")  # fmt: skip


def to_markdown(meta: dict, rows: list[dict]) -> str:
    """A line per (resolution, frames) with latency and speedup vs dense per strategy, then the per-rank stages
    of the `--stages-at` point."""
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    lines = [f"# Speed: {meta['arch']}, prefill + first token, W = {meta['world_size']}", "",
             f"`{meta['command']}`  ", f"{meta['date']}; {meta['device_name']}; torch {meta['torch']}, "
             f"transformers {meta['transformers']}. W > 1: {_timing(rows)}. Latency (speedup vs dense).", "",
             "| resolution | frames | tokens | " + " | ".join(strategies) + " |",
             "|---|---|---|" + "---|" * len(strategies)]  # fmt: skip
    points = dict.fromkeys((r["resolution"], r["frames"], r["tokens"]) for r in rows)
    for resolution, frames, tokens in points:
        cells = []
        for s in strategies:
            r = next(r for r in rows if (r["resolution"], r["frames"], r["strategy"]) == (resolution, frames, s))
            cells.append("OOM" if r.get("oom") else
                         f"{r['slowest_rank_s'] * 1e3:,.0f} ms ({r.get('speedup_vs_dense', float('nan')):.2f}x)")
        lines.append(f"| {resolution} | {frames} | {tokens:,} | " + " | ".join(cells) + " |")
    resolution, _, frames = meta["stages_at"].partition(":")
    detail = [r for r in rows if (r["resolution"], str(r["frames"])) == (resolution, frames) and "ranks" in r]
    if detail:
        lines += ["", f"## Per rank at {resolution} x {frames} frames", "",
                  "Stage totals in ms (vision, attention, waiting on communication, other layers); rank time from the "
                  "common start; balance = max/mean over ranks; MB sent in prefill per language-model layer.", "",
                  "| strategy | rank | time | vision | attention | comm wait | other layers | attention pairs "
                  "| MB/layer |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in detail:
            lines += _per_rank_lines(r)
    return "\n".join(lines) + "\n"


def _per_rank_lines(row: dict) -> list[str]:
    """Table lines of one strategy at one point: a line per rank, then the balance line."""
    lines = []
    for rank, (seconds, rec) in enumerate(zip(row["per_rank_s"], row["ranks"])):
        stages = [rec["totals"].get(k, 0.0) * 1e3 for k in (VISION, ATTENTION, COMM_WAIT, OTHER_LAYERS)]
        sent = rec["stage_counters"].get("prefill", {}).get("bytes_sent", 0.0) / row["layers"]
        cells = [row["strategy"], rank, f"{seconds * 1e3:,.1f}", *(f"{ms:,.1f}" for ms in stages),
                 f"{rec['counters'].get('attn_pairs', 0):.3g}", f"{sent / 1e6:,.2f}"]  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    total = f"{row['prefill_bytes_per_layer'] / 1e6:,.2f} (all ranks)"
    balance = [f"{row['time_balance']:.3f}", "", "", "", "", f"{row['attn_pair_balance']:.3f}"]
    cells = [row["strategy"], "balance", *balance, total]
    return lines + ["| " + " | ".join(cells) + " |"]


def _timing(rows: list[dict]) -> str:
    return ", ".join(sorted({r["timing"] for r in rows if r.get("world_size", 1) > 1 and "timing" in r})) or "-"


def speedup_figure(rows: list[dict]):
    """Speedup vs dense over frames, one panel per resolution, one line per strategy."""
    import plotly.express as px

    data = [r for r in rows if "speedup_vs_dense" in r]
    fig = px.line(data, x="frames", y="speedup_vs_dense", color="strategy", facet_col="resolution", markers=True,
                  labels={"speedup_vs_dense": "speedup vs dense (1 GPU)"},
                  title=f"Prefill + first token speedup vs dense; W > 1 {_timing(rows)}")  # fmt: skip
    return fig


if __name__ == "__main__":
    main(sys.argv[1:])
