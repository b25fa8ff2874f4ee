"""EnginePool: starts one worker process per rank once, queues requests, streams their events, survives failures.

One engine thread owns the connection to rank 0 and serves the queue one request at a time: it sends the job,
forwards events to the request's handle, forwards cancellations, enforces the per-request timeout and watches the
worker processes. A dead worker fails the request in flight (never silently) and every rank is restarted.

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
from apbv.errors import (
    ApbvError,
    Busy,
    Cancelled,
    EngineError,
    OutOfMemory,
    RequestTimeout,
    VideoNotFound,
    WorkerDied,
    error_from_code,
)
from apbv.model.loading import default_model_path

TERMINAL = ("result", "error", "cancelled")
START_TIMEOUT_S = 600.0


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
    ranks); device: "cpu" or "cuda" (None: cuda when available); limits: per-request limits the ranks enforce;
    options: the workers' own (video cache size, shipping videos to the ranks).

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
        limits: Limits = Limits(),
        attach: str | None = None,
        options: WorkerOptions = WorkerOptions(),
    ) -> None:
        self.attach = attach
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        gpus = torch.cuda.device_count() if self.device == "cuda" else 0
        self.world_size = world_size or (gpus or 2)
        if self.device == "cuda" and self.world_size > gpus and attach is None:
            raise ValueError(f"{self.world_size} ranks requested but only {gpus} GPUs are visible")
        self.model = model
        self.request_timeout_s = request_timeout_s
        self.limits = limits
        self.options = options
        self._queue: queue.Queue[RequestHandle] = queue.Queue(maxsize=queue_size)
        self._cancel: set[str] = set()
        self._ids = itertools.count(1)
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
        try:
            self._queue.put_nowait(handle)
        except queue.Full:
            raise Busy(f"the engine is busy ({self._queue.maxsize} requests queued); try again shortly") from None
        return handle

    def cancel(self, request_id: str) -> None:
        """Cancel a queued request, or a running one at its next token."""
        with self._lock:
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
        return {"alive": alive, "state": self.state, "world_size": self.world_size, "device": self.device,
                "model": info.model if info else self.model or "embedded", "queued": self._queue.qsize(),
                "restarts": self.restarts, "pids": [p.pid for p in self._procs],
                "video_pixels": dict(info.video_pixels) if info else {},
                "max_prompt_tokens": self.limits.max_prompt_tokens}

    def _validate(self, request: Request) -> None:
        if self.state == "failed":
            raise EngineError(f"the engine did not start: {self.start_error}")
        request.check(self.world_size, self.limits)
        if not os.path.isfile(request.video_path):
            raise VideoNotFound(f"no such video file: {request.video_path}")

    # ---- workers ---------------------------------------------------------------------------------------------
    def _spawn(self) -> None:
        if self.attach:
            self._handshake(self.attach, bytes.fromhex(os.environ["APBV_AUTHKEY"]))
            self.world_size, self.device = self.info.world_size, self.info.device
            return
        authkey = secrets.token_bytes(16)
        listen = f"127.0.0.1:{free_port()}"
        base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                "WORLD_SIZE": str(self.world_size), "APBV_AUTHKEY": authkey.hex(), "OMP_NUM_THREADS": os.environ.get(
                    "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // self.world_size)))}
        if self.device == "cpu":
            base["CUDA_VISIBLE_DEVICES"] = ""
        model = self.model or str(default_model_path())  # resolved once, before any rank starts
        cmd = [sys.executable, "-m", "apbv.engine.worker", "--listen", listen, "--model", model,
               "--limits", json.dumps(asdict(self.limits)), *self.options.as_args()]
        self._procs = []
        for rank in range(self.world_size):
            env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            with open(self._logs / f"rank{rank}.log", "ab") as log:
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
        for rank, proc in enumerate(self._procs):
            code = proc.poll()
            if code is not None:
                tail = self._log_tail(rank)
                if code == EXIT_OUT_OF_MEMORY:
                    raise OutOfMemory(f"rank {rank} ran out of memory; use fewer frames or a lower resolution")
                raise WorkerDied(f"rank {rank} exited with code {code}" + (f": {tail}" if tail else ""))

    def _log_tail(self, rank: int) -> str:
        try:
            lines = (self._logs / f"rank{rank}.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1][:300] if lines else ""

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
        self.state = "restarting"
        for proc in self._procs:
            proc.kill()
        for proc in self._procs:
            proc.wait()
        if self._conn is not None:
            if self.attach:  # ask the remote ranks to exit, so that torchrun starts them afresh
                self._send(Shutdown())
            self._conn.close()
            self._conn = None
        self.restarts += 1
        self._spawn()
        self.state = "ready"

    # ---- the engine thread -----------------------------------------------------------------------------------
    def _serve(self) -> None:
        if self.state == "starting" and not self._first_start():
            return
        while not self._closing.is_set():
            try:
                handle = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            self._running = handle
            try:
                if handle.request_id in self._cancel:
                    handle._put(Event("cancelled", {}))
                    continue
                self._run(handle)
            except Exception as err:  # noqa: BLE001  (never let the engine thread die: fail the request)
                if not isinstance(err, ApbvError):
                    err = EngineError(f"engine failure: {err!r}")
                handle._put(Event("error", {"code": err.code, "message": str(err)}))
                self._recover()
            finally:
                self._running = None
                with self._lock:
                    self._cancel.discard(handle.request_id)

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
        """Restart every rank after a failure; retries until it works or the pool closes. Requests queued
        meanwhile fail at each failed attempt rather than wait on an engine that is down."""
        while not self._closing.is_set():
            try:
                self._restart()
                return
            except Exception as err:  # noqa: BLE001  (start failures, refused or broken connections)
                self._fail_queued(WorkerDied(f"the engine is restarting after a failure ({err})"))
                time.sleep(1.0)

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
