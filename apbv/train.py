"""Train the embedded model: a small Qwen2.5-VL that answers the synthetic needle-in-a-video questions.

    python -m apbv.train --out assets/model [--steps 700] [--batch 8] [--device cpu|cuda] [--frames 16-128]
        [--seed 0] [--eval-n 40]

Teacher forcing on freshly generated samples (`apbv.synthetic`), through transformers' own forward (sdpa) on the
exact prompts the engine builds (`build_prompt` + `patchify`); the loss covers only the answer tokens and the
closing <|im_end|>. A curriculum grows the frame count from 16 to the upper end of --frames over the first 60% of
the steps. Training seeds lie below HELD_OUT_SEED, evaluation seeds at or above it. The checkpoint keeps video
frames at 112x112 (16 visual tokens per temporal patch) through its video_preprocessor_config.json, and a
training.json records the command, wall time and held-out accuracy.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from apbv import synthetic
from apbv.config import AttentionConfig
from apbv.inputs import ProcessorSpec, build_prompt, patchify
from apbv.model.loading import load_model
from apbv.model.tiny import IM_END, build_tokenizer, save_checkpoint, tiny_config
from apbv.qa import ask
from apbv.video import SampledVideo

MODEL_OVERRIDES = {
    "text_config": {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 3,
                    "num_attention_heads": 4, "num_key_value_heads": 2},
    "vision_config": {"hidden_size": 96, "intermediate_size": 192, "num_heads": 4, "depth": 2},
}  # fmt: skip
FRAME_SIZE = (112, 112)
VIDEO_PIXELS = (4 * 28 * 28, 112 * 112)  # per-frame (min, max): 112x112 frames stay as they are, 16 tokens
HELD_OUT_SEED = 1 << 31
_SEEDS_PER_RUN = 10_000_000  # training seeds of run S: S * _SEEDS_PER_RUN + i
RETRIEVAL = ("color", "shape", "digit")
TASK_WEIGHTS = {"color": 1.0, "shape": 1.5, "digit": 1.5, "word": 1.0, "order": 1.0, "count": 1.0}
SAMPLE_FPS = (1.0, 8.0)  # range of the frame rate of the sampled frames (sets the M-RoPE time step)


@dataclass(frozen=True)
class Example:
    """One teacher-forced sequence: prompt + answer + <|im_end|>; the last n_target ids are the targets."""

    kwargs: dict[str, torch.Tensor]
    n_target: int
    task: str


def make_example(tokenizer, spec: ProcessorSpec, sample: synthetic.Sample, sample_fps: float) -> Example:
    """The engine's prompt for `sample` (same chat template, same patchify) followed by the answer."""
    video = SampledVideo(sample.frames, sample_fps=sample_fps, source_fps=sample_fps,
                         duration_s=len(sample.frames) / sample_fps)  # fmt: skip
    prompt = build_prompt(tokenizer, video, sample.question, spec)
    target = tokenizer.encode(sample.answer + IM_END, add_special_tokens=False)
    pixels, _ = patchify(sample.frames, spec)
    ids = torch.cat([prompt.input_ids, torch.tensor(target)])
    types = torch.cat([prompt.mm_token_type_ids, torch.zeros(len(target), dtype=torch.int32)])
    kwargs = {
        "input_ids": ids[None],
        "mm_token_type_ids": types[None],
        "pixel_values_videos": pixels,
        "video_grid_thw": prompt.video_grid_thw,
        "second_per_grid_ts": prompt.second_per_grid_ts,
    }
    return Example(kwargs, len(target), sample.task)


def frame_range(progress: float, frames: tuple[int, int]) -> tuple[int, int]:
    """Curriculum: the upper frame count grows linearly from the lower bound to frames[1] by 60% of training."""
    lo, hi = frames
    top = lo + (hi - lo) * min(1.0, progress / 0.6)
    return lo, max(lo, int(top) // 2 * 2)


def random_sample(rng: random.Random, seed: int, frames: tuple[int, int], tasks: tuple[str, ...]) -> synthetic.Sample:
    task = rng.choices(tasks, weights=[TASK_WEIGHTS[t] for t in tasks])[0]
    n = max(rng.randrange(frames[0], frames[1] + 1, 2), 16 if task == "count" else 8)  # room for 4 needles
    needle_len = 2 if task in ("order", "count") else rng.choice((2, 2, 3, 4))
    return synthetic.make_sample(seed, n, FRAME_SIZE, task, needle_len)


def loss_and_hits(model, example: Example, device: torch.device) -> tuple[torch.Tensor, bool]:
    """Mean cross-entropy over the targets; whether greedy teacher-forced predictions got all of them."""
    kwargs = {k: v.to(device) for k, v in example.kwargs.items()}
    logits = model(**kwargs, logits_to_keep=example.n_target + 1).logits[0, :-1].float()
    targets = kwargs["input_ids"][0, -example.n_target :]
    loss = torch.nn.functional.cross_entropy(logits, targets)
    return loss, bool((logits.argmax(-1) == targets).all())


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train(args: argparse.Namespace) -> Qwen2_5_VLForConditionalGeneration:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tokenizer = build_tokenizer()
    spec = ProcessorSpec()
    model = Qwen2_5_VLForConditionalGeneration._from_config(tiny_config(**MODEL_OVERRIDES), attn_implementation="sdpa")
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    seed = args.seed * _SEEDS_PER_RUN
    start, window = time.time(), {t: [] for t in args.tasks}
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        frames = frame_range(step / args.steps, args.frames)
        total = 0.0
        for _ in range(args.batch):
            sample = random_sample(rng, seed, frames, args.tasks)
            seed += 1
            example = make_example(tokenizer, spec, sample, rng.uniform(*SAMPLE_FPS))
            loss, hit = loss_and_hits(model, example, device)
            (loss / args.batch).backward()
            total += loss.item() / args.batch
            window[example.task] = (window[example.task] + [hit])[-50:]
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % args.log_every == 0 or step == args.steps - 1:
            acc = " ".join(f"{t}={np.mean(h):.2f}" for t, h in window.items() if h)
            print(f"step {step} frames {frames} loss {total:.3f} train-acc {acc} {time.time() - start:.0f}s",
                  flush=True)  # fmt: skip
    assert seed < HELD_OUT_SEED, "training seeds ran into the held-out range"
    return model.eval()


def held_out(i: int, num_frames: int, task: str) -> synthetic.Sample:
    """Held-out sample i (seed HELD_OUT_SEED + i): never drawn in training."""
    return synthetic.make_sample(HELD_OUT_SEED + i, num_frames, FRAME_SIZE, task)


def evaluate(model_dir: Path, frames: tuple[int, ...], tasks: tuple[str, ...], n: int) -> dict[str, dict[str, float]]:
    """Dense greedy exact-match accuracy of the saved checkpoint on n held-out samples per (frames, task),
    through the engine's path (`apbv.qa.ask`: build_prompt, patchify, generate), sampled at 2 fps."""
    loaded = load_model(str(model_dir), torch.device("cpu"))
    results: dict[str, dict[str, float]] = {}
    for num_frames in frames:
        row = {}
        for task in tasks:
            hits = 0
            for i in range(n):
                sample = held_out(i, num_frames, task)
                video = SampledVideo(sample.frames, sample_fps=2.0, source_fps=2.0, duration_s=num_frames / 2)
                hits += ask(loaded, video, sample.question, AttentionConfig("dense")).text == sample.answer
            row[task] = hits / n
        results[str(num_frames)] = row
        print(f"held-out accuracy at {num_frames} frames: {row}", flush=True)
    return results


def _frames_arg(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    lo, hi = int(lo), int(hi or lo)
    if not 4 <= lo <= hi:
        raise argparse.ArgumentTypeError("--frames must be LO-HI with 4 <= LO <= HI")
    return lo, hi


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the embedded Qwen2.5-VL model on synthetic video QA.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=700, help="optimizer steps")
    parser.add_argument("--batch", type=int, default=8, help="samples per optimizer step (accumulated)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--frames", type=_frames_arg, default=(8, 128), help="final frame-count range LO-HI")
    parser.add_argument("--tasks", nargs="+", default=RETRIEVAL, choices=synthetic.TASKS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--eval-n", type=int, default=40, help="held-out samples per task and frame count")
    parser.add_argument("--eval-frames", type=int, nargs="+", default=(16, 64, 256))
    args = parser.parse_args(argv)
    args.tasks = tuple(args.tasks)
    torch.set_num_threads(args.threads)
    start = time.time()
    model = train(args)
    train_s = time.time() - start
    save_checkpoint(model.float().cpu(), args.out)
    ProcessorSpec().save_video_config(args.out, *VIDEO_PIXELS)
    accuracy = evaluate(args.out, tuple(args.eval_frames), args.tasks, args.eval_n) if args.eval_n else {}
    record = {
        "command": "python -m apbv.train " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "device": args.device,
        "train_wall_s": round(train_s, 1),
        "samples": args.steps * args.batch,
        "held_out_accuracy_dense": accuracy,
        "torch": torch.__version__,
    }
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
