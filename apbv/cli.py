"""Command line: `python -m apbv ask VIDEO "QUESTION" [options]`.

Spawns the rank processes itself through `EnginePool`, or, when started by torchrun (RANK/WORLD_SIZE set), runs as
one of the ranks. Prints the streamed answer, or with --json one JSON object. Bad input: one line on stderr, exit 2;
engine failure: exit 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from apbv.attention.registry import STRATEGY_NAMES, ranks_for
from apbv.engine.api import Event, Request, Result
from apbv.errors import ApbvError, InputError, error_from_code

EXIT_BAD_INPUT = 2
EXIT_ENGINE = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m apbv", description="Question answering over long videos.")
    sub = parser.add_subparsers(dest="command", required=True)
    ask = sub.add_parser("ask", help="ask one question about one video")
    ask.add_argument("video")
    ask.add_argument("question")
    ask.add_argument("--model", default=None, help="hub id or local path (default: the embedded model)")
    ask.add_argument("--strategy", choices=STRATEGY_NAMES, default="apbv")
    ask.add_argument("--world-size", type=int, default=None, help="ranks (default: visible GPUs, else 2 CPU ranks)")
    ask.add_argument("--device", choices=("cpu", "cuda"), default=None)
    frames = ask.add_mutually_exclusive_group()
    frames.add_argument("--frames", type=int, default=None, help="number of frames to sample (default 32)")
    frames.add_argument("--fps", type=float, default=None, help="sample at this rate instead")
    ask.add_argument("--max-pixels", type=int, default=None, help="pixel budget per frame")
    ask.add_argument("--anchor-ratio", type=float, default=None)
    ask.add_argument("--passing-ratio", type=float, default=None)
    ask.add_argument("--max-new-tokens", type=int, default=64)
    ask.add_argument("--temperature", type=float, default=0.0)
    ask.add_argument("--top-p", type=float, default=1.0)
    ask.add_argument("--seed", type=int, default=0)
    ask.add_argument("--allow-fewer-ranks", action="store_true",
                     help="use fewer ranks when the video has too few frames for --world-size")
    ask.add_argument("--json", action="store_true", help="print one JSON object instead of the streamed answer")
    return parser


def request_from_args(args: argparse.Namespace, world_size: int | None) -> Request:
    return Request(
        video_path=args.video,
        question=args.question,
        strategy=args.strategy,
        world_size=ranks_for(args.strategy, world_size),
        num_frames=args.frames if args.frames or args.fps else 32,
        fps=args.fps,
        max_pixels=args.max_pixels,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        anchor_ratio=args.anchor_ratio,
        allow_fewer_ranks=args.allow_fewer_ranks,
        passing_ratio=args.passing_ratio,
    )


class _Printer:
    """Streams token text to stdout (or keeps quiet for --json) and keeps the final result."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.result: Result | None = None
        self.error: dict | None = None

    def __call__(self, event: Event) -> None:
        if event.kind == "token" and not self.as_json:
            sys.stdout.write(event.data["text"])
            sys.stdout.flush()
        elif event.kind == "result":
            self.result = Result.from_dict(event.data)
        elif event.kind == "error":
            self.error = event.data

    def finish(self) -> int:
        if self.error is not None:
            print(f"error: {self.error['message']}", file=sys.stderr)
            return EXIT_BAD_INPUT if isinstance(error_from_code(**self.error), InputError) else EXIT_ENGINE
        if self.as_json:
            print(json.dumps(self.result.to_dict()))
        else:
            print()
        return 0


def ask(args: argparse.Namespace) -> int:
    printer = _Printer(args.json)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun: this process is one rank
        from apbv.engine.worker import OneShotChannel, serve

        serve(args.model, lambda info: OneShotChannel(request_from_args(args, None), printer))
        return printer.finish() if os.environ["RANK"] == "0" else 0
    from apbv.engine.pool import EnginePool

    with EnginePool(model=args.model, world_size=args.world_size, device=args.device) as pool:
        handle = pool.submit(request_from_args(args, args.world_size))
        for event in handle.events():
            printer(event)
    return printer.finish()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return ask(args)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ApbvError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_ENGINE
