"""Regenerates `recorded_results.json` from real runs of the engine pool, for the figure tests.

    python -m tests.data.record_results [--video PATH] [--device cpu] [--gpus 2]

Runs the same question under every strategy at two frame counts, so the history has two token counts per strategy.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from apbv.engine.api import Request
from apbv.engine.pool import EnginePool
from ui.controls import STRATEGY_CHOICES, with_strategy
from ui.examples import load_examples
from ui.runner import run

OUT = Path(__file__).with_name("recorded_results.json")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--video", default=None, help="default: the first bundled example")
    p.add_argument("--device", default="cpu")
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--frames", type=int, nargs=2, default=(8, 16))
    args = p.parse_args()
    video = args.video or load_examples()[0].video
    results = []
    with EnginePool(world_size=args.gpus, device=args.device) as pool:
        for frames in args.frames:
            base = Request(video_path=video, question="What happens in this video?", num_frames=frames)
            for _, strategy in STRATEGY_CHOICES:
                state = run(pool, with_strategy(base, strategy, args.gpus))
                if not state.ok:
                    raise SystemExit(f"{strategy} failed: {state.error_code}: {state.error_message}")
                results.append(state.result.to_dict())
    source = f"real runs: {pool.health()['model']} on {args.gpus} {args.device} ranks, {Path(video).name}"
    OUT.write_text(json.dumps({"source": source, "results": results}, indent=1) + "\n")
    print(f"wrote {len(results)} results to {OUT}")


if __name__ == "__main__":
    main()
