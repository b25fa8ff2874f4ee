"""APB-V Video QA: start the engine pool and serve the page at once (a banner shows while the engine warms up).

    python app.py [--model M] [--gpus N] [--device cpu|cuda] [--host 127.0.0.1] [--port 7860]
    python app.py --attach HOST:PORT     # workers started by torchrun (README: several nodes)

Defaults can also come from the environment, as on a Hugging Face Space: APBV_MODEL (checkpoint), APBV_GPUS
(ranks), GRADIO_SERVER_NAME and GRADIO_SERVER_PORT (where to listen; loopback unless told otherwise).
"""

from __future__ import annotations

import argparse
import os
import signal

# Gradio and the Hugging Face hub look up internet hosts at import/launch unless told not to.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from apbv.engine.pool import EnginePool  # noqa: E402  (after the environment above)
from apbv.engine.protocol import VIDEO_DECODERS, WorkerOptions  # noqa: E402
from ui.examples import load_examples  # noqa: E402
from ui.page import CSS, build_page  # noqa: E402


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=os.environ.get("APBV_MODEL") or None,
                   help="checkpoint path or hub id (default: $APBV_MODEL, else the embedded tiny model)")
    p.add_argument("--gpus", type=int, default=_env_int("APBV_GPUS"),
                   help="ranks (default: $APBV_GPUS, else all visible GPUs, or 2 CPU ranks)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    p.add_argument("--port", type=int, default=_env_int("GRADIO_SERVER_PORT") or 7860)
    p.add_argument("--queue-size", type=int, default=8, help="requests waiting at most (page and engine)")
    p.add_argument("--video-decoder", choices=VIDEO_DECODERS, default=WorkerOptions.video_decoder,
                   help="nvdec: decode on the GPUs' video engines (needs PyNvVideoCodec; pixels can differ from "
                   "FFmpeg's, which qwen-vl-utils reads, by a level or two)")
    p.add_argument("--max-upload-mb", type=int, default=500)
    p.add_argument("--delete-uploads-after", type=int, default=3600, metavar="SECONDS",
                   help="delete uploaded videos this long after their upload (0: keep them until the server stops)")
    p.add_argument("--attach", default=None, metavar="HOST:PORT",
                   help="serve with workers started elsewhere (torchrun); their rank 0's --listen address")
    args = p.parse_args(argv)
    if args.gpus is not None and args.gpus < 1:
        p.error(f"--gpus must be at least 1, got {args.gpus}")
    return args


def _exit(signum: int, frame: object) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        pool = EnginePool(model=args.model, world_size=args.gpus, device=args.device, queue_size=args.queue_size,
                          attach=args.attach, options=WorkerOptions(video_decoder=args.video_decoder))  # fmt: skip
    except ValueError as e:  # more ranks than devices
        raise SystemExit(f"error: {e}") from None
    signal.signal(signal.SIGTERM, _exit)  # a terminated server still stops its ranks (the finally below)
    pool.start(wait=False)  # the page is served at once; requests wait until the ranks are ready
    try:
        demo = build_page(pool, load_examples(), queue_size=args.queue_size, max_upload_mb=args.max_upload_mb,
                          delete_uploads_after_s=args.delete_uploads_after or None)  # fmt: skip
        demo.launch(
            server_name=args.host,
            server_port=args.port,
            share=False,
            ssr_mode=False,
            max_file_size=f"{args.max_upload_mb}mb",
            css=CSS,
            footer_links=[],
        )
    finally:
        pool.close()


if __name__ == "__main__":
    main()
