"""One engine process per rank: join the process group, load the model once, serve requests until shutdown.

Started by `EnginePool` (one subprocess per rank) or by torchrun for several nodes; either way the environment
carries RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Rank 0 listens on `--listen HOST:PORT` for one
pool connection and speaks `apbv.engine.protocol` over it.

Rank 0 prepares each job (bad input is answered there, no other rank involved), then broadcasts the header to all
ranks; ranks of the job's group run it, every rank joins the final metrics gather. An error inside a running job
cannot be recovered without tearing down the group, so the process exits (EXIT_OUT_OF_MEMORY for out-of-memory)
and the pool restarts all ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from dataclasses import replace
from datetime import timedelta
from multiprocessing.connection import Connection, Listener
from typing import Callable, Protocol, Sequence

import torch
import torch.distributed as dist
from transformers import PreTrainedTokenizerBase

from apbv.comm import Comm, backend_for, rank_device
from apbv.config import Limits
from apbv.engine.api import Event, Request, Result
from apbv.engine.job import JobHeader, gather_metrics, prepare_job, run_job
from apbv.engine.protocol import (
    EXIT_OUT_OF_MEMORY,
    Cancel,
    EngineInfo,
    EventMessage,
    Job,
    Ready,
    Shutdown,
    ToEngine,
    WorkerOptions,
)
from apbv.engine.video_cache import VideoCache
from apbv.errors import ApbvError, Cancelled
from apbv.metrics import MetricsRecorder, RankMetrics
from apbv.model.loading import LoadedModel, load_model


class Channel(Protocol):
    """Rank 0's link to whoever submits requests: messages in, events out."""

    cancelled: set[str]

    def recv(self) -> ToEngine: ...

    def send(self, request_id: str, kind: str, data: dict) -> None: ...

    def poll_cancel(self, request_id: str) -> bool: ...


class PoolChannel:
    """The connection to an EnginePool (`apbv.engine.protocol` messages over an authenticated socket)."""

    def __init__(self, conn: Connection, info: EngineInfo) -> None:
        self.conn = conn
        self.cancelled: set[str] = set()
        conn.send(Ready(info))

    def recv(self) -> ToEngine:
        return self.conn.recv()

    def send(self, request_id: str, kind: str, data: dict) -> None:
        self.conn.send(EventMessage(request_id, Event(kind, data)))

    def poll_cancel(self, request_id: str) -> bool:
        while self.conn.poll():
            msg = self.conn.recv()
            if isinstance(msg, Cancel):
                self.cancelled.add(msg.request_id)
            elif isinstance(msg, Shutdown):
                raise SystemExit(0)
        return request_id in self.cancelled


class OneShotChannel:
    """Requests from this process (the CLI under torchrun), served in order, then shutdown: their events go to
    `on_event`."""

    def __init__(self, requests: Sequence[Request], on_event: Callable[[Event], None]) -> None:
        self._messages: list[ToEngine] = [*(Job(f"cli-{i}", r) for i, r in enumerate(requests, 1)), Shutdown()]
        self.on_event = on_event
        self.cancelled: set[str] = set()

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
    limits: Limits = Limits(),
    options: WorkerOptions = WorkerOptions(),
) -> None:
    """Run this rank until shutdown; `make_channel(info)` is called on rank 0 once the model is loaded."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = rank_device()
    dist.init_process_group(backend_for(device), rank=rank, world_size=world_size, timeout=timedelta(days=7))
    groups = _prefix_groups(world_size)
    loaded = load_model(model, device)
    channel = None
    if rank == 0:
        channel = make_channel(EngineInfo(world_size, device.type, loaded.name, loaded.spec.read_video_pixels()))
    cache = VideoCache(options.video_cache_mb << 20)
    while _serve_next(rank, world_size, device, groups, loaded, channel, limits, cache, options):
        pass
    dist.destroy_process_group()


def _serve_next(
    rank: int,
    world_size: int,
    device: torch.device,
    groups: dict[int, dist.ProcessGroup],
    loaded: LoadedModel,
    channel: Channel | None,
    limits: Limits,
    cache: VideoCache,
    options: WorkerOptions,
) -> bool:
    """Serve one job on every rank (rank 0 waits for it and hands it out); False once shutdown is asked."""
    header, metrics = None, None
    if rank == 0:
        header, metrics = _next_job(channel, loaded, limits, world_size, device)
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
        record = _run_rank(header, loaded, comm, channel, metrics, cache, options.ship_videos and rank > 0)
    records = gather_metrics(record, world_size)
    if rank == 0:
        if record.get("cancelled"):
            channel.send(header.request_id, "cancelled", {})
        else:
            channel.send(header.request_id, "result", _result(header, records, loaded).to_dict())
        channel.cancelled.discard(header.request_id)
    return True


def _next_job(
    channel: Channel, loaded: LoadedModel, limits: Limits, world_size: int, device: torch.device
) -> tuple[JobHeader | Shutdown, MetricsRecorder | None]:
    """Rank 0: wait for the next valid job; answers bad requests directly. Returns (header, metrics)."""
    while True:
        msg = channel.recv()
        if isinstance(msg, Shutdown):
            return msg, None
        if isinstance(msg, Cancel):
            channel.cancelled.add(msg.request_id)
            continue
        request_id, request = msg.request_id, msg.request
        if request_id in channel.cancelled:
            channel.send(request_id, "cancelled", {})
            continue
        metrics = MetricsRecorder(0, device, on_span=lambda name: channel.send(request_id, "stage", {"name": name}))
        try:
            w = request.check(world_size, limits)
            header = prepare_job(request_id, request, w, loaded, limits, metrics)
        except ApbvError as err:
            channel.send(request_id, "error", {"code": err.code, "message": str(err)})
            continue
        return header, metrics


def _run_rank(
    header: JobHeader,
    loaded: LoadedModel,
    comm: Comm,
    channel: Channel | None,
    metrics: MetricsRecorder,
    cache: VideoCache,
    ship_videos: bool,
) -> dict:
    """Run this rank's share of a job; rank 0 streams tokens. Returns this rank's metrics record."""
    rid = header.request_id
    stream, should_stop = None, lambda: False
    if comm.rank == 0:
        stream = _TokenStream(loaded.tokenizer, lambda text, tid: channel.send(rid, "token", {"text": text, "token_id": tid}))
        should_stop = lambda: channel.poll_cancel(rid)  # noqa: E731
    cancelled = False
    try:
        tokens = run_job(header, loaded.rank_model, loaded.spec, comm, metrics, should_stop, cache=cache,
                         ship_videos=ship_videos)  # fmt: skip
        for token in tokens:
            if stream is not None:
                stream.push(token)
    except Cancelled:
        cancelled = True
    except torch.cuda.OutOfMemoryError:
        traceback.print_exc()
        os._exit(EXIT_OUT_OF_MEMORY)
    except Exception:  # the group may be wedged: exit so that the pool restarts every rank
        traceback.print_exc()
        if channel is not None:
            channel.send(rid, "error", {"code": "worker_died", "message": f"rank {comm.rank} failed: {sys.exc_info()[1]}"})
        os._exit(1)
    record = metrics.finish().to_dict()
    record["cancelled"] = cancelled
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
    ranks = [RankMetrics.from_dict({k: v for k, v in r.items() if k not in ("cancelled", "token_ids")}) for r in records]
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
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="APB-V engine rank process (started by EnginePool or torchrun)")
    parser.add_argument("--model", default=None, help="hub id or local path; default: the embedded model")
    parser.add_argument("--listen", default="127.0.0.1:29600", help="rank 0: address the pool connects to")
    parser.add_argument("--limits", default="{}", help="per-request limits: JSON of apbv.config.Limits fields")
    parser.add_argument("--video-cache-mb", type=int, default=WorkerOptions.video_cache_mb,
                        help="device memory per rank for encoded videos (0: off)")
    parser.add_argument("--ship-videos", action="store_true",
                        help="ranks > 0 get each video file from rank 0 (nodes without shared storage)")
    args = parser.parse_args(argv)

    def accept_pool(info: EngineInfo) -> PoolChannel:
        host, port = args.listen.rsplit(":", 1)
        with Listener((host, int(port)), authkey=bytes.fromhex(os.environ["APBV_AUTHKEY"])) as listener:
            print(f"rank 0 listening on {args.listen} for the pool", file=sys.stderr, flush=True)
            return PoolChannel(listener.accept(), info)

    serve(args.model, accept_pool, Limits(**json.loads(args.limits)), WorkerOptions(args.video_cache_mb, args.ship_videos))


if __name__ == "__main__":
    main()
