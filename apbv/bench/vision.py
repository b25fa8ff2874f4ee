"""Vision tower throughput: TFLOP/s of the encoder on a real architecture (random bf16 weights), as loaded by
transformers, with the MLP widths padded, and padded + compiled blocks.

    python -m apbv.bench.vision --arch qwen2.5-vl-3b --resolution 1440p --frames 8 [--repeats 5] [--out FILE]

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` on one run (matrix products, attention included).
Timing: warm-ups (compilation for the compiled variant, timed apart), then the median of --repeats, synchronised.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from apbv.inputs import ProcessorSpec, patchify
from apbv.model.qwen2_5_vl import merged_vision_tokens
from apbv.model.vision_attention import set_attention
from apbv.model.vision_tuning import compile_blocks, pad_mlp_widths
from apbv.run_record import environment, write_json
from apbv.video import synthetic_video

from .architectures import ARCHITECTURES, model_dtype, random_model


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=ARCHITECTURES, default="qwen2.5-vl-3b")
    p.add_argument("--resolution", default="1440p")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    model = random_model(args.arch, device, model_dtype(device))
    set_attention(model, "sdpa")
    visual = model.model.visual
    pixels, grid = patchify(synthetic_video(args.resolution, args.frames).frames, ProcessorSpec())
    pixels, grid = pixels.to(device, model.dtype), grid.to(device)

    def run() -> torch.Tensor:
        with torch.inference_mode():
            return merged_vision_tokens(visual, pixels, grid)

    with FlopCounterMode(display=False) as counter:
        run()
    flops = counter.get_total_flops()
    rows = []
    for variant, prepare in (("as loaded", None), ("padded MLP", pad_mlp_widths), ("padded + compiled", compile_blocks)):
        if prepare is not None:
            prepare(visual)
        start = time.perf_counter()
        run()
        _sync(device)
        first_s = time.perf_counter() - start
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            run()
            _sync(device)
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        rows.append({"variant": variant, "seconds": seconds, "tflop_per_s": flops / seconds / 1e12,
                     "first_run_s": first_s, "patches": int(pixels.shape[0]), "tflop": flops / 1e12})  # fmt: skip
        print(f"vision {args.arch} {args.resolution} x{args.frames} ({pixels.shape[0]} patches, {flops / 1e12:.1f} "
              f"TFLOP) {variant}: {seconds * 1e3:.1f} ms = {flops / seconds / 1e12:.0f} TFLOP/s "
              f"(first run {first_s:.1f} s)", flush=True)
    if args.out:
        write_json(args.out, vars(args) | environment(device), rows)
    return rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main(sys.argv[1:])
