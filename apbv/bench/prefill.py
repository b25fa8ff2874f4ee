"""Prefill to first token on one device: our dense path vs transformers' own forward, same model, same input.

    python -m apbv.bench.prefill --arch qwen2.5-vl-3b --resolutions 360p 720p --frames 64 [--json out.json]

Both paths run the same randomly initialised bf16 model on the same synthetic frames: vision encoder + language
model prefill + logits of the last token. transformers' forward uses SDPA (PyTorch picks its fastest kernel; the
vision tower loops over its windows); ours routes text attention through `apbv.attention.kernels.attend`
(cuDNN/flash with lse) and the vision tower through packed attention (`apbv.model.vision_attention`).
Timing: warm-ups, then the median of --repeats runs, each synchronised. Also reports the relative difference
of the two paths' last-token logits (bf16: a few 1e-3 is expected).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from typing import Callable

import torch

from apbv.attention import get_strategy
from apbv.attention.config import AttentionConfig
from apbv.comm import Comm
from apbv.inputs import ProcessorSpec, prepare_inputs
from apbv.metrics import NullRecorder
from apbv.model.cache import ShardedKVCache
from apbv.model.qwen2_5_vl import QwenVLRank, use_sequence_parallel_attention
from apbv.model.tiny import build_tokenizer
from apbv.run_record import environment, write_json
from apbv.video import synthetic_video

from .architectures import add_run_arguments, model_dtype, random_model


def timed(fn: Callable[[], torch.Tensor], device: torch.device, warmup: int, repeats: int) -> tuple[float, torch.Tensor]:
    """Median seconds of `fn` (synchronised) and its last output."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolutions", nargs="+", default=["360p", "720p"])
    add_run_arguments(p)
    p.add_argument("--json", dest="json_path")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    dtype = model_dtype(device)
    model = random_model(args.arch, device, dtype)
    tokenizer, spec = build_tokenizer(), ProcessorSpec()
    rank_model = QwenVLRank(model)
    dense = get_strategy(AttentionConfig("dense"))
    comm = Comm.single(device)
    rows = []
    for resolution, frames in itertools.product(args.resolutions, args.frames):
        video = synthetic_video(resolution, frames)
        inputs = prepare_inputs(tokenizer, video, "What is in this video?", spec)
        kwargs = {k: v.to(device) for k, v in inputs.model_kwargs().items()}
        kwargs["pixel_values_videos"] = kwargs["pixel_values_videos"].to(dtype)

        def transformers_forward() -> torch.Tensor:
            model.set_attn_implementation({"text_config": "sdpa", "vision_config": "sdpa"})
            with torch.inference_mode():
                return model(**kwargs, logits_to_keep=1).logits[0, -1].float()

        def ours() -> torch.Tensor:
            use_sequence_parallel_attention(model)
            quiet = NullRecorder()
            positions = rank_model.global_positions(inputs)
            embeds = rank_model.encode_video(kwargs["pixel_values_videos"], inputs.video_grid_thw,
                                             [inputs.visual_tokens], comm, quiet)
            plan = dense.plan(inputs.n_context, inputs.n_query, 1)
            cache = ShardedKVCache(rank_model.num_layers, reserve=0)
            hidden = rank_model.prefill(inputs, embeds, positions, dense, plan, comm, quiet, cache)
            return rank_model.logits(hidden)

        t_hf, ref = timed(transformers_forward, device, args.warmup, args.repeats)
        t_ours, got = timed(ours, device, args.warmup, args.repeats)
        row = {
            "arch": args.arch, "resolution": resolution, "frames": frames,
            "tokens": int(inputs.input_ids.numel()), "visual_tokens": inputs.visual_tokens,
            "transformers_s": t_hf, "ours_dense_s": t_ours, "ours_over_transformers": t_ours / t_hf,
            "logits_rel_diff": float((got - ref).norm() / ref.norm()),
        }
        rows.append(row)
        print(f"{args.arch} {resolution} x{frames}: {row['tokens']} tokens  transformers {t_hf * 1e3:.1f} ms  "
              f"ours(dense) {t_ours * 1e3:.1f} ms  ratio {row['ours_over_transformers']:.3f}  "
              f"logits rel diff {row['logits_rel_diff']:.2e}", flush=True)
    if args.json_path:
        write_json(args.json_path, vars(args) | environment(device), rows)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
