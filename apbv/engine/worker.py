"""One engine process per rank: join the process group, load the model once, serve requests until shutdown.

Started by `EnginePool` (one subprocess per rank) or by torchrun for several nodes; either way the environment
carries RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Rank 0 listens on `--listen HOST:PORT` for one
pool connection and speaks `apbv.engine.protocol` over it.

Rank 0 admits and prepares each job (bad input is answered there, no other rank involved: any exception while
preparing ends that request with an error and the rank serves on), then broadcasts the header to all ranks; ranks
of the job's group run it, every rank joins the final metrics gather. An error inside a running job cannot be
recovered without tearing down the group, so the process exits (EXIT_OUT_OF_MEMORY for out-of-memory) and the
pool restarts all ranks. A rank whose pool is gone exits too (EXIT_POOL_LOST): rank 0 when its connection closes,
every rank of a local pool when its parent process dies (`apbv.engine.parent_watch`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, Listener
from typing import Callable, Protocol, Sequence

import torch
import torch.distributed as dist
from transformers import PreTrainedTokenizerBase

from apbv.comm import Comm, init_group, rank_device
from apbv.config import Limits
from apbv.engine.admission import admit
from apbv.engine.api import Event, Request, Result
from apbv.engine.context_cache import ContextCache
from apbv.engine.cost_model import Calibration
from apbv.engine.faults import install_faults
from apbv.engine.job import JobHeader, gather_metrics, prepare_job, run_job
from apbv.engine.parent_watch import EXIT_POOL_LOST
from apbv.engine.protocol import (
    EXIT_OUT_OF_MEMORY,
    VIDEO_DECODERS,
    Cancel,
    EngineInfo,
    EventMessage,
    Job,
    Ready,
    Shutdown,
    ToEngine,
    WorkerOptions,
)
from apbv.engine.resources import cache_budgets, free_memory
from apbv.engine.video_cache import VideoCache
from apbv.engine.video_pipeline import VideoReading
from apbv.errors import ApbvError, Cancelled, EngineError, InputError, WorkerDied
from apbv.metrics import MetricsRecorder, RankMetrics
from apbv.model.loading import LoadedModel, load_model


@dataclass
class RankCaches:
    """What a rank keeps between requests: encoded videos and conversations' K/V."""

    videos: VideoCache
    contexts: ContextCache


class Channel(Protocol):
    """Rank 0's link to whoever submits requests: messages in, events out. A cancel counts only for the request
    running when it comes (the pool cancels queued requests itself; a late one, for a request that has already
    ended, is dropped)."""

    def recv(self) -> ToEngine: ...

    def send(self, request_id: str, kind: str, data: dict) -> None: ...

    def poll_cancel(self, request_id: str) -> bool: ...


class PoolChannel:
    """The connection to an EnginePool (`apbv.engine.protocol` messages over an authenticated socket)."""

    def __init__(self, conn: Connection, info: EngineInfo) -> None:
        self.conn = conn
        self.lost = False  # the pool closed the connection without asking for a shutdown
        conn.send(Ready(info))

    def recv(self) -> ToEngine:
        """The next message; a closed connection reads as Shutdown (with `lost` set)."""
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            self.lost = True
            return Shutdown()

    def send(self, request_id: str, kind: str, data: dict) -> None:
        self.conn.send(EventMessage(request_id, Event(kind, data)))

    def poll_cancel(self, request_id: str) -> bool:
        cancelled = False
        while self.conn.poll():
            msg = self.recv()
            if isinstance(msg, Shutdown):
                raise SystemExit(EXIT_POOL_LOST if self.lost else 0)
            cancelled |= isinstance(msg, Cancel) and msg.request_id == request_id
        return cancelled


class OneShotChannel:
    """Requests from this process (the CLI under torchrun), served in order, then shutdown: their events go to
    `on_event`."""

    def __init__(self, requests: Sequence[Request], on_event: Callable[[Event], None]) -> None:
        self._messages: list[ToEngine] = [*(Job(f"cli-{i}", r) for i, r in enumerate(requests, 1)), Shutdown()]
        self.on_event = on_event

    def recv(self) -> ToEngine:
        return self._messages.pop(0)

    def send(self, request_id: str, kind: str, data: dict) -> None:
        self.on_event(Event(kind, data))

    def poll_cancel(self, request_id: str) -> bool:
        return False


def _prefix_groups(world_size: int) -> dict[int, dist.ProcessGroup]:
    """Process groups of ranks [0, w) for every w >= 2 (every rank must create all of them, in the same order)."""
    groups: dict[int, dist.ProcessGroup] = {}
    for w in range(2, world_size + 1):
        groups[w] = dist.group.WORLD if w == world_size else dist.new_group(list(range(w)))
    return groups


def serve(
    model: str | None,
    make_channel: Callable[[EngineInfo], Channel],
    limits: Limits | None = None,
    rendezvous_file: str | None = None,
    options: WorkerOptions = WorkerOptions(),
) -> Channel | None:
    """Run this rank until shutdown; `make_channel(info)` is called on rank 0 once the model is loaded. limits:
    None for the device's defaults (`Limits.for_device`); rendezvous_file: see `apbv.comm.init_group`; options:
    the caches and whether ranks > 0 read video paths. Returns rank 0's channel (None on the other ranks)."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = rank_device()
    limits = limits or Limits.for_device(device.type)
    init_group(device, rendezvous_file)
    groups = _prefix_groups(world_size)
    loaded = load_model(model, device)
    install_faults(loaded, rank)
    caches = _rank_caches(options, device, rank, world_size)
    channel = None
    if rank == 0:
        channel = make_channel(EngineInfo(world_size, device.type, loaded.name, loaded.spec.read_video_pixels()))
    calibration = Calibration.find(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    while _serve_next(rank, world_size, device, groups, loaded, channel, limits, caches, options, calibration):
        pass
    dist.destroy_process_group()
    return channel


def _rank_caches(options: WorkerOptions, device: torch.device, rank: int, world_size: int) -> RankCaches:
    """This rank's caches, as large as asked within `cache_budgets` of its free memory. Every rank takes the
    smallest budgets of any, so that the ranks of a group keep and evict the same conversations."""
    asked = (options.video_cache_mb << 20, options.context_cache_mb << 20)
    budgets = torch.tensor(cache_budgets(asked, free_memory(device)), dtype=torch.int64, device=device)
    if world_size > 1:
        dist.all_reduce(budgets, op=dist.ReduceOp.MIN)
    video_bytes, context_bytes = budgets.tolist()
    if rank == 0 and (video_bytes, context_bytes) != asked:
        print(f"caches capped at {video_bytes >> 20} + {context_bytes >> 20} MiB (videos + conversations) to leave "
              f"memory for requests", file=sys.stderr, flush=True)  # fmt: skip
    return RankCaches(VideoCache(video_bytes), ContextCache(context_bytes))


def _serve_next(
    rank: int,
    world_size: int,
    device: torch.device,
    groups: dict[int, dist.ProcessGroup],
    loaded: LoadedModel,
    channel: Channel | None,
    limits: Limits,
    caches: RankCaches,
    options: WorkerOptions,
    calibration: Calibration | None,
) -> bool:
    """Serve one job on every rank (rank 0 waits for it and hands it out); False once shutdown is asked."""
    header, metrics = None, None
    if rank == 0:
        header, metrics = _next_job(channel, loaded, limits, world_size, device, calibration)
        if isinstance(header, JobHeader):
            header = replace(header, started_s=metrics.elapsed())
    box = [header]
    dist.broadcast_object_list(box, src=0)
    header = box[0]
    if isinstance(header, Shutdown):
        return False
    record = None
    if rank != 0:
        metrics = MetricsRecorder(rank, device, start_s=header.started_s)  # on rank 0's timeline
    if rank < header.world_size:
        comm = Comm(groups[header.world_size], device) if header.world_size > 1 else Comm.single(device)
        reading = VideoReading(options.ship_videos and rank > 0, options.video_decoder)
        record = _run_rank(header, loaded, comm, channel, metrics, caches, reading)
    records = gather_metrics(record, world_size)
    if rank == 0 and not record["failed"]:  # a failed request has had its error event
        if record["cancelled"]:
            channel.send(header.request_id, "cancelled", {})
        else:
            channel.send(header.request_id, "result", _result(header, records, loaded).to_dict())
    return True


def _next_job(
    channel: Channel,
    loaded: LoadedModel,
    limits: Limits,
    world_size: int,
    device: torch.device,
    calibration: Calibration | None,
) -> tuple[JobHeader | Shutdown, MetricsRecorder | None]:
    """Rank 0: wait for the next valid job; answers bad requests directly (any exception while preparing one ends
    that request: an ApbvError with its own code, anything else as an engine error). Returns (header, metrics)."""
    while True:
        msg = channel.recv()
        if isinstance(msg, Shutdown):
            return msg, None
        if isinstance(msg, Cancel):  # late: its request has already ended
            continue
        request_id, request = msg.request_id, msg.request
        metrics = MetricsRecorder(0, device, on_span=lambda name: channel.send(request_id, "stage", {"name": name}))
        try:
            w = request.check(world_size, limits)
            admit(request, loaded.tokenizer, limits)
            header = prepare_job(request_id, request, w, loaded, limits, metrics, calibration)
        except ApbvError as err:
            channel.send(request_id, "error", {"code": err.code, "message": str(err)})
            continue
        except Exception as err:  # noqa: BLE001  (nothing has reached the other ranks: fail the request, serve on)
            traceback.print_exc()
            message = f"could not prepare the request ({type(err).__name__}: {str(err)[:200]})"
            channel.send(request_id, "error", {"code": EngineError.code, "message": message})
            continue
        return header, metrics


def _run_rank(
    header: JobHeader,
    loaded: LoadedModel,
    comm: Comm,
    channel: Channel | None,
    metrics: MetricsRecorder,
    caches: RankCaches,
    reading: VideoReading,
) -> dict:
    """Run this rank's share of a job; rank 0 streams tokens. Returns this rank's metrics record."""
    rid = header.request_id
    stream, should_stop = None, lambda: False
    if comm.rank == 0:
        stream = _TokenStream(loaded.tokenizer, lambda text, tid: channel.send(rid, "token", {"text": text, "token_id": tid}))
        should_stop = lambda: channel.poll_cancel(rid)  # noqa: E731
    cancelled = failed = False
    try:
        tokens = run_job(header, loaded.rank_model, loaded.spec, comm, metrics, should_stop, cache=caches.videos,
                         contexts=caches.contexts, reading=reading)  # fmt: skip
        for token in tokens:
            if stream is not None:
                stream.push(token)
    except Cancelled:
        cancelled = True
    except InputError as err:  # raised on every rank of the job at the same step (a video no rank could read)
        if channel is not None:
            channel.send(rid, "error", {"code": err.code, "message": str(err)})
        failed = True
    except torch.cuda.OutOfMemoryError:
        traceback.print_exc()
        os._exit(EXIT_OUT_OF_MEMORY)
    except Exception as err:  # the group may be wedged: exit so that the pool restarts every rank
        traceback.print_exc()
        if channel is not None:
            try:
                channel.send(rid, "error", {"code": WorkerDied.code, "message": f"rank {comm.rank} failed: {err}"})
            except OSError:  # the pool is gone as well
                pass
        os._exit(1)
    record = metrics.finish().to_dict()
    record["cancelled"] = cancelled
    record["failed"] = failed
    record["token_ids"] = stream.ids if stream is not None else []
    return record


class _TokenStream:
    """Incremental detokenisation: emits the new text of each token, holding back an incomplete multi-token
    character. Should decoding ever rewrite earlier text, the stream goes on from the common prefix (the final
    Result carries the exact answer)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, emit: Callable[[str, int], None]) -> None:
        self.tokenizer, self.emit = tokenizer, emit
        self.ids: list[int] = []
        self.text = ""

    def push(self, token_id: int) -> None:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        common = len(os.path.commonprefix([text, self.text]))
        self.emit(text[common:], token_id)
        self.text = text


def _result(header: JobHeader, records: list[dict], loaded: LoadedModel) -> Result:
    ids = records[0]["token_ids"]
    outcome = ("cancelled", "failed", "token_ids")
    ranks = [RankMetrics.from_dict({k: v for k, v in r.items() if k not in outcome}) for r in records]
    return Result(
        request_id=header.request_id,
        answer=loaded.tokenizer.decode(ids, skip_special_tokens=True),
        token_ids=ids,
        strategy=header.attention.strategy,
        world_size=header.world_size,
        visual_tokens=header.prompt.visual_tokens,
        n_context=header.prompt.n_context,
        n_query=header.prompt.n_query,
        wall_s=0.0,  # filled in by the pool, which sees the client's clock
        ranks=ranks,
        choice=header.choice.to_dict() if header.choice else None,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="APB-V engine rank process (started by EnginePool or torchrun)")
    parser.add_argument("--model", default=None, help="hub id or local path; default: the embedded model")
    parser.add_argument("--listen", default="127.0.0.1:29600", help="rank 0: address the pool connects to")
    parser.add_argument("--limits", default=None, help="per-request limits: JSON of apbv.config.Limits fields "
                        "(default: Limits.for_device)")
    parser.add_argument("--rendezvous-file", default=None,
                        help="ranks of one host meet through this file, opening no port (default: torchrun's env://)")
    parser.add_argument("--video-cache-mb", type=int, default=WorkerOptions.video_cache_mb,
                        help="device memory per rank for encoded videos (0: off)")
    parser.add_argument("--context-cache-mb", type=int, default=WorkerOptions.context_cache_mb,
                        help="device memory per rank for conversations' K/V, continued by follow-ups (0: off)")
    parser.add_argument("--ship-videos", action="store_true",
                        help="ranks > 0 get each video file from rank 0 (nodes without shared storage)")
    parser.add_argument("--video-decoder", choices=VIDEO_DECODERS, default=WorkerOptions.video_decoder,
                        help="cpu: FFmpeg (the frames qwen-vl-utils reads); nvdec: the GPU's decoder where it can "
                        "(needs PyNvVideoCodec; pixels can differ from FFmpeg's by a level or two)")
    args = parser.parse_args(argv)

    def accept_pool(info: EngineInfo) -> PoolChannel:
        host, port = args.listen.rsplit(":", 1)
        with Listener((host, int(port)), authkey=bytes.fromhex(os.environ["APBV_AUTHKEY"])) as listener:
            print(f"rank 0 listening on {args.listen} for the pool", file=sys.stderr, flush=True)
            return PoolChannel(listener.accept(), info)

    limits = Limits(**json.loads(args.limits)) if args.limits else None
    options = WorkerOptions(args.video_cache_mb, args.ship_videos, args.context_cache_mb, args.video_decoder)
    channel = serve(args.model, accept_pool, limits, args.rendezvous_file, options)
    if channel is not None and channel.lost:
        sys.exit(EXIT_POOL_LOST)


if __name__ == "__main__":
    main()
