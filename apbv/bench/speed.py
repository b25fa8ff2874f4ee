"""End-to-end speed of prefill + first token per strategy on a real architecture (random bf16 weights).

    python -m apbv.bench.speed --arch qwen2.5-vl-3b --resolution 1440p --frames 64 --world-size 8 \
        [--strategies dense,ring,star,apb,apbv] [--warmup 1] [--repeats 3] [--json out.json]

Each measured run is the paper's speed-test unit: frame-parallel vision encoder + sharded prefill + one generated
token (frames are patchified beforehand, as the reference's preprocessing is not timed either). Dense runs on one
rank (the single-GPU FlashAttention baseline, on the fastest kernel `attend` finds). The W ranks of the other
strategies run as threads on one device, one at a time (apbv.bench.threads): their per-rank times are
"projected (sequential ranks, no communication)", i.e. compute only; the slowest rank is the projected latency.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from apbv.attention import get_strategy
from apbv.attention.layout import split_temporal_patches
from apbv.config import STRATEGIES, AttentionConfig
from apbv.inputs import ProcessorSpec, build_prompt, patchify
from apbv.metrics import MetricsRecorder
from apbv.model.generate import SamplingParams, VideoShard, generate
from apbv.model.qwen2_5_vl import QwenVLRank
from apbv.model.tiny import build_tokenizer
from apbv.video import synthetic_video

from .architectures import add_run_arguments, model_dtype, random_model
from .record import environment, write_json
from .threads import ThreadWorld

PROJECTED = "projected (sequential ranks, no communication)"


def shards(frames, world_size: int, spec: ProcessorSpec, device: torch.device, dtype) -> list[VideoShard]:
    """Every rank's patchified temporal patches, prepared before timing."""
    patches = frames.shape[0] // spec.temporal_patch_size
    ranges = split_temporal_patches(patches, world_size)
    out = []
    for r in ranges:
        pixels, grid = patchify(frames[2 * r.start : 2 * r.stop], spec)
        out.append(VideoShard(pixels.to(device, dtype), grid, []))
    tokens = [int(s.grid_thw.prod()) // spec.merge_size**2 for s in out]
    return [VideoShard(s.pixels, s.grid_thw, tokens) for s in out]


def run_strategy(name: str, rank_model: QwenVLRank, prompt, video_shards, world_size: int, args) -> dict:
    strategy = get_strategy(AttentionConfig(name))
    world = ThreadWorld(world_size, rank_model.device)
    sampling = SamplingParams(max_new_tokens=1)

    def request(rank, comm):
        metrics = MetricsRecorder(rank, rank_model.device)
        list(generate(rank_model, prompt, video_shards[rank], strategy, comm, metrics, sampling))
        return metrics.finish().to_dict()

    for _ in range(args.warmup):
        world.run(request)
    busy, records = [], None
    for _ in range(args.repeats):
        records = world.run(request)
        busy.append(list(world.busy))
    per_rank = [statistics.median(b[r] for b in busy) for r in range(world_size)]
    pairs = [rec["counters"].get("attn_pairs", 0.0) for rec in records]
    return {
        "strategy": name, "world_size": world_size, "slowest_rank_s": max(per_rank),
        "mean_rank_s": statistics.mean(per_rank), "per_rank_s": per_rank,
        "attn_pair_balance": max(pairs) / statistics.mean(pairs) if any(pairs) else 1.0,
        "ranks": records, "timing": PROJECTED if world_size > 1 else "measured",
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", default="1440p")
    p.add_argument("--world-size", type=int, default=8)
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    add_run_arguments(p)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    dtype = model_dtype(device)
    rank_model = QwenVLRank(random_model(args.arch, device, dtype))
    spec = ProcessorSpec()
    video = synthetic_video(args.resolution, args.frames)
    prompt = build_prompt(build_tokenizer(), video, "What is in this video?", spec)
    print(f"{args.arch} {args.resolution} x{args.frames}: {prompt.input_ids.numel()} tokens "
          f"({prompt.visual_tokens} visual), W={args.world_size}", flush=True)
    rows = []
    for name in [s for s in args.strategies.split(",") if s]:
        w = 1 if name == "dense" else args.world_size
        try:
            row = run_strategy(name, rank_model, prompt, shards(video.frames, w, spec, device, dtype), w, args)
        except torch.cuda.OutOfMemoryError:
            row = {"strategy": name, "world_size": w, "oom": True}
            torch.cuda.empty_cache()
        rows.append(row)
    dense = next((r for r in rows if r["strategy"] == "dense" and "slowest_rank_s" in r), None)
    for r in rows:
        if dense and "slowest_rank_s" in r:
            r["speedup_vs_dense"] = dense["slowest_rank_s"] / r["slowest_rank_s"]
        print(f"{r['strategy']:6} W={r['world_size']}  " + ("OOM" if r.get("oom") else
              f"slowest {r['slowest_rank_s'] * 1e3:9.1f} ms  mean {r['mean_rank_s'] * 1e3:9.1f} ms  "
              f"speedup {r.get('speedup_vs_dense', float('nan')):6.2f}x  pair balance {r['attn_pair_balance']:.3f}  "
              f"{r['timing']}"), flush=True)
    if args.json_path:
        write_json(args.json_path, vars(args) | environment(device) | {"tokens": int(prompt.input_ids.numel())}, rows)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
