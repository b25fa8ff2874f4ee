"""EnginePool: starts one worker process per rank once, queues requests, streams their events, survives failures.

One engine thread owns the connection to rank 0 and serves the queue one request at a time: it sends the job,
forwards events to the request's handle, forwards cancellations, enforces the per-request timeout and watches the
worker processes, also while idle. A dead worker fails the request in flight (never silently; OutOfMemory when a
rank exited for lack of memory) and every rank is restarted; queued requests wait through the restart. A rank
found dead while idle is replaced before the next request.

Local ranks meet through a rendezvous file in the pool's private directory and talk over loopback only
(`apbv.comm.init_group`); each exits when the pool's process is gone. They find `apbv` from any working directory.

Cancellation is honoured at token boundaries: a queued request is dropped before it starts; a running one stops
at its next sampled token (the first one comes after prefill, which is never interrupted) and ends 'cancelled'.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from multiprocessing.connection import Client, Connection
from pathlib import Path
from typing import Iterator

import torch

import apbv
from apbv.comm import free_port
from apbv.config import Limits
from apbv.engine.api import Event, Request, Result
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
from apbv.engine.resources import checked_world_size, cores
from apbv.errors import (
    ApbvError,
    Busy,
    Cancelled,
    EngineError,
    OutOfMemory,
    RequestTimeout,
    WorkerDied,
    error_from_code,
)
from apbv.model.loading import default_model_path
from apbv.video import check_video_file

TERMINAL = ("result", "error", "cancelled")
START_TIMEOUT_S = 600.0
IDLE_POLL_S = 0.1  # how often the idle engine thread looks at the queue and the ranks
RESTART_ATTEMPTS = 3  # failed restarts in a row before the engine is marked failed and its queue fails
OOM_WAIT_S = 1.0  # after a rank failed: how long to wait for the ranks' exit codes (one may say out of memory)
PACKAGE_ROOT = Path(apbv.__file__).resolve().parent.parent  # where `import apbv` finds this package


class RequestHandle:
    """A submitted request: iterate its events, or wait for its result."""

    def __init__(self, request_id: str, request: Request) -> None:
        self.request_id = request_id
        self.request = request
        self.submitted = time.monotonic()
        self._events: queue.Queue[Event] = queue.Queue()
        self._first_token_s: float | None = None
        self.done = threading.Event()

    def _put(self, event: Event) -> None:
        if self.done.is_set():
            return
        if event.kind == "token" and self._first_token_s is None:
            self._first_token_s = time.monotonic() - self.submitted
        if event.kind == "result":
            timing = {"wall_s": time.monotonic() - self.submitted, "first_token_s": self._first_token_s}
            event = Event("result", {**event.data, **timing})
        self._events.put(event)
        if event.kind in TERMINAL:
            self.done.set()

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Events in order; ends after exactly one of result / error / cancelled."""
        while True:
            try:
                event = self._events.get(timeout=timeout)
            except queue.Empty:
                raise RequestTimeout(f"no event from the engine within {timeout} s") from None
            yield event
            if event.kind in TERMINAL:
                return

    def result(self, timeout: float | None = None) -> Result:
        """The finished Result; raises the ApbvError the request ended with."""
        for event in self.events(timeout):
            if event.kind == "result":
                return Result.from_dict(event.data)
            if event.kind == "error":
                raise error_from_code(event.data["code"], event.data["message"])
            if event.kind == "cancelled":
                raise Cancelled(f"request {self.request_id} was cancelled")
        raise EngineError("request ended without a result")


class EnginePool:
    """A pool of rank processes serving requests one at a time.

    model: hub id or local path (None: the embedded model); world_size: ranks (None: visible GPUs, else 2 CPU
    ranks; InvalidWorldSize at once when below 1, above the GPUs, or on CPU above the cores or the memory);
    device: "cpu" or "cuda" (None: cuda when available); limits: per-request limits the ranks enforce (None:
    `Limits.for_device`); options: the workers' own (video cache size, shipping videos to the ranks).

    attach: "HOST:PORT" of rank 0 of workers started elsewhere, e.g. by torchrun on several nodes (README); the
    key is APBV_AUTHKEY, world size, device and model are theirs. The pool then starts no process: after a
    failure it asks the workers to shut down and reconnects once torchrun (--max-restarts) has started them
    again; a rank hung inside a collective is beyond its reach. close() shuts the workers down.
    """

    def __init__(
        self,
        model: str | None = None,
        world_size: int | None = None,
        device: str | None = None,
        queue_size: int = 8,
        request_timeout_s: float = 600.0,
        limits: Limits | None = None,
        attach: str | None = None,
        options: WorkerOptions = WorkerOptions(),
    ) -> None:
        self.attach = attach
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model
        self.world_size = world_size if attach else checked_world_size(world_size, self.device, model)
        self.request_timeout_s = request_timeout_s
        self.limits = limits or Limits.for_device(self.device)
        self.options = options
        self._queue: queue.Queue[RequestHandle] = queue.Queue(maxsize=queue_size)
        self._live: dict[str, RequestHandle] = {}  # submitted and not yet ended: what cancel() may name
        self._cancel: set[str] = set()
        self._ids = itertools.count(1)
        self._starts = itertools.count()
        self._lock = threading.Lock()
        self._procs: list[subprocess.Popen] = []
        self._conn: Connection | None = None
        self._logs = Path(tempfile.mkdtemp(prefix="apbv-engine-"))
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self.restarts = 0
        self.info: EngineInfo | None = None
        self.state = "starting"  # starting -> ready <-> restarting; failed: the first start did not succeed
        self.start_error: str | None = None
        self._running: RequestHandle | None = None

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def start(self, wait: bool = True) -> "EnginePool":
        """Start the ranks (or connect to them) and the engine thread; returns self.

        wait=False returns at once: the ranks start in the engine thread (`health()["state"]` says "starting"
        until they are ready), requests submitted meanwhile wait in the queue, and a failed start fails them."""
        if wait:
            try:
                self._spawn()
            except BaseException:
                self._shutdown_workers()
                raise
            self.state = "ready"
        self._thread = threading.Thread(target=self._serve, name="apbv-engine", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Fail what is queued or running with "engine closed", stop the engine thread and the ranks."""
        self._closing.set()
        if self._thread is not None:
            self._thread.join(timeout=30)  # every wait of the engine thread checks _closing within 0.1 s
        self._shutdown_workers()
        self._fail_queued(EngineError("engine closed"))
        shutil.rmtree(self._logs, ignore_errors=True)

    def _fail_queued(self, error: ApbvError) -> None:
        while True:
            try:
                handle = self._queue.get_nowait()
            except queue.Empty:
                return
            handle._put(Event("error", {"code": error.code, "message": str(error)}))
            self._forget(handle.request_id)

    def _forget(self, request_id: str) -> None:
        """A request has ended: cancel() no longer names it."""
        with self._lock:
            self._live.pop(request_id, None)
            self._cancel.discard(request_id)

    def __enter__(self) -> "EnginePool":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- client API ------------------------------------------------------------------------------------------
    def submit(self, request: Request) -> RequestHandle:
        """Queue a request; raises Busy at once when the queue is full, InputError for requests bad on their face."""
        self._validate(request)
        handle = RequestHandle(f"req-{next(self._ids)}", request)
        running = self._running
        ahead = self._queue.qsize() + (self.state != "ready" or (running is not None and not running.done.is_set()))
        handle._put(Event("queued", {"position": ahead}))  # first, before the engine sees it
        with self._lock:
            self._live[handle.request_id] = handle
        try:
            self._queue.put_nowait(handle)
        except queue.Full:
            with self._lock:
                del self._live[handle.request_id]
            raise Busy(f"the engine is busy ({self._queue.maxsize} requests queued); try again shortly") from None
        return handle

    def cancel(self, request_id: str) -> None:
        """Cancel a queued request, or a running one at its next token; an id that is neither is ignored."""
        with self._lock:
            if request_id in self._live:
                self._cancel.add(request_id)

    def health(self) -> dict:
        """Liveness, state ("starting", "ready", "restarting" or "failed"), size, queue length, restarts, worker pids
        (empty when attached), and what the page needs to estimate a request: the model's per-frame pixel bounds for
        `read_video` and the prompt-token limit."""
        if self.attach:
            alive = self._conn is not None and not self._conn.closed
        else:
            alive = bool(self._procs) and all(p.poll() is None for p in self._procs)
        info = self.info
        model = info.model if info else self.model or ("embedded" if not self.attach else f"attached at {self.attach}")
        return {"alive": alive, "state": self.state, "world_size": self.world_size, "device": self.device,
                "model": model, "queued": self._queue.qsize(),
                "restarts": self.restarts, "pids": [p.pid for p in self._procs],
                "video_pixels": dict(info.video_pixels) if info else {},
                "max_prompt_tokens": self.limits.max_prompt_tokens}

    def _validate(self, request: Request) -> None:
        if self.state == "failed":
            raise EngineError(f"the engine did not start: {self.start_error}")
        request.check(self.world_size, self.limits)
        check_video_file(request.video_path)

    # ---- workers ---------------------------------------------------------------------------------------------
    def _spawn(self) -> None:
        if self.attach:
            self._handshake(self.attach, bytes.fromhex(os.environ["APBV_AUTHKEY"]))
            self.world_size, self.device = self.info.world_size, self.info.device
            return
        authkey = secrets.token_bytes(16)
        listen = f"127.0.0.1:{free_port()}"
        path = os.pathsep.join([str(PACKAGE_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
        base = {**os.environ, "WORLD_SIZE": str(self.world_size), "APBV_AUTHKEY": authkey.hex(), "PYTHONPATH": path,
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, cores() // self.world_size)))}
        if self.device == "cpu":
            base["CUDA_VISIBLE_DEVICES"] = ""
        model = self.model or str(default_model_path())  # resolved once, before any rank starts
        rendezvous = self._logs / f"rendezvous-{next(self._starts)}"  # a new file for every start
        cmd = [sys.executable, "-m", "apbv.engine.parent_watch", str(os.getpid()), "apbv.engine.worker",
               "--listen", listen, "--model", model, "--limits", json.dumps(asdict(self.limits)),
               "--rendezvous-file", str(rendezvous), *self.options.as_args()]  # fmt: skip
        self._procs = []
        for rank in range(self.world_size):
            env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            with open(self._logs / f"rank{rank}.log", "wb") as log:  # this start's ranks only
                self._procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        self._handshake(listen, authkey)

    def _handshake(self, listen: str, authkey: bytes) -> None:
        self._conn = self._connect(listen, authkey)
        message = self._conn.recv()
        if not isinstance(message, Ready):
            raise EngineError(f"rank 0 at {listen} answered {message!r} instead of Ready")
        self.info = message.info

    def _connect(self, listen: str, authkey: bytes) -> Connection:
        host, port = listen.rsplit(":", 1)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            self._check_alive()
            if self._closing.is_set():
                raise EngineError("engine closed")
            try:
                return Client((host, int(port)), authkey=authkey)
            except (ConnectionRefusedError, FileNotFoundError):
                if time.monotonic() > deadline:
                    raise EngineError(f"engine did not start within {START_TIMEOUT_S:.0f} s") from None
                time.sleep(0.1)

    def _check_alive(self) -> None:
        """Raise OutOfMemory when a rank exited for lack of memory, else WorkerDied when any rank exited."""
        codes = [proc.poll() for proc in self._procs]
        if EXIT_OUT_OF_MEMORY in codes:
            rank = codes.index(EXIT_OUT_OF_MEMORY)
            raise OutOfMemory(f"rank {rank} ran out of memory; use fewer frames or a lower resolution")
        for rank, code in enumerate(codes):
            if code is not None:
                error = self._log_error(rank)
                raise WorkerDied(f"rank {rank} exited with code {code}" + (f": {error}" if error else ""))

    def _diagnose(self, error: WorkerDied) -> ApbvError:
        """What a request that lost a rank ends with: OutOfMemory when a rank exited for lack of memory (rank 0's
        collective fails, and reports, before that rank's exit code is seen), else `error`."""
        deadline = time.monotonic() + OOM_WAIT_S
        while self._procs:
            try:
                self._check_alive()
            except OutOfMemory as oom:
                return oom
            except WorkerDied:
                pass
            if all(proc.poll() is not None for proc in self._procs) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        return error

    def _log_error(self, rank: int) -> str:
        """The exception a rank's log ends with (the last line of its last traceback); "" when it has none."""
        try:
            lines = (self._logs / f"rank{rank}.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
        raised = [line for line in lines[starts[-1] + 1 :] if line.strip() and not line[0].isspace()] if starts else []
        return raised[0][:300] if raised else ""

    def _ranks_alive(self) -> bool:
        """Whether every rank is still there: the local processes, or the connection to attached ones (anything
        rank 0 says while idle is stale and dropped)."""
        if not self.attach:
            return all(proc.poll() is None for proc in self._procs)
        try:
            while self._conn.poll():
                self._conn.recv()
        except (OSError, EOFError, AttributeError):  # AttributeError: no connection at all
            return False
        return True

    def _shutdown_workers(self) -> None:
        if self._conn is not None:
            try:
                self._conn.send(Shutdown())
            except (OSError, EOFError):
                pass
            self._conn.close()
            self._conn = None
        for proc in self._procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs = []

    def _restart(self) -> None:
        """Replace every rank: kill the local ones, ask attached ones to exit (torchrun starts them afresh; a send
        that fails leaves no connection behind), start again."""
        self.state = "restarting"
        for proc in self._procs:
            proc.kill()
        self._shutdown_workers()
        self.restarts += 1
        self._spawn()
        self.state = "ready"

    # ---- the engine thread -----------------------------------------------------------------------------------
    def _serve(self) -> None:
        if self.state == "starting" and not self._first_start():
            return
        while not self._closing.is_set():
            try:
                handle = self._queue.get(timeout=IDLE_POLL_S)
            except queue.Empty:
                if self.state == "ready" and not self._ranks_alive():  # replace a dead rank before the next request
                    self._recover()
                continue
            self._running = handle
            try:
                if handle.request_id in self._cancel:
                    handle._put(Event("cancelled", {}))
                    continue
                if not self._ranks_alive():  # lost since the last look: replace it first
                    self._recover()
                if self.state == "failed":
                    raise WorkerDied(f"the engine {self.start_error}")
                self._run(handle)
            except Exception as err:  # noqa: BLE001  (never let the engine thread die: fail the request)
                if not isinstance(err, ApbvError):
                    err = EngineError(f"engine failure: {err!r}")
                elif isinstance(err, WorkerDied):
                    err = self._diagnose(err)
                handle._put(Event("error", {"code": err.code, "message": str(err)}))
                self._recover()
            finally:
                self._running = None
                self._forget(handle.request_id)

    def _first_start(self) -> bool:
        """The engine thread's start of the ranks (start(wait=False)); on failure every request, queued now or
        submitted later, fails with the reason. Returns whether the ranks are ready."""
        try:
            self._spawn()
        except Exception as err:  # noqa: BLE001  (a model that does not load, a worker that dies at start)
            self._shutdown_workers()
            self.start_error = str(err)
            self.state = "failed"
            self._fail_queued(err if isinstance(err, ApbvError) else EngineError(f"the engine did not start: {err}"))
            return False
        self.state = "ready"
        return True

    def _recover(self) -> None:
        """Restart every rank after a failure; queued requests wait through it (a rank lost during the restart
        costs another attempt, not the queue). After RESTART_ATTEMPTS failed attempts in a row the engine is
        marked failed (for good) and every queued request fails with the reason."""
        if self.state == "failed":
            return
        for _ in range(RESTART_ATTEMPTS):
            if self._closing.is_set():
                return
            try:
                self._restart()
                return
            except Exception as err:  # noqa: BLE001  (start failures, refused or broken connections)
                reason = str(err)
                time.sleep(1.0)
        self.start_error = f"the ranks could not be restarted ({reason})"
        self.state = "failed"
        self._fail_queued(WorkerDied(f"the engine {self.start_error}"))

    def _send(self, message: ToEngine) -> None:
        try:
            self._conn.send(message)
        except (OSError, EOFError, AttributeError):  # AttributeError: no connection at all
            raise WorkerDied("lost the connection to rank 0") from None

    def _run(self, handle: RequestHandle) -> None:
        """Serve one request to its end; raises ApbvError when the workers failed (the caller restarts them)."""
        rid = handle.request_id
        self._send(Job(rid, handle.request))
        deadline = time.monotonic() + self.request_timeout_s
        cancel_sent = False
        while True:
            if self._closing.is_set():
                raise EngineError("engine closed")
            with self._lock:
                wants_cancel = rid in self._cancel
            if wants_cancel and not cancel_sent:
                self._send(Cancel(rid))
                cancel_sent = True
            if time.monotonic() > deadline:
                raise RequestTimeout(f"request took longer than {self.request_timeout_s:.0f} s; the ranks are restarted")
            try:
                has_msg = self._conn.poll(0.05)
            except (OSError, EOFError):
                has_msg = False
            if not has_msg:
                self._check_alive()
                continue
            try:
                message: EventMessage = self._conn.recv()
            except (OSError, EOFError):
                self._check_alive()
                time.sleep(0.2)
                self._check_alive()
                raise WorkerDied("lost the connection to rank 0") from None
            if message.request_id != rid:
                continue
            event = message.event
            if event.kind == "error" and event.data.get("code") == WorkerDied.code:
                raise WorkerDied(event.data["message"])
            handle._put(event)
            if event.kind in TERMINAL:
                return

