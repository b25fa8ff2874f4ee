"""Time to first token from the file: the whole request, per stage, on real H.264 files this benchmark writes.

    python -m apbv.bench.e2e --arch qwen2.5-vl-3b --videos 1440p:40:10 1440p:40:2 720p:600:10 --frames 64 \
        --world-size 8 [--strategies dense,apbv] [--max-pixels 3686400 --uncapped] [--transformers] \
        [--warmup 1] [--repeats 3] [--out PREFIX]

A video is RESOLUTION:SECONDS:KEYFRAME_INTERVAL_S (24 fps, H.264, written once into --workdir). Each run is what
the engine does for a request: rank 0 probes the file and plans the frames and the prompt (`prepare_job`), then
every rank decodes its own frames, resizes and patchifies them on its device, encodes them (overlapped), gathers
the embeddings, prefills and samples the first token (`run_job`). Reported per strategy: time to first token =
rank 0's plan + the slowest rank's run, and each rank's stages (waiting for frames, preprocessing, vision, prefill),
the decoder thread's own time, and a follow-up question on the same video served from the video cache. Dense runs
on one GPU; the other strategies on W ranks: real processes under torchrun (measured), else each rank's decoding
and compute in turn on one GPU (projected: sequential ranks, no communication).

Per video also: one plain threaded decode of the whole file (the floor of reading it), and with --transformers the
official pipeline on the same model and file (qwen-vl-utils' `process_vision_info`, transformers' processor,
`generate` with SDPA) at the same sampling, to the first token.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import torch
from transformers import GenerationConfig

from apbv.attention.registry import ranks_for, strategy_label
from apbv.comm import Comm
from apbv.config import Limits
from apbv.engine.api import Request
from apbv.engine.job import JobHeader, prepare_job, run_job
from apbv.engine.protocol import VIDEO_DECODERS
from apbv.engine.video_cache import VideoCache
from apbv.engine.video_pipeline import VideoReading
from apbv.inputs import ProcessorSpec
from apbv.metrics import ATTENTION, COMM_WAIT, OTHER_LAYERS, PREPROCESS, READ, VISION, MetricsRecorder
from apbv.model.loading import LoadedModel
from apbv.model.qwen2_5_vl import QwenVLRank
from apbv.model.tiny import build_tokenizer
from apbv.run_record import environment, write_json
from apbv.video import RESOLUTIONS

from .architectures import add_run_arguments, model_dtype, random_model
from .processes import bench_device, bench_world, reporting_rank

QUESTION = "What is in this video?"
FPS = 24
STAGES = (READ, PREPROCESS, VISION, ATTENTION, COMM_WAIT, OTHER_LAYERS)


def write_test_video(path: Path, resolution: str, seconds: float, keyframe_s: float) -> Path:
    """A `seconds`-long H.264 file of moving smooth texture, shapes and a frame counter, at a realistic bit rate
    (0.2 bits per pixel per frame), a keyframe every `keyframe_s` seconds. Written once; kept for reruns."""
    if path.exists():
        return path
    height, width = RESOLUTIONS[resolution]
    rng = np.random.default_rng(0)
    coarse = torch.from_numpy(rng.integers(0, 256, (1, 3, 9, 16)).astype(np.float32))
    texture = torch.nn.functional.interpolate(coarse, size=(2 * height, 2 * width), mode="bicubic")[0]
    texture = texture.clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    partial = path.with_suffix(".partial.mp4")
    with av.open(str(partial), "w") as container:
        options = {"g": str(int(keyframe_s * FPS)), "preset": "superfast", "threads": "0"}
        stream = container.add_stream("libx264", rate=FPS, options=options)
        stream.height, stream.width, stream.pix_fmt = height, width, "yuv420p"
        stream.bit_rate = int(0.2 * height * width * FPS)
        for i in range(int(seconds * FPS)):
            y, x = (i * 7) % height, (i * 11) % width
            frame = np.ascontiguousarray(texture[y : y + height, x : x + width])
            frame[(i * 13) % (height - 64) :][:64, (i * 17) % (width - 64) :][:, :64] = (255, 40, 40)
            frame[: height // 20, : width // 10] = (i * 5) % 256
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    partial.rename(path)
    return path


def plain_decode_s(path: Path) -> float:
    """Seconds for one threaded decode of every frame (no conversion): the floor of reading the file."""
    start = time.perf_counter()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for _ in container.decode(stream):
            pass
    return time.perf_counter() - start


def run_strategy(name: str, request: Request, loaded: LoadedModel, args) -> dict:
    """Cold runs (no video cache) of `request` under strategy `name`, then a follow-up served from the cache."""
    rank_model, spec = loaded.rank_model, loaded.spec
    device = rank_model.device
    world_size = ranks_for(name, args.world_size)
    request = replace(request, strategy=name, world_size=world_size)
    world = bench_world(world_size, device)
    caches = [VideoCache(args.video_cache_mb << 20) for _ in range(world_size)]
    reading = VideoReading(decoder=args.video_decoder)

    def plan() -> tuple[JobHeader, float]:
        recorder = MetricsRecorder(0, device)
        start = time.perf_counter()
        header = prepare_job("e2e", request, world_size, loaded, Limits(), recorder)
        return header, time.perf_counter() - start

    def request_on(cached: bool):
        def rank_fn(rank: int, comm: Comm) -> dict:
            metrics = MetricsRecorder(rank, device)
            cache = caches[rank] if cached else None
            list(run_job(header, rank_model, spec, comm, metrics, lambda: False, cache=cache, reading=reading))
            return metrics.finish().to_dict()

        return rank_fn

    header, _ = plan()
    plans, busy, records = [], [], None
    runs = args.warmup + args.repeats
    with world:
        for i in range(runs):
            header, plan_s = plan()
            records = world.run(request_on(cached=i == runs - 1))  # the last cold run fills the caches
            if i >= args.warmup:
                plans.append(plan_s)
                busy.append(list(world.busy))
        header, plan_s = plan()
        cached_records = world.run(request_on(cached=True))
        cached_busy = list(world.busy)
    per_rank = [statistics.median(b[r] for b in busy) for r in range(world_size)]
    return {
        "strategy": name, "world_size": world_size, "timing": world.timing, "video_decoder": args.video_decoder,
        "nvdec_ranks": sum(int(r["counters"].get("nvdec", 0)) for r in records),
        "visual_tokens": header.prompt.visual_tokens, "tokens": header.prompt.n_context + header.prompt.n_query,
        "plan_s": statistics.median(plans), "per_rank_s": per_rank,
        "ttft_s": statistics.median(plans) + max(per_rank),
        "cached_ttft_s": plan_s + max(cached_busy),
        "cached_hit": all(r["counters"].get("video_cache_hit") for r in cached_records),
        "stages_s": [{k: r["totals"].get(k, 0.0) for k in STAGES} for r in records],
        "read_busy_s": [r["counters"].get("read_busy_s", 0.0) for r in records],
        "cached_stages_s": [{k: r["totals"].get(k, 0.0) for k in STAGES} for r in cached_records],
        "ranks": records,
    }  # fmt: skip


def transformers_pipeline_s(path: Path, request: Request, model, tokenizer, device: torch.device, args) -> dict:
    """The official pipeline to the first token: qwen-vl-utils reads the video, transformers' processor builds the
    inputs, `generate` (SDPA) prefills and samples one token. Median seconds per stage."""
    from qwen_vl_utils import process_vision_info
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(), video_processor=Qwen2VLVideoProcessor(),
                                    tokenizer=tokenizer, chat_template=tokenizer.chat_template)  # fmt: skip
    video = {"type": "video", "video": str(path), "nframes": request.num_frames}
    if request.max_pixels:
        video["max_pixels"] = request.max_pixels
    messages = [{"role": "user", "content": [video, {"type": "text", "text": request.question}]}]
    model.set_attn_implementation({"text_config": "sdpa", "vision_config": "sdpa"})
    times = []
    for _ in range(args.warmup + args.repeats):
        _sync(device)
        t0 = time.perf_counter()
        _, videos, video_kwargs = process_vision_info(messages, return_video_kwargs=True, return_video_metadata=True)
        t1 = time.perf_counter()
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        frames, metadata = videos[0]  # transformers 5 takes the sampled rate from the video's metadata
        inputs = processor(text=[text], videos=[frames], video_metadata=[metadata], return_tensors="pt",
                           **video_kwargs).to(device)  # fmt: skip
        inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(model.dtype)
        _sync(device)
        t2 = time.perf_counter()
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
        _sync(device)
        t3 = time.perf_counter()
        times.append({"read_s": t1 - t0, "processor_s": t2 - t1, "prefill_s": t3 - t2, "ttft_s": t3 - t0})
    timed = times[args.warmup :]
    return {k: statistics.median(t[k] for t in timed) for k in timed[0]} | {"tokens": int(inputs["input_ids"].numel())}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", nargs="+", default=["1440p:40:10"], help="RESOLUTION:SECONDS:KEYFRAME_INTERVAL_S")
    p.add_argument("--world-size", type=int, default=8)
    p.add_argument("--strategies", default="dense,apbv")
    p.add_argument("--max-pixels", type=int, default=None, help="per-frame pixel budget (default qwen-vl-utils')")
    p.add_argument("--uncapped", action="store_true", help="let --max-pixels exceed qwen-vl-utils' per-frame cap")
    p.add_argument("--transformers", action="store_true", help="also time the official pipeline (needs qwen-vl-utils)")
    p.add_argument("--video-cache-mb", type=int, default=4096)
    p.add_argument("--video-decoder", choices=VIDEO_DECODERS, default="cpu",
                   help="nvdec: the GPU's decoder (PyNvVideoCodec) where it can")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/apbv-e2e"))
    p.add_argument("--out", type=Path, help="PREFIX: PREFIX.json and PREFIX.md")
    add_run_arguments(p, warmup=1, repeats=3)
    args = p.parse_args(argv)
    with bench_device(args.device) as device:
        return run(args, device)


def run(args: argparse.Namespace, device: torch.device) -> list[dict]:
    model = random_model(args.arch, device, model_dtype(device))
    tokenizer, spec = build_tokenizer(), ProcessorSpec()
    report = reporting_rank()
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for video in args.videos:
        resolution, seconds, keyframe_s = video.split(":")
        path = args.workdir / f"{resolution}-{seconds}s-gop{keyframe_s}s.mp4"
        if report:
            write_test_video(path, resolution, float(seconds), float(keyframe_s))
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        point = {"video": video, "file_mb": path.stat().st_size / 1e6, "plain_decode_s": plain_decode_s(path)}
        for frames in args.frames:
            request = Request(str(path), QUESTION, num_frames=frames, max_pixels=args.max_pixels,
                              uncapped_pixels=args.uncapped, max_new_tokens=1)  # fmt: skip
            for name in [s for s in args.strategies.split(",") if s]:
                # a fresh rank view routes attention through the strategies again (the official pipeline reset it)
                loaded = LoadedModel(f"random {args.arch}", QwenVLRank(model), tokenizer, spec, (), GenerationConfig())
                row = point | {"frames": frames} | run_strategy(name, request, loaded, args)
                rows.append(row)
                if report:
                    print(_line(row), flush=True)
            if args.transformers and report:
                row = point | {"frames": frames, "strategy": "transformers", "world_size": 1, "timing": "measured"}
                row |= transformers_pipeline_s(path, request, model, tokenizer, device, args)
                rows.append(row)
                print(_line(row), flush=True)
    if args.out and report:
        meta = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()} | environment(device)
        write_json(args.out.with_name(args.out.name + ".json"), meta, rows)
        args.out.with_name(args.out.name + ".md").write_text(to_markdown(meta, rows))
    return rows


def _line(row: dict) -> str:
    head = f"{row['video']} x{row['frames']} {strategy_label(row['strategy'])} W={row['world_size']}:"
    if row["strategy"] == "transformers":
        return (f"{head} ttft {row['ttft_s']:.3f}s (read {row['read_s']:.3f} processor {row['processor_s']:.3f} "
                f"prefill {row['prefill_s']:.3f}); {row['tokens']} tokens")  # fmt: skip
    slowest = max(range(row["world_size"]), key=lambda r: row["per_rank_s"][r])
    stages = " ".join(f"{k} {v:.3f}" for k, v in row["stages_s"][slowest].items())
    return (f"{head} ttft {row['ttft_s']:.3f}s (plan {row['plan_s']:.3f}, slowest rank {slowest}: {stages}; decoder "
            f"busy {row['read_busy_s'][slowest]:.3f}); cached follow-up {row['cached_ttft_s']:.3f}s; "
            f"{row['visual_tokens']} visual tokens; decoded on {_decoded_on(row)}; plain decode of the file "
            f"{row['plain_decode_s']:.3f}s; {row['timing']}")  # fmt: skip


def _decoded_on(row: dict) -> str:
    """Where the ranks decoded: "CPU", "NVDEC" or "NVDEC on k of W ranks"."""
    if not row["nvdec_ranks"]:
        return "CPU"
    if row["nvdec_ranks"] == row["world_size"]:
        return "NVDEC"
    return f"NVDEC on {row['nvdec_ranks']} of {row['world_size']} ranks"


def to_markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# Time to first token from the file: {meta['arch']}, W = {meta['world_size']}", "",
             f"`{meta['command']}`  ", f"{meta['date']}; {meta['device_name']}; torch {meta['torch']}, "
             f"transformers {meta['transformers']}.", "",
             "Seconds. TTFT = plan on rank 0 + the slowest rank; that rank's stages: waiting for decoded frames, "
             "preprocessing, vision encoder, attention, communication wait (projected rows: the other ranks' turns, "
             "not part of the latency), other layers.", "",
             "| video | frames | tokens | strategy | W | TTFT | plan | wait for frames | preprocess | vision "
             "| attention | comm wait | other layers | cached follow-up | decoder | timing |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if r["strategy"] == "transformers":
            lines.append(f"| {r['video']} | {r['frames']} | {r['tokens']:,} | transformers (qwen-vl-utils + "
                         f"processor + generate) | 1 | {r['ttft_s']:.3f} | | read {r['read_s']:.3f} | processor "
                         f"{r['processor_s']:.3f} | | prefill {r['prefill_s']:.3f} | | | | decord "
                         "| measured |")  # fmt: skip
            continue
        s = r["stages_s"][max(range(r["world_size"]), key=lambda i: r["per_rank_s"][i])]
        stages = " | ".join(f"{s[k]:.3f}" for k in STAGES)
        lines.append(f"| {r['video']} | {r['frames']} | {r['tokens']:,} | {strategy_label(r['strategy'])} "
                     f"| {r['world_size']} | {r['ttft_s']:.3f} | {r['plan_s']:.3f} | {stages} "
                     f"| {r['cached_ttft_s']:.3f} | {_decoded_on(r)} | {r['timing']} |")  # fmt: skip
    videos = dict.fromkeys((r["video"], r["plain_decode_s"], r["file_mb"]) for r in rows)
    lines += ["", "Plain threaded decode of every frame of each file (the floor of reading it):", ""]
    lines += [f"- {v}: {s:.3f} s ({mb:.1f} MB)" for v, s, mb in videos]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main(sys.argv[1:])
