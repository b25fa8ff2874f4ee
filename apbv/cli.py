"""Command line: `python -m apbv ask VIDEO "QUESTION" [more questions] [--questions FILE] [options]`.

Checks the video, the questions and the sampling before any rank starts, then spawns the rank processes once
through `EnginePool` and answers every question on them, or, when started by torchrun (RANK/WORLD_SIZE set), runs
as one of the ranks. Prints the streamed answers (several questions: "Q: ..." then "A: ..."), or with --json one
JSON object per question and line: the result, its `summary` and the question. Errors: one line "error: ..." on
stderr, or with --json {"error": {"code", "message"}} on stdout; exit 2 for bad input, 1 for an engine failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from apbv.attention.registry import ranks_for
from apbv.config import Limits
from apbv.engine.api import REQUEST_STRATEGIES, Event, Request, Result
from apbv.engine.protocol import VIDEO_DECODERS, WorkerOptions
from apbv.errors import ApbvError, InputError, TooFewFrames, error_from_code
from apbv.video import DEFAULT_FPS, FRAME_FACTOR, probe_video, sample_frame_count

EXIT_BAD_INPUT = 2
EXIT_ENGINE = 1
REUSE_CONTEXT = {"auto": None, "yes": True, "no": False}  # --reuse-context -> Request.reuse_context


class _Parser(argparse.ArgumentParser):
    """Usage errors are bad input like any other (so that --json reports them as JSON)."""

    def error(self, message: str) -> None:
        raise InputError(f"{message} (see python -m apbv ask --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m apbv", description="Question answering over long videos.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    ask = sub.add_parser("ask", help="ask one or more questions about one video")
    ask.add_argument("video")
    ask.add_argument("questions", nargs="*", metavar="QUESTION", help="one or more questions")
    ask.add_argument("--questions", dest="questions_file", default=None, metavar="FILE",
                     help="a text file of questions, one per line (blank lines skipped)")
    ask.add_argument("--model", default=None, help="hub id or local path (default: the embedded model)")
    ask.add_argument("--strategy", choices=REQUEST_STRATEGIES, default=Request.strategy,
                     help="auto (default): the strategy and ranks predicted fastest for the prompt")
    ask.add_argument("--world-size", type=int, default=None, help="ranks (default: visible GPUs, else 2 CPU ranks)")
    ask.add_argument("--device", choices=("cpu", "cuda"), default=None)
    ask.add_argument("--video-decoder", choices=VIDEO_DECODERS, default=WorkerOptions.video_decoder,
                     help="nvdec: decode on the GPU's video engines (needs PyNvVideoCodec; pixels can differ from "
                     "FFmpeg's by a level or two)")
    frames = ask.add_mutually_exclusive_group()
    frames.add_argument("--frames", type=int, default=None, help="number of frames to sample")
    frames.add_argument("--fps", type=float, default=None,
                        help=f"frames per second to sample (neither: the engine's default, {DEFAULT_FPS:g} per second)")
    ask.add_argument("--max-pixels", type=int, default=None,
                     help="pixel budget per frame (lowers qwen-vl-utils' per-frame cap; see --uncapped-pixels)")
    ask.add_argument("--uncapped-pixels", action="store_true",
                     help="honour --max-pixels above qwen-vl-utils' per-frame cap and the model processor's bounds")
    ask.add_argument("--anchor-ratio", type=float, default=None)
    ask.add_argument("--passing-ratio", type=float, default=None)
    ask.add_argument("--max-new-tokens", type=int, default=Request.max_new_tokens)
    ask.add_argument("--temperature", type=float, default=Request.temperature,
                     help="0: greedy (default: the model's generation config, like --top-p, --top-k and "
                          "--repetition-penalty)")  # fmt: skip
    ask.add_argument("--top-p", type=float, default=Request.top_p)
    ask.add_argument("--top-k", type=int, default=Request.top_k)
    ask.add_argument("--repetition-penalty", type=float, default=Request.repetition_penalty)
    ask.add_argument("--seed", type=int, default=Request.seed)
    ask.add_argument("--allow-fewer-ranks", action="store_true",
                     help="use fewer ranks when the video has too few frames for --world-size")
    ask.add_argument("--reuse-context", choices=sorted(REUSE_CONTEXT), default="auto",
                     help="questions after the first continue the K/V kept of the video's earlier ones, prefilling "
                          "only their own text (auto: for the exact strategies; yes: for APB-V too)")  # fmt: skip
    ask.add_argument("--json", action="store_true", help="print one JSON object per question instead of the answers")
    return parser


def questions_from_args(args: argparse.Namespace) -> list[str]:
    """The questions given after the video, then those of --questions FILE; InputError when there are none."""
    questions = list(args.questions)
    if args.questions_file is not None:
        try:
            lines = Path(args.questions_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"cannot read the questions file {args.questions_file}: {e}") from None
        questions += [line.strip() for line in lines if line.strip()]
    if not questions:
        raise InputError("no question: give one or more after the video, or --questions FILE")
    return questions


def request_from_args(args: argparse.Namespace, question: str, world_size: int | None) -> Request:
    sampling = {} if args.frames is None and args.fps is None else {"num_frames": args.frames, "fps": args.fps}
    return Request(
        video_path=args.video,
        question=question,
        strategy=args.strategy,
        world_size=ranks_for(args.strategy, world_size),
        max_pixels=args.max_pixels,
        uncapped_pixels=args.uncapped_pixels,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        anchor_ratio=args.anchor_ratio,
        passing_ratio=args.passing_ratio,
        allow_fewer_ranks=args.allow_fewer_ranks,
        reuse_context=REUSE_CONTEXT[args.reuse_context],
        **sampling,
    )


def check_requests(requests: Sequence[Request], world_size: int, limits: Limits) -> None:
    """Everything that can be checked before a rank starts: each request on its face (`Request.check`), the video
    file (`probe_video`), and enough sampled frames for the ranks. Raises InputError subclasses."""
    info = probe_video(requests[0].video_path)
    for request in requests:
        ranks = request.check(world_size, limits)
        fps = None if request.num_frames else request.fps
        frames = sample_frame_count(info.frame_count, info.fps, num_frames=request.num_frames, fps=fps,
                                    max_frames=limits.max_frames)  # fmt: skip
        if frames // FRAME_FACTOR < ranks and not request.allow_fewer_ranks:
            raise TooFewFrames(
                f"{ranks} ranks need at least {FRAME_FACTOR * ranks} frames ({ranks} temporal patches); the video "
                f"gives {frames} (sample more frames, use fewer ranks, or --allow-fewer-ranks)"
            )


class _Printer:
    """Streams each answer to stdout (or one JSON line per question with --json) and keeps the exit code.

    clock: time each request from its first event (without a pool, under torchrun, nobody else does): its time to
    the first token and to the end, as the result's first_token_s and wall_s."""

    def __init__(self, questions: Sequence[str], as_json: bool, clock: bool = False) -> None:
        self.questions, self.as_json, self.clock = questions, as_json, clock
        self.done = 0  # questions answered or failed so far
        self.exit_code = 0
        self._started: float | None = None  # when the current question's first event came
        self._first_token_s: float | None = None

    def __call__(self, event: Event) -> None:
        question = self.questions[self.done]
        if self._started is None:
            self._started = time.monotonic()
            if len(self.questions) > 1 and not self.as_json:
                print(f"Q: {question}\nA: ", end="", flush=True)
        if event.kind == "token":
            self._first_token_s = self._first_token_s or time.monotonic() - self._started
            if not self.as_json:
                sys.stdout.write(event.data["text"])
                sys.stdout.flush()
        elif event.kind == "result":
            result = Result.from_dict(event.data)
            if self.clock:
                result = replace(result, wall_s=time.monotonic() - self._started, first_token_s=self._first_token_s)
            if self.as_json:
                print(json.dumps({"question": question, **result.to_dict(), "summary": result.summary()}), flush=True)
            else:
                print(flush=True)
            self._next()
        elif event.kind in ("error", "cancelled"):
            cancelled = {"code": "cancelled", "message": "the request was cancelled"}
            data = event.data if event.kind == "error" else cancelled
            if not self.as_json and len(self.questions) > 1:
                print(flush=True)
            self.error(error_from_code(data["code"], data["message"]), question)

    def _next(self) -> None:
        self.done += 1
        self._started = self._first_token_s = None

    def error(self, err: ApbvError, question: str | None = None) -> None:
        """Report an error, of the current question when one is given (the next one follows), and keep the exit
        code (bad input outranks an engine failure)."""
        code = EXIT_BAD_INPUT if isinstance(err, InputError) else EXIT_ENGINE
        self.exit_code = max(self.exit_code, code)
        if self.as_json:
            data = {"error": {"code": err.code, "message": str(err)}}
            print(json.dumps({"question": question, **data} if question is not None else data), flush=True)
        else:
            print(f"error: {err}", file=sys.stderr, flush=True)
        if question is not None:
            self._next()


def ask(args: argparse.Namespace, printer: _Printer) -> None:
    questions = printer.questions
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun: this process is one rank
        requests = [request_from_args(args, q, None) for q in questions]
        check_requests(requests, int(os.environ["WORLD_SIZE"]), Limits())
        from apbv.engine.worker import OneShotChannel, serve

        printer.clock = True
        if os.environ["RANK"] != "0":
            printer = lambda event: None  # noqa: E731  (rank 0 alone reports)
        serve(args.model, lambda info: OneShotChannel(requests, printer))
        return
    if args.world_size is not None and args.world_size < 1:
        raise InputError(f"--world-size must be at least 1, got {args.world_size}")
    requests = [request_from_args(args, q, args.world_size) for q in questions]
    check_requests(requests, args.world_size or 1, Limits())  # before the engine's modules load (seconds)
    from apbv.engine.pool import EnginePool

    try:
        pool = EnginePool(model=args.model, world_size=args.world_size, device=args.device,
                          options=WorkerOptions(video_decoder=args.video_decoder))
    except ValueError as e:  # more ranks than devices
        raise InputError(str(e)) from None
    try:
        check_requests(requests, pool.world_size, pool.limits)  # on the engine's own ranks and limits
        pool.start()
        for request in requests:
            try:
                handle = pool.submit(request)
            except ApbvError as err:  # busy, or an engine that did not start
                printer.error(err, request.question)
                continue
            for event in handle.events():
                printer(event)
    finally:
        pool.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    printer = _Printer([], as_json="--json" in argv)
    try:
        args = build_parser().parse_args(argv)
        printer.questions = questions_from_args(args)
        ask(args, printer)
    except ApbvError as err:
        if os.environ.get("RANK", "0") == "0":
            printer.error(err)
        return EXIT_BAD_INPUT if isinstance(err, InputError) else EXIT_ENGINE
    return printer.exit_code
