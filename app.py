"""APB-V Video QA: start the engine pool and serve the page.

    python app.py [--model M] [--gpus N] [--device cpu|cuda] [--host 127.0.0.1] [--port 7860]
    python app.py --attach HOST:PORT     # workers started by torchrun (README: several nodes)
"""

from __future__ import annotations

import argparse
import os

# Gradio and the Hugging Face hub look up internet hosts at import/launch unless told not to.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from apbv.engine.pool import EnginePool  # noqa: E402  (after the environment above)
from ui.examples import load_examples  # noqa: E402
from ui.page import CSS, build_page  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="checkpoint path or hub id (default: the embedded tiny model)")
    p.add_argument("--gpus", type=int, default=None, help="ranks (default: all visible GPUs, or 2 CPU ranks)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--queue-size", type=int, default=8, help="requests waiting at most (page and engine)")
    p.add_argument("--max-upload-mb", type=int, default=500)
    p.add_argument("--attach", default=None, metavar="HOST:PORT",
                   help="serve with workers started elsewhere (torchrun); their rank 0's --listen address")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    pool = EnginePool(model=args.model, world_size=args.gpus, device=args.device, queue_size=args.queue_size,
                      attach=args.attach)
    with pool:
        demo = build_page(pool, load_examples(), queue_size=args.queue_size, max_upload_mb=args.max_upload_mb)
        demo.launch(
            server_name=args.host,
            server_port=args.port,
            share=False,
            ssr_mode=False,
            max_file_size=f"{args.max_upload_mb}mb",
            css=CSS,
            footer_links=[],
        )


if __name__ == "__main__":
    main()
