"""Fidelity benchmark: what each sequence-parallel strategy costs in answers, compared with dense attention.

    python -m apbv.bench.fidelity [--model assets/model] [--frames 64 128 256] [--world-sizes 2 4 8]
        [--passing-ratios 0 1/128 1/32 1/8 1] [--aligns 128 16] [--n 10] [--tasks color shape digit word order count]
        [--sets footage grey] [--out bench/results/fidelity-cpu.json]

On held-out videos (`apbv.synthetic.held_out`: seeds disjoint from training; per --sets, needles over the held-out
real footage, never used in training, or over synthetic grey), every strategy runs on W
thread-ranks in this process (`apbv.qa.ask`: real strategy code and collectives, ranks taking turns) and is
compared with dense on the same prompt: answer agreement, accuracy against the ground truth, KL(dense || strategy)
of the first-token distribution, the relative error of every layer's attention output (all prompt rows, and
the query rows alone), and prefill attention pairs. Settings per W: ring (exact), star, and for each --aligns
value APB and APB-V at the paper's ratios, plus the APB-V passing-ratio sweep at the smallest align. A dense
re-run is the self-check row (agreement 1, KL 0). Writes JSON and a Markdown table next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import transformers

from apbv import synthetic
from apbv.attention.config import AttentionConfig
from apbv.model.loading import load_model
from apbv.qa import Answer, ask
from apbv.synthetic import EVAL_FPS, as_video, held_out

PAPER = AttentionConfig()


@dataclass(frozen=True)
class Setting:
    """One strategy configuration at one world size."""

    strategy: str
    world_size: int
    align: int
    passing_ratio: float

    @property
    def config(self) -> AttentionConfig:
        return AttentionConfig(self.strategy, passing_ratio=self.passing_ratio, align=self.align)


def settings(world_sizes: list[int], aligns: list[int], passing_ratios: list[float]) -> list[Setting]:
    """The dense self-check, then per W: ring, star, APB and APB-V at the paper's ratios for every align, and
    the APB-V passing sweep at the smallest align."""
    out = [Setting("dense", 1, PAPER.align, PAPER.passing_ratio)]
    for w in world_sizes:
        out += [Setting("ring", w, PAPER.align, PAPER.passing_ratio), Setting("star", w, PAPER.align, 0.0)]
        for align in aligns:
            out += [Setting(s, w, align, PAPER.passing_ratio) for s in ("apb", "apbv")]
        out += [Setting("apbv", w, min(aligns), p) for p in passing_ratios if p != PAPER.passing_ratio]
    return out


def compare(dense: Answer, other: Answer, truth: str) -> dict[str, float | list[float]]:
    """Per-sample fidelity of `other` against `dense` (same prompt)."""
    log_p = torch.log_softmax(dense.first_logits, -1)
    log_q = torch.log_softmax(other.first_logits, -1)
    query = slice(dense.prompt.n_context, None)
    return {
        "agree": float(other.text == dense.text),
        "correct": float(other.text == truth),
        "kl": float((log_p.exp() * (log_p - log_q)).sum().clamp_min(0)),
        "rel_err": [_rel(o, d) for o, d in zip(other.layer_outputs, dense.layer_outputs)],
        "rel_err_query": [_rel(o[:, query], d[:, query]) for o, d in zip(other.layer_outputs, dense.layer_outputs)],
        "attn_pairs_rel": other.attn_pairs / dense.attn_pairs,
    }


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def run(args: argparse.Namespace) -> dict:
    loaded = load_model(args.model, torch.device("cpu"))
    grid = settings(args.world_sizes, args.aligns, args.passing_ratios)
    rows = []
    for held_out_set in args.sets:
        for num_frames in args.frames:
            per_setting: dict[Setting, list[dict]] = defaultdict(list)
            dense_correct, n_context = [], 0
            for i in range(args.n):
                task = args.tasks[i % len(args.tasks)]
                sample = held_out(args.offset + i, num_frames, task, held_out_set)
                video = as_video(sample, EVAL_FPS)
                dense = ask(loaded, video, sample.question, AttentionConfig("dense"), record_layers=True)
                dense_correct.append(dense.text == sample.answer)
                n_context = dense.prompt.n_context
                for s in grid:
                    other = ask(loaded, video, sample.question, s.config, s.world_size, record_layers=True)
                    per_setting[s].append(compare(dense, other, sample.answer))
            accuracy = float(np.mean(dense_correct))
            print(f"{held_out_set}, {num_frames} frames: dense accuracy {accuracy:.3f}", flush=True)
            rows += [_summary(held_out_set, num_frames, n_context, s, r, accuracy) for s, r in per_setting.items()]
    return {"meta": _meta(args), "rows": rows}


def _summary(
    held_out_set: str, num_frames: int, n_context: int, s: Setting, records: list[dict], dense_accuracy: float
) -> dict:
    config = s.config
    return {
        "set": held_out_set,
        "frames": num_frames,
        "n_context": n_context,
        **asdict(s),
        "anchor_len": config.anchor_len(n_context) if s.strategy in ("apb", "apbv") else None,
        "passing_budget": _budget(s, n_context),
        "n": len(records),
        "agreement": float(np.mean([r["agree"] for r in records])),
        "accuracy": float(np.mean([r["correct"] for r in records])),
        "dense_accuracy": dense_accuracy,
        "kl_mean": float(np.mean([r["kl"] for r in records])),
        "kl_max": float(np.max([r["kl"] for r in records])),
        "rel_err_per_layer": np.mean([r["rel_err"] for r in records], axis=0).tolist(),
        "rel_err_query_per_layer": np.mean([r["rel_err_query"] for r in records], axis=0).tolist(),
        "attn_pairs_vs_dense": float(np.mean([r["attn_pairs_rel"] for r in records])),
    }


def _budget(s: Setting, n_context: int) -> int | None:
    """Effective passing budget P per host and KV head (APB passes twice APB-V's, star nothing)."""
    if s.strategy == "apbv":
        return s.config.passing_budget(n_context)
    if s.strategy == "apb":
        return 2 * s.config.passing_budget(n_context)
    return 0 if s.strategy == "star" else None


def _meta(args: argparse.Namespace) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "command": "python -m apbv.bench.fidelity " + " ".join(args.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "git_commit": commit,
        "model": str(args.model or "embedded"),
        "ranks": "W thread-ranks in one process (apbv.thread_comm), real strategy code and collectives",
        "sample_fps": EVAL_FPS,
        "tasks": list(args.tasks),
        "sets": list(args.sets),
        "held_out_offset": args.offset,
    }


def to_markdown(result: dict) -> str:
    """A table per held-out set and frame count: one line per setting."""
    meta = result["meta"]
    lines = [
        "# Fidelity vs dense attention",
        "",
        f"`{meta['command']}`  ",
        f"{meta['date']}; {meta['machine']}, {meta['cpu_count']} CPUs, torch {meta['torch']}, transformers "
        f"{meta['transformers']}, commit {meta['git_commit']}; model {meta['model']}; tasks {', '.join(meta['tasks'])}.",
        "",
        "A, P: effective anchor length and passing budget (tokens per host per KV head) for this N. rel err: "
        "||out - dense|| / ||dense|| of the last layer's attention output (all prompt rows / query rows); "
        "pairs: prefill attention (row, key) pairs over all ranks relative to dense.",
    ]
    for held_out_set, frames in dict.fromkeys((r["set"], r["frames"]) for r in result["rows"]):
        rows = [r for r in result["rows"] if (r["set"], r["frames"]) == (held_out_set, frames)]
        lines += [
            "",
            f"## {held_out_set}: {frames} frames (N = {rows[0]['n_context']} context tokens, n = {rows[0]['n']}, "
            f"dense accuracy {rows[0]['dense_accuracy']:.2f})",
            "",
            "| W | strategy | align | passing | A | P | agree | acc | KL mean | KL max | rel err | rel err query | pairs |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            passing = str(Fraction(r["passing_ratio"]).limit_denominator(1024)) if r["strategy"] in ("apb", "apbv") else "-"
            lines.append(
                f"| {r['world_size']} | {r['strategy']} | {r['align'] if passing != '-' else '-'} | {passing} "
                f"| {_dash(r['anchor_len'])} | {_dash(r['passing_budget'])} | {r['agreement']:.2f} | {r['accuracy']:.2f} "
                f"| {r['kl_mean']:.2e} | {r['kl_max']:.2e} | {r['rel_err_per_layer'][-1]:.2e} "
                f"| {r['rel_err_query_per_layer'][-1]:.2e} | {r['attn_pairs_vs_dense']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def _dash(x: int | None) -> str:
    return "-" if x is None else str(x)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Answer fidelity of each strategy against dense attention.")
    parser.add_argument("--model", default=None, help="checkpoint (default: the embedded model)")
    parser.add_argument("--frames", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--passing-ratios", type=lambda t: float(Fraction(t)), nargs="+",
                        default=[0.0, 1 / 128, 1 / 32, 1 / 8, 1.0])  # fmt: skip
    parser.add_argument("--aligns", type=int, nargs="+", default=[128, 16])
    parser.add_argument("--n", type=int, default=10, help="held-out samples per frame count")
    parser.add_argument("--tasks", nargs="+", default=list(synthetic.TASKS), choices=synthetic.TASKS)
    parser.add_argument("--sets", nargs="+", default=list(synthetic.HELD_OUT_SETS), choices=synthetic.HELD_OUT_SETS,
                        help="held-out sets: needles over the held-out real footage, or over synthetic grey")
    parser.add_argument("--offset", type=int, default=100_000, help="first held-out sample index")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="JSON file (a .md table is written next to it)")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    torch.set_num_threads(args.threads)
    result = run(args)
    table = to_markdown(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(table)
    print(table)
    return result


if __name__ == "__main__":
    main()
