"""Train the embedded model: a small Qwen2.5-VL that answers the needle-in-a-video questions.

    python -m apbv.train --out assets/model [--vision-steps 0] [--steps 700] [--batch 8] [--device cpu|cuda]
        [--frames 8-128] [--workers 0] [--time-limit S] [--init CHECKPOINT] [--seed 0] [--eval-n 40]

Two stages. First (--vision-steps) the vision tower alone learns to name the needle of single clips through
linear probes (`pretrain_vision`): end to end, the answer loss reaches it only through the language model, which
taught it colours but not shapes or digits. Then teacher forcing on freshly generated samples (`apbv.synthetic`),
with the vision tower fixed if --freeze-vision, through transformers' own forward (SDPA in the language model,
packed attention in the vision tower) on the exact prompts the engine builds (`build_prompt` + `patchify`),
right-padded into batches; the loss covers only the answer tokens and the closing <|im_end|>. A curriculum grows
the frame count from the lower to the upper end of --frames over the first 60% of the steps. Both stages draw the
needles over the training footage (`apbv.footage`) or, for GREY_SHARE of the samples, over synthetic grey.
Training seeds lie below HELD_OUT_SEED, evaluation seeds at or above it (run --seed S draws its own range), and the
held-out footage is never drawn in training. Evaluation reads each held-out set (`synthetic.HELD_OUT_SETS`: needles
over the held-out footage, and over grey) and counts the answers outside the question's closed set. The
checkpoint keeps video frames at 112x112 (16 visual tokens per temporal patch) through its
video_preprocessor_config.json; its training.json records the command, wall time, the footage split and digest,
held-out accuracy and the record of the --init checkpoint.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import multiprocessing
import random
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase, Qwen2_5_VLForConditionalGeneration

from apbv import footage, synthetic
from apbv.attention.config import AttentionConfig
from apbv.inputs import ProcessorSpec, build_prompt, patchify
from apbv.model.loading import LoadedModel, load_model, save_answers
from apbv.model.qwen2_5_vl import merged_vision_tokens
from apbv.model.tiny import IM_END, build_tokenizer, save_checkpoint, tiny_config
from apbv.model.vision_attention import set_attention
from apbv.qa import ask
from apbv.run_record import environment
from apbv.synthetic import EVAL_FPS, FRAME_SIZE, HELD_OUT_SEED, as_video, held_out

MODEL_OVERRIDES = {
    "text_config": {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 3,
                    "num_attention_heads": 4, "num_key_value_heads": 2},
    "vision_config": {"hidden_size": 96, "intermediate_size": 192, "num_heads": 4, "depth": 2},
}  # fmt: skip
VIDEO_PIXELS = (4 * 28 * 28, 112 * 112)  # per-frame (min, max): 112x112 frames stay as they are, 16 tokens
_SEEDS_PER_RUN = 10_000_000  # training seeds of run S: S * _SEEDS_PER_RUN + i (vision clips: the upper half)
TASK_WEIGHTS = {"color": 1.0, "shape": 1.5, "digit": 1.5, "word": 1.0, "order": 1.0, "count": 1.0}
MIN_FRAMES = {"order": 8, "count": 16}  # room for 2 and 4 needles (needle lengths are drawn to fit the video)
GREY_SHARE = 0.25  # share of training samples over synthetic grey; the others are over the training footage
SAMPLE_FPS = (0.1, 8.0)  # default range of the sampled frame rate: it sets the M-RoPE time step, so how many
# positions a video's tokens span (a long video read at a low rate: thousands)


@dataclass(frozen=True)
class Example:
    """One teacher-forced sequence: prompt + answer + <|im_end|>; the last n_target ids are the targets."""

    input_ids: torch.Tensor  # (L,)
    mm_token_type_ids: torch.Tensor  # (L,)
    pixel_values_videos: torch.Tensor
    video_grid_thw: torch.Tensor  # (1, 3)
    second_per_grid_ts: torch.Tensor  # (1,)
    n_target: int
    task: str


def make_example(tokenizer: PreTrainedTokenizerBase, spec: ProcessorSpec, sample: synthetic.Sample, sample_fps: float) -> Example:
    """The engine's prompt for `sample` (same chat template, same patchify) followed by the answer."""
    prompt = build_prompt(tokenizer, as_video(sample, sample_fps), sample.question, spec)
    target = tokenizer.encode(sample.answer + IM_END, add_special_tokens=False)
    pixels, _ = patchify(sample.frames, spec)
    return Example(
        input_ids=torch.cat([prompt.input_ids, torch.tensor(target)]),
        mm_token_type_ids=torch.cat([prompt.mm_token_type_ids, torch.zeros(len(target), dtype=torch.int32)]),
        pixel_values_videos=pixels,
        video_grid_thw=prompt.video_grid_thw,
        second_per_grid_ts=prompt.second_per_grid_ts,
        n_target=len(target),
        task=sample.task,
    )


@dataclass(frozen=True)
class Batch:
    """Examples right-padded into one batch (padding follows every target, so causal attention never sees it);
    labels are -100 except at the targets."""

    model_kwargs: dict[str, torch.Tensor]
    labels: torch.Tensor  # (B, L)
    tasks: tuple[str, ...]


def collate(examples: list[Example], pad_id: int) -> Batch:
    length = max(e.input_ids.numel() for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    types = torch.zeros((len(examples), length), dtype=torch.int32)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        n = e.input_ids.numel()
        ids[i, :n], types[i, :n] = e.input_ids, e.mm_token_type_ids
        labels[i, n - e.n_target : n] = e.input_ids[-e.n_target :]
    kwargs = {
        "input_ids": ids,
        "mm_token_type_ids": types,
        "pixel_values_videos": torch.cat([e.pixel_values_videos for e in examples]),
        "video_grid_thw": torch.cat([e.video_grid_thw for e in examples]),
        "second_per_grid_ts": torch.cat([e.second_per_grid_ts for e in examples]),
    }
    return Batch(kwargs, labels, tuple(e.task for e in examples))


def frame_range(progress: float, frames: tuple[int, int]) -> tuple[int, int]:
    """Curriculum: the upper frame count grows linearly from the lower bound to frames[1] by 60% of training."""
    lo, hi = frames
    top = lo + (hi - lo) * min(1.0, progress / 0.6)
    return lo, max(lo, int(top) // 2 * 2)


def training_footage(sample_seed: int) -> str | None:
    """The background of training sample `sample_seed`: synthetic grey (None) for GREY_SHARE of the seeds, else
    the training footage; never the held-out footage."""
    return None if np.random.default_rng([sample_seed, 2]).random() < GREY_SHARE else "train"


class TrainingBatches(torch.utils.data.Dataset):
    """Batch `step` of run `seed`, a pure function of (seed, step): samples of one frame count (drawn from the
    curriculum's range at that step) with tasks drawn by TASK_WEIGHTS, each over `training_footage` and at a frame
    rate drawn log-uniformly from `fps`; sample seeds stay below HELD_OUT_SEED."""

    def __init__(
        self,
        steps: int,
        batch: int,
        frames: tuple[int, int],
        tasks: tuple[str, ...],
        seed: int,
        fps: tuple[float, float] = SAMPLE_FPS,
    ) -> None:
        _check_seed_range(seed, steps * batch)
        self.steps, self.batch, self.frames, self.tasks, self.seed, self.fps = steps, batch, frames, tasks, seed, fps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> Batch:
        tokenizer, spec = _tokenizer(), ProcessorSpec()
        rng = random.Random(self.seed * _SEEDS_PER_RUN + step)
        lo, hi = frame_range(step / self.steps, self.frames)
        num_frames = rng.randrange(lo, hi + 1, 2)
        examples = []
        for j in range(self.batch):
            task = rng.choices(self.tasks, weights=[TASK_WEIGHTS[t] for t in self.tasks])[0]
            seed = self.seed * _SEEDS_PER_RUN + step * self.batch + j
            n = max(num_frames, MIN_FRAMES.get(task, 0))
            sample = synthetic.make_sample(seed, n, FRAME_SIZE, task, footage=training_footage(seed))
            fps = math.exp(rng.uniform(math.log(self.fps[0]), math.log(self.fps[1])))
            examples.append(make_example(tokenizer, spec, sample, fps))
        return collate(examples, tokenizer.pad_token_id)


class NeedleClips(torch.utils.data.Dataset):
    """Vision pre-training batch `step` of run `seed`: 2-frame clips (one temporal patch; the needle on one frame
    or on both, as in videos where a needle's segment straddles temporal patches) over `training_footage`, cycling
    through the one-needle `tasks`, with each clip's answer as an index into its task's choices."""

    def __init__(self, steps: int, batch: int, tasks: tuple[str, ...], seed: int) -> None:
        _check_seed_range(seed, steps * batch)
        self.steps, self.batch, self.tasks = steps, batch, tasks
        self.first_seed = seed * _SEEDS_PER_RUN + _SEEDS_PER_RUN // 2

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...], torch.Tensor]:
        spec, pixels, grids, labels = ProcessorSpec(), [], [], []
        tasks = tuple(self.tasks[(step * self.batch + j) % len(self.tasks)] for j in range(self.batch))
        for i, task in enumerate(tasks, start=step * self.batch):
            needle_len = 1 + i // len(self.tasks) % 2  # on one frame of the pair, or both
            seed = self.first_seed + i
            sample = synthetic.make_sample(seed, 2, FRAME_SIZE, task, needle_len, training_footage(seed))
            clip_pixels, grid = patchify(sample.frames, spec)
            pixels.append(clip_pixels)
            grids.append(grid)
            labels.append(synthetic.RETRIEVAL_CHOICES[task].index(sample.answer))
        return torch.cat(pixels), torch.cat(grids), tasks, torch.tensor(labels)


def _check_seed_range(seed: int, samples: int) -> None:
    if (seed + 1) * _SEEDS_PER_RUN > HELD_OUT_SEED or samples > _SEEDS_PER_RUN // 2:
        raise ValueError("training seeds would run into the held-out range or the other stage's seeds")


@functools.cache
def _tokenizer():
    return build_tokenizer()


def batch_loss(model: Qwen2_5_VLForConditionalGeneration, batch: Batch, device: torch.device) -> tuple[torch.Tensor, list[bool]]:
    """Mean cross-entropy over the targets; per example, whether greedy teacher-forced predictions got all of them."""
    kwargs = {k: v.to(device, non_blocking=True) for k, v in batch.model_kwargs.items()}
    labels = batch.labels.to(device)
    hidden = model.model(**kwargs).last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    mask = targets != -100
    logits = model.lm_head(hidden[mask]).float()
    loss = torch.nn.functional.cross_entropy(logits, targets[mask])
    wrong = torch.zeros(len(batch.tasks), device=device).index_add_(
        0, mask.nonzero()[:, 0], (logits.argmax(-1) != targets[mask]).float()
    )
    return loss, (wrong == 0).tolist()


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train(args: argparse.Namespace) -> tuple[Qwen2_5_VLForConditionalGeneration, int]:
    """Optional vision pre-training (--vision-steps), then end to end on the answer tokens (the vision tower
    fixed with --freeze-vision) until --steps or --time-limit. Returns the model and the end-to-end steps taken."""
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    footage.library()  # decoded once here (a missing footage fails before any training); forked workers inherit it
    if args.init:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.init, dtype=torch.float32)
    else:
        model = Qwen2_5_VLForConditionalGeneration._from_config(tiny_config(**MODEL_OVERRIDES))
    set_attention(model, "sdpa")
    model.to(device).train()
    if args.vision_steps:
        pretrain_vision(model, args, device)
    batches = TrainingBatches(args.steps, args.batch, args.frames, args.tasks, args.seed, args.fps)

    def answer_loss(batch: Batch) -> tuple[torch.Tensor, list[tuple[str, bool]]]:
        loss, hits = batch_loss(model, batch, device)
        return loss, list(zip(batch.tasks, hits))

    if args.freeze_vision:
        model.model.visual.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    steps = run_stage("answer", params, batches, answer_loss, args.lr, args, args.time_limit)
    return model.eval(), steps


def pretrain_vision(model: Qwen2_5_VLForConditionalGeneration, args: argparse.Namespace, device: torch.device) -> None:
    """Train the vision tower alone to name the needle of single clips (`NeedleClips`): one linear probe per
    one-needle task reads the maximum over the clip's merged tokens; the probes are dropped afterwards."""
    tasks = tuple(t for t in args.tasks if t in synthetic.RETRIEVAL_CHOICES)
    visual, width = model.model.visual, model.config.vision_config.out_hidden_size
    probes = torch.nn.ModuleDict({t: torch.nn.Linear(width, len(synthetic.RETRIEVAL_CHOICES[t])) for t in tasks})
    probes.to(device)

    def probe_loss(clips: tuple) -> tuple[torch.Tensor, list[tuple[str, bool]]]:
        pixels, grid_thw, clip_tasks, labels = clips
        tokens = merged_vision_tokens(visual, pixels.to(device), grid_thw.to(device))
        pooled = tokens.view(len(clip_tasks), -1, width).amax(1)
        labels, loss, hits = labels.to(device), 0.0, []
        for task in tasks:
            rows = [i for i, t in enumerate(clip_tasks) if t == task]
            logits = probes[task](pooled[rows]).float()
            loss = loss + torch.nn.functional.cross_entropy(logits, labels[rows], reduction="sum")
            hits += [(task, bool(hit)) for hit in logits.argmax(-1) == labels[rows]]
        return loss / len(clip_tasks), hits

    clips = NeedleClips(args.vision_steps, args.vision_batch, tasks, args.seed)
    params = list(visual.parameters()) + list(probes.parameters())
    run_stage("vision", params, clips, probe_loss, args.vision_lr, args, float("inf"))


def run_stage(
    name: str,
    params: list[torch.nn.Parameter],
    batches: torch.utils.data.Dataset,
    loss_fn: Callable[[object], tuple[torch.Tensor, list[tuple[str, bool]]]],
    peak_lr: float,
    args: argparse.Namespace,
    time_limit: float,
) -> int:
    """AdamW with warm-up and cosine decay to 0 from `peak_lr` over `batches` (built by --workers processes), bf16
    autocast on CUDA, gradient norm clipped to 1; `loss_fn(batch) -> (loss, [(task, correct)])` feeds a moving
    per-task accuracy in the log. Stops after `time_limit` seconds. Returns the number of steps taken."""
    device = torch.device(args.device)
    optimizer = torch.optim.AdamW(params, lr=peak_lr, betas=(0.9, 0.98), weight_decay=0.01)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=args.workers,
                                         pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)  # fmt: skip
    steps, start, window = len(batches), time.time(), {}
    for step, batch in enumerate(loader):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, peak_lr, args.warmup)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, hits = loss_fn(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for task, hit in hits:
            window[task] = (window.get(task, []) + [hit])[-200:]
        last = step == steps - 1 or time.time() - start > time_limit
        if step % args.log_every == 0 or last:
            acc = " ".join(f"{t}={np.mean(h):.2f}" for t, h in window.items())
            print(f"{name} step {step} loss {loss.item():.3f} train-acc {acc} {time.time() - start:.0f}s", flush=True)
        if last:
            return step + 1
    return 0


Table = dict[str, dict[str, dict[str, float]]]  # held-out set -> row ("64", "256@0.25fps") -> task -> fraction
EVAL_KEYS = ("held_out_accuracy_dense", "held_out_outside_answer_set")  # training.json's keys of evaluate's tables


def evaluate(
    model_dir: Path,
    frames: tuple[int, ...],
    tasks: tuple[str, ...],
    n: int,
    fps: float = EVAL_FPS,
    sets: tuple[str, ...] = tuple(synthetic.HELD_OUT_SETS),
    workers: int = 0,
) -> tuple[Table, Table]:
    """Dense greedy exact-match accuracy of the saved checkpoint on n held-out samples per (set, frames, task),
    through the engine's path (`apbv.qa.ask`: build_prompt, patchify, generate), the frames read at `fps`, and the
    fraction of answers outside the question's closed set; each (set, frames, task) cell in one of `workers`
    single-threaded processes (0: all in this process). Rows are keyed by the frame count, with "@<fps>fps" added
    when fps is not the standard EVAL_FPS."""
    cells = [(s, f, t) for s in sets for f in frames for t in tasks]
    score = functools.partial(_score_cell, str(model_dir), n=n, fps=fps)
    if workers:
        spawn = multiprocessing.get_context("spawn")  # CUDA may be initialised here; the cells run on CPU
        with ProcessPoolExecutor(workers, mp_context=spawn, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            scores = list(pool.map(score, *zip(*cells)))
    else:
        scores = [score(*cell) for cell in cells]
    accuracy: Table = {s: {} for s in sets}
    outside: Table = {s: {} for s in sets}
    for (held_out_set, num_frames, task), (hits, strays) in zip(cells, scores):
        key = str(num_frames) if fps == EVAL_FPS else f"{num_frames}@{fps:g}fps"
        accuracy[held_out_set].setdefault(key, {})[task] = hits
        outside[held_out_set].setdefault(key, {})[task] = strays
        print(f"held-out {held_out_set} at {key} frames, {task}: accuracy {hits:.2f}, outside the answer set "
              f"{strays:.2f}", flush=True)  # fmt: skip
    return accuracy, outside


@functools.cache
def _loaded(model_dir: str) -> LoadedModel:
    return load_model(model_dir, torch.device("cpu"))


def _score_cell(model_dir: str, held_out_set: str, num_frames: int, task: str, n: int, fps: float) -> tuple[float, float]:
    """(accuracy, fraction outside the closed set) of the checkpoint on one cell's n held-out samples."""
    loaded, right, strays = _loaded(model_dir), 0, 0
    for i in range(n):
        sample = held_out(i, num_frames, task, held_out_set)
        text = ask(loaded, as_video(sample, fps), sample.question, AttentionConfig("dense")).text
        right, strays = right + (text == sample.answer), strays + (text not in sample.choices)
    return right / n, strays / n


def _range_arg(kind: type, least: float) -> Callable[[str], tuple]:
    """argparse type of an inclusive range "LO-HI" (or one value) of `kind`, with least <= LO <= HI."""

    def parse(text: str) -> tuple:
        lo, _, hi = text.partition("-")
        lo, hi = kind(lo), kind(hi or lo)
        if not least <= lo <= hi:
            raise argparse.ArgumentTypeError(f"expected LO-HI with {least} <= LO <= HI, got {text!r}")
        return lo, hi

    return parse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the embedded Qwen2.5-VL model on needle-in-a-video QA.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--init", type=Path, default=None, help="continue from this checkpoint's weights")
    parser.add_argument("--steps", type=int, default=700, help="optimizer steps end to end")
    parser.add_argument("--vision-steps", type=int, default=0, help="vision pre-training steps first (0: none)")
    parser.add_argument("--vision-batch", type=int, default=64, help="clips per vision pre-training step")
    parser.add_argument("--vision-lr", type=float, default=1e-3, help="peak learning rate of vision pre-training")
    parser.add_argument("--freeze-vision", action="store_true", help="keep the vision tower fixed end to end")
    parser.add_argument("--batch", type=int, default=8, help="samples per optimizer step (one padded batch)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--frames", type=_range_arg(int, 2), default=(8, 128), help="final frame-count range LO-HI")
    parser.add_argument("--fps", type=_range_arg(float, 1e-3), default=SAMPLE_FPS,
                        help="range of the sampled frame rate LO-HI, drawn log-uniformly per sample")
    parser.add_argument("--tasks", nargs="+", default=synthetic.TASKS, choices=synthetic.TASKS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of the training process")
    parser.add_argument("--workers", type=int, default=0,
                        help="processes building batches, then evaluating (0: in the trainer)")
    parser.add_argument("--time-limit", type=float, default=float("inf"), help="stop after this many seconds")
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--eval-n", type=int, default=40, help="held-out samples per task and frame count")
    parser.add_argument("--eval-frames", type=int, nargs="+", default=(16, 64, 256))
    parser.add_argument("--eval-fps", type=float, default=EVAL_FPS, help="frame rate the held-out videos are read at")
    parser.add_argument("--eval-sets", nargs="+", default=tuple(synthetic.HELD_OUT_SETS),
                        choices=synthetic.HELD_OUT_SETS, help="held-out sets: needles over held-out footage, or grey")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="evaluate the checkpoint at --out and add the accuracy to its training.json")
    args = parser.parse_args(argv)
    args.tasks = tuple(args.tasks)
    if args.vision_steps and not set(args.tasks) & set(synthetic.RETRIEVAL_CHOICES):
        parser.error(f"--vision-steps needs a one-needle task among --tasks ({', '.join(synthetic.RETRIEVAL_CHOICES)})")
    torch.set_num_threads(args.threads)
    evaluation = functools.partial(evaluate, args.out, tuple(args.eval_frames), args.tasks, args.eval_n,
                                   args.eval_fps, tuple(args.eval_sets), args.workers)  # fmt: skip
    if args.evaluate_only:
        record_file = args.out / "training.json"
        record = json.loads(record_file.read_text()) if record_file.exists() else {}
        same_n = record.get("held_out_samples_per_task") == args.eval_n  # rows of another sample count are dropped
        for key, table in zip(EVAL_KEYS, evaluation()):
            kept = record.get(key, {}) if same_n else {}
            record[key] = {s: {**kept.get(s, {}), **table.get(s, {})} for s in synthetic.HELD_OUT_SETS
                           if s in kept or s in table}  # fmt: skip
        record["held_out_samples_per_task"] = args.eval_n
        record_file.write_text(json.dumps(record, indent=2) + "\n")
        return
    start = time.time()
    model, steps = train(args)
    train_s = time.time() - start
    save_checkpoint(model.float().cpu(), args.out)
    ProcessorSpec().save_video_config(args.out, *VIDEO_PIXELS)
    save_answers(args.out, synthetic.ANSWERS)
    tables = evaluation() if args.eval_n else ({}, {})
    record = {
        **environment(torch.device(args.device)),
        "command": "python -m apbv.train " + shlex.join(sys.argv[1:] if argv is None else argv),
        "train_wall_s": round(train_s, 1),
        "vision_steps": args.vision_steps,
        "steps": steps,
        "samples": steps * args.batch,
        "footage": {**footage.record(), "grey_share": GREY_SHARE},
        **dict(zip(EVAL_KEYS, tables)),
        "held_out_samples_per_task": args.eval_n,
    }
    if args.init and (args.init / "training.json").exists():  # the lineage: how the starting weights were made
        record["init"] = json.loads((args.init / "training.json").read_text())
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
