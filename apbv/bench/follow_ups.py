"""Follow-up questions that continue a cached conversation: what it saves, and what it costs APB-V's answers.

    python -m apbv.bench.follow_ups [--model M] [--frames 16 64] [--n 24] [--sets footage grey]
        [--world-size 2] [--out bench/results/DATE-cpu/follow_ups.json]

On the real engine (`EnginePool`, one process per rank, CPU by default) and held-out videos written as MP4s: a
first question (another task's question) under APB-V on W ranks, then the video's own question as a follow-up,
three ways: APB-V continuing the first turn's cached K/V (`Request.reuse_context=True`: its context was built with
the first question's query-aware selection), APB-V with a full prefill, and dense on one rank (the reference).
Reported per held-out set and frame count: agreement of the continued answer with the fresh APB-V one and with
dense, each one's accuracy, and the median prefill time (continued vs full). Exact strategies (dense, ring)
continue by default: their continued answers equal a full prefill's (tests/test_context_reuse.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from apbv import synthetic
from apbv.engine.api import Request, Result
from apbv.engine.pool import EnginePool
from apbv.run_record import environment
from apbv.synthetic import EVAL_FPS, held_out, write_mp4

WAYS = ("continued", "fresh", "dense")


def run(args: argparse.Namespace) -> dict:
    rows = []
    with EnginePool(model=args.model, world_size=args.world_size, device=args.device) as pool, \
            tempfile.TemporaryDirectory() as tmp:  # fmt: skip
        for held_out_set in args.sets:
            for num_frames in args.frames:
                records = [_sample(pool, Path(tmp), held_out_set, num_frames, i, args) for i in range(args.n)]
                rows.append(_summary(held_out_set, num_frames, records))
                print(json.dumps(rows[-1]), flush=True)
    return {"meta": {**environment(torch.device(args.device)), "world_size": args.world_size,
                     "model": args.model or "embedded", "sample_fps": EVAL_FPS}, "rows": rows}  # fmt: skip


def _sample(pool: EnginePool, tmp: Path, held_out_set: str, num_frames: int, i: int, args) -> dict:
    index = args.offset + i
    task = synthetic.TASKS[i % len(synthetic.TASKS)]
    sample = held_out(index, num_frames, task, held_out_set)
    first_question = held_out(index, num_frames, synthetic.TASKS[(i + 1) % len(synthetic.TASKS)], "grey").question
    video = write_mp4(sample.frames, tmp / f"{held_out_set}-{num_frames}-{i}.mp4", fps=EVAL_FPS)
    base = Request(str(video), first_question, strategy="apbv", world_size=args.world_size, num_frames=num_frames,
                   max_new_tokens=args.max_new_tokens, reuse_context=True)  # fmt: skip
    first = _answer(pool, base)
    follow_up = replace(base, question=sample.question, history=((first_question, first.answer),))
    results = {
        "continued": _answer(pool, follow_up),
        "fresh": _answer(pool, replace(follow_up, reuse_context=False)),
        "dense": _answer(pool, replace(follow_up, strategy="dense", world_size=1, reuse_context=False)),
    }
    if not results["continued"].summary()["context_reused_tokens"]:
        raise RuntimeError("the follow-up did not continue the first turn's cache")
    return {"truth": sample.answer, **{way: (r.answer.strip(), r.stage_s("prefill")) for way, r in results.items()}}


def _answer(pool: EnginePool, request: Request) -> Result:
    return pool.submit(request).result(timeout=600)


def _summary(held_out_set: str, num_frames: int, records: list[dict]) -> dict:
    def mean(pred) -> float:
        return float(np.mean([pred(r) for r in records]))

    return {
        "set": held_out_set,
        "frames": num_frames,
        "n": len(records),
        "agree_continued_fresh": mean(lambda r: r["continued"][0] == r["fresh"][0]),
        "agree_continued_dense": mean(lambda r: r["continued"][0] == r["dense"][0]),
        "agree_fresh_dense": mean(lambda r: r["fresh"][0] == r["dense"][0]),
        **{f"accuracy_{way}": mean(lambda r, w=way: r[w][0] == r["truth"]) for way in WAYS},
        **{f"prefill_s_{way}": statistics.median(r[way][1] for r in records) for way in WAYS},
    }


def to_markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [f"# Follow-ups: APB-V continuing the first turn's K/V vs a full prefill ({meta['date']})", "",
             f"`{meta['command']}` on {meta['device_name']}, W = {meta['world_size']}, torch {meta['torch']}, "
             f"transformers {meta['transformers']}, model {meta['model']}.", "",
             "| set | frames | n | agree continued/fresh | continued/dense | fresh/dense | accuracy continued / "
             "fresh / dense | prefill continued / fresh / dense |", "|---|---:|---:|---:|---:|---:|---|---|"]  # fmt: skip
    for r in result["rows"]:
        accuracy = " / ".join(f"{r[f'accuracy_{w}']:.2f}" for w in WAYS)
        prefill = " / ".join(f"{1000 * r[f'prefill_s_{w}']:.0f} ms" for w in WAYS)
        lines.append(f"| {r['set']} | {r['frames']} | {r['n']} | {r['agree_continued_fresh']:.2f} | "
                     f"{r['agree_continued_dense']:.2f} | {r['agree_fresh_dense']:.2f} | {accuracy} | {prefill} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="APB-V follow-ups continuing the cached context vs a full prefill.")
    p.add_argument("--model", default=None, help="checkpoint (default: the embedded model)")
    p.add_argument("--frames", type=int, nargs="+", default=[16, 64])
    p.add_argument("--n", type=int, default=24, help="held-out samples per set and frame count")
    p.add_argument("--sets", nargs="+", default=list(synthetic.HELD_OUT_SETS), choices=synthetic.HELD_OUT_SETS)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--offset", type=int, default=100_000, help="first held-out sample index")
    p.add_argument("--out", type=Path, default=None, help="JSON file (a .md table is written next to it)")
    args = p.parse_args(argv)
    result = run(args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        args.out.with_suffix(".md").write_text(to_markdown(result))
    print(to_markdown(result))
    return result


if __name__ == "__main__":
    main()
