"""The fault suite (issue 15): real rank processes (the seeded random tiny model, CPU, 2 gloo ranks) killed with
SIGKILL while idle, mid-prefill and mid-decode, twice in a row and during a restart, stopped with SIGSTOP, out of
memory on each rank, orphaned by their pool's owner, and 20 clients at once.

Every request ends with exactly one of result / typed error / cancelled; the requests a fault did not touch are
answered (queued ones wait through the restart); no process outlives its pool; the ranks hold loopback sockets
only. Every wait is bounded, so a hung engine fails a test instead of stalling the run.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid
from multiprocessing.connection import Client
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from apbv.comm import free_port
from apbv.engine.api import Event, Request, Result
from apbv.engine.faults import DECODE_ENV, OOM_ENV, TOKENIZER_ENV
from apbv.engine.parent_watch import EXIT_POOL_LOST
from apbv.engine.pool import TERMINAL, EnginePool, RequestHandle
from apbv.engine.protocol import Cancel, Job, Ready
from apbv.errors import Busy, EngineError, OutOfMemory, RequestTimeout, VideoUnreadable, WorkerDied
from apbv.synthetic import make_sample, write_mp4
from tests.processes import processes_with, tcp_sockets, wait_until

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
WAIT_S = 120.0  # per event; a request of the tiny model takes a few seconds at most
TIMEOUT_S = 15.0  # the fault pool's request timeout: what a request on a stopped rank waits
LONG = 400  # max_new_tokens of a request still decoding when a test acts on it (~2 s)
MARKER = "APBV_FAULT_SUITE"  # every process a fault-suite pool starts carries it in its environment
POISON = "xyzzy"  # the faulty pool's tokenizer fails on it


def _small(video: str, **kw) -> Request:
    return Request(**{"video_path": video, "question": "What color was the shape?", "num_frames": 4,
                      "max_new_tokens": 4, **kw})  # fmt: skip


class Tracked:
    """A submitted request whose events the test reads as they come, all of them kept."""

    def __init__(self, handle: RequestHandle) -> None:
        self.handle = handle
        self.seen: list[Event] = []
        self._events = handle.events(timeout=WAIT_S)

    def until(self, kind: str, name: str | None = None) -> None:
        """Read up to the first event of `kind` (a stage: named `name`)."""
        for event in self._events:
            self.seen.append(event)
            if event.kind == kind and name in (None, event.data.get("name")):
                return
        raise AssertionError(f"the request ended before {kind} {name or ''}: {self.kinds}")

    def end(self) -> Event:
        """The rest of the events; asserts that exactly one of result / error / cancelled ends them."""
        self.seen.extend(self._events)
        assert [e.kind in TERMINAL for e in self.seen].count(True) == 1 and self.seen[-1].kind in TERMINAL, self.kinds
        return self.seen[-1]

    @property
    def kinds(self) -> list[str]:
        return [e.kind for e in self.seen]


def _code(event: Event) -> str:
    return event.data["code"] if event.kind == "error" else event.kind


def _died(event: Event) -> bool:
    """The request lost a rank: worker_died, with a message free of the ranks' log noise (progress bars)."""
    return _code(event) == WorkerDied.code and "Loading weights" not in event.data["message"]


def _gone(pid: int) -> bool:
    """The process has exited (and is no zombie)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


@pytest.fixture(scope="module")
def marked() -> Iterator[str]:
    """A marker in this module's environment, inherited by every process it starts; none may outlive the module."""
    value = uuid.uuid4().hex
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(MARKER, value)
        yield f"{MARKER}={value}"
    assert processes_with(f"{MARKER}={value}") == []


@pytest.fixture(scope="module")
def big_video(tmp_path_factory) -> str:
    """64 noise frames of 448x448: 8,192 visual tokens at 64 frames, so that prefill lasts about a second."""
    frames = np.random.default_rng(0).integers(0, 256, (64, 448, 448, 3), dtype=np.uint8)
    return str(write_mp4(frames, tmp_path_factory.mktemp("big") / "noise.mp4", 8.0))


@pytest.fixture(scope="module")
def fault_pool(tiny_dir, marked) -> Iterator[EnginePool]:
    with EnginePool(model=str(tiny_dir), world_size=2, device="cpu", request_timeout_s=TIMEOUT_S) as pool:
        yield pool
    wait_until(lambda: processes_with(marked) == [], 10, "every rank has exited after close()")


def _kill_at(tracked: Tracked, stage: str, pid: int) -> None:
    """SIGKILL `pid` once the request is in `stage`: "prefill" (before any token) or "decode" (after the first)."""
    if stage == "prefill":
        tracked.until("stage", "prefill")
        assert "token" not in tracked.kinds
    else:
        tracked.until("token")
    os.kill(pid, signal.SIGKILL)


def _request_for(stage: str, example_video: str, big_video: str) -> Request:
    """A request still in `stage` when the test acts: a long prefill (64 frames of 448x448) or a long decode."""
    if stage == "prefill":
        return _small(big_video, num_frames=64)
    return _small(example_video, max_new_tokens=LONG)


def _assert_replaced(pool: EnginePool, old_pids: list[int], restarts: int) -> None:
    health = pool.health()
    assert health["state"] == "ready" and health["alive"] and health["restarts"] == restarts
    assert not set(health["pids"]) & set(old_pids) and all(_gone(pid) for pid in old_pids)


def test_local_pool_holds_loopback_sockets_only(fault_pool, example_video):
    """No rendezvous store, gloo pair or pool listener is reachable from another address (the c10d TCPStore used
    to listen on every interface), and no rank connects anywhere but loopback."""
    assert fault_pool.submit(_small(example_video)).result(timeout=WAIT_S).token_ids  # the group has talked
    sockets = [s for pid in fault_pool.health()["pids"] for s in tcp_sockets(pid)]
    assert any(s.listening for s in sockets)  # rank 0's pool listener at least
    assert all(s.local.is_loopback and (s.listening or s.remote.is_loopback) for s in sockets), sockets


@pytest.mark.parametrize("victim", [0, 1], ids=["rank0", "rank1"])
def test_rank_killed_while_idle_is_replaced_before_the_next_request(fault_pool, example_video, victim):
    before = fault_pool.health()
    os.kill(before["pids"][victim], signal.SIGKILL)
    wait_until(lambda: fault_pool.health()["restarts"] == before["restarts"] + 1, 5, "the idle pool saw the kill")
    assert fault_pool.submit(_small(example_video)).result(timeout=WAIT_S).token_ids  # not failed: answered
    _assert_replaced(fault_pool, before["pids"], before["restarts"] + 1)


@pytest.mark.parametrize(
    "first, second", [((1, "decode"), (0, "prefill")), ((0, "decode"), (1, "prefill"))],
    ids=["rank1-decode-then-rank0-prefill", "rank0-decode-then-rank1-prefill"],
)  # fmt: skip
def test_two_kills_in_a_row_fail_only_the_requests_they_hit(fault_pool, example_video, big_video, first, second):
    """Four requests queued at once: the 1st and 3rd are killed in flight (the 3rd on the restarted ranks), the
    2nd and 4th wait through each restart and are answered."""
    before = fault_pool.health()
    queue = [_request_for(first[1], example_video, big_video), _small(example_video),
             _request_for(second[1], example_video, big_video), _small(example_video)]  # fmt: skip
    hit_first, spared_first, hit_second, spared_second = (Tracked(fault_pool.submit(r)) for r in queue)
    _kill_at(hit_first, first[1], before["pids"][first[0]])
    assert _died(hit_first.end())
    assert spared_first.end().kind == "result"
    hit_second.until("stage", "read")  # running on the restarted ranks
    restarted = fault_pool.health()
    assert restarted["restarts"] == before["restarts"] + 1
    _kill_at(hit_second, second[1], restarted["pids"][second[0]])
    assert _died(hit_second.end()) and "token" not in hit_second.kinds
    assert spared_second.end().kind == "result"
    _assert_replaced(fault_pool, before["pids"] + restarted["pids"], before["restarts"] + 2)


def test_twenty_clients_through_a_kill_and_a_second_kill_during_the_restart(fault_pool, example_video):
    """While a long request decodes, 20 clients submit at once: 8 fit the queue, 12 get Busy. The running request
    is killed, and a rank of the restart too: the restart is tried again, and all 8 queued requests are answered."""
    before = fault_pool.health()
    running = Tracked(fault_pool.submit(_small(example_video, max_new_tokens=LONG)))
    running.until("token")
    outcomes: list[Event | str] = []
    start = threading.Barrier(20)

    def client() -> None:
        start.wait()
        try:
            tracked = Tracked(fault_pool.submit(_small(example_video)))
        except Busy:
            outcomes.append("busy")
            return
        outcomes.append(tracked.end())

    clients = [threading.Thread(target=client) for _ in range(20)]
    for thread in clients:
        thread.start()
    wait_until(lambda: outcomes.count("busy") == 12 and fault_pool.health()["queued"] == 8, 30, "queue full")
    os.kill(before["pids"][1], signal.SIGKILL)
    assert _died(running.end())

    def restarting_ranks() -> list[int]:
        health = fault_pool.health()
        fresh = [pid for pid in health["pids"] if pid not in before["pids"]]
        return fresh if health["state"] == "restarting" and len(fresh) == 2 else []

    wait_until(lambda: bool(restarting_ranks()), 30, "the restart has started its ranks")
    second_victims = restarting_ranks()
    os.kill(second_victims[0], signal.SIGKILL)  # rank 0 of the restart, while it loads
    for thread in clients:
        thread.join(timeout=3 * WAIT_S)
    assert not any(thread.is_alive() for thread in clients)
    results = [o for o in outcomes if isinstance(o, Event)]
    assert outcomes.count("busy") == 12 and [e.kind for e in results] == ["result"] * 8
    assert len({Result.from_dict(e.data).request_id for e in results}) == 8
    _assert_replaced(fault_pool, before["pids"] + second_victims, before["restarts"] + 2)


def test_stopped_rank_times_out_its_request_and_is_replaced(fault_pool, example_video):
    """SIGSTOP on rank 1 mid-decode: the request ends with a timeout after the pool's request_timeout_s, the
    stopped rank is killed with the others, and the request queued behind it is answered."""
    before = fault_pool.health()
    stuck = Tracked(fault_pool.submit(_small(example_video, max_new_tokens=LONG)))
    queued = Tracked(fault_pool.submit(_small(example_video)))
    stuck.until("token")
    os.kill(before["pids"][1], signal.SIGSTOP)
    try:
        assert _code(stuck.end()) == RequestTimeout.code
        assert time.monotonic() - stuck.handle.submitted < TIMEOUT_S + 5
        assert queued.end().kind == "result"
    finally:
        if not _gone(before["pids"][1]):
            os.kill(before["pids"][1], signal.SIGCONT)
    _assert_replaced(fault_pool, before["pids"], before["restarts"] + 1)


def test_cancel_names_only_live_requests(fault_pool, example_video):
    """Cancelling an id that is not queued or running (here: the next one, before it exists) is ignored; it used
    to be remembered and cancel the request that later got that id."""
    last = fault_pool.submit(_small(example_video))
    assert last.result(timeout=WAIT_S).token_ids
    fault_pool.cancel(last.request_id)  # ended already
    next_id = f"req-{int(last.request_id.split('-')[1]) + 1}"
    fault_pool.cancel(next_id)
    handle = fault_pool.submit(_small(example_video))
    assert handle.request_id == next_id and handle.result(timeout=WAIT_S).token_ids


@pytest.fixture(scope="module")
def faulty_pool(tiny_dir, marked) -> Iterator[EnginePool]:
    """Rank 0 runs out of memory at 900 local prompt tokens, rank 1 at 300: 8 frames of the 448x448 video (1,024
    visual tokens) overflow rank 0 alone (dense, one rank) or rank 1 alone (APB-V, two ranks: ~600 tokens each).
    The tokenizer fails on questions that contain POISON."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(OOM_ENV, "0:900,1:300")
        patch.setenv(TOKENIZER_ENV, POISON)
        patch.setenv(DECODE_ENV, f"1:{POISON}")
        with EnginePool(model=str(tiny_dir), world_size=2, device="cpu", request_timeout_s=TIMEOUT_S) as pool:
            yield pool


def test_unexpected_error_while_preparing_fails_only_that_request(faulty_pool, example_video):
    """An exception no check foresaw (here the tokenizer's TypeError) while rank 0 prepares a request ends that
    request as an engine error; the ranks serve on, unrestarted (it used to kill rank 0)."""
    before = faulty_pool.health()
    failing = Tracked(faulty_pool.submit(_small(example_video, question=f"What {POISON}?")))
    end = failing.end()
    assert _code(end) == EngineError.code and "TypeError" in end.data["message"]
    assert faulty_pool.submit(_small(example_video)).result(timeout=WAIT_S).token_ids
    assert faulty_pool.health()["pids"] == before["pids"] and faulty_pool.health()["restarts"] == before["restarts"]


def test_frames_one_rank_cannot_decode_end_in_a_typed_error_for_every_rank(faulty_pool, example_video, tmp_path):
    """Rank 1 finds its frames corrupt (rank 0's probe saw nothing wrong): the request ends with rank 1's typed
    error on every rank at the same step, the group stays in step, nothing restarts, the next request is answered."""
    before = faulty_pool.health()
    broken = write_mp4(make_sample(7, 16).frames, tmp_path / f"{POISON}.mp4")  # a video no cache has seen
    end = Tracked(faulty_pool.submit(_small(str(broken), strategy="apbv", world_size=2))).end()
    assert _code(end) == VideoUnreadable.code and "rank 1" in end.data["message"]
    assert faulty_pool.submit(_small(example_video)).result(timeout=WAIT_S).token_ids
    assert faulty_pool.health()["pids"] == before["pids"] and faulty_pool.health()["restarts"] == before["restarts"]


@pytest.mark.parametrize("victim", [0, 1], ids=["rank0", "rank1"])
def test_out_of_memory_on_any_rank_ends_as_out_of_memory(faulty_pool, big_video, example_video, victim):
    """Rank 1's OOM used to surface as worker_died (rank 0's collective fails first); the request behind it is
    answered by the restarted ranks."""
    before = faulty_pool.health()
    ranks = {"strategy": "dense", "world_size": 1} if victim == 0 else {"strategy": "apbv", "world_size": 2}
    hungry = Tracked(faulty_pool.submit(_small(big_video, num_frames=8, **ranks)))
    queued = Tracked(faulty_pool.submit(_small(example_video)))
    end = hungry.end()
    assert _code(end) == OutOfMemory.code and f"rank {victim} ran out of memory" in end.data["message"]
    assert queued.end().kind == "result"
    _assert_replaced(faulty_pool, before["pids"], before["restarts"] + 1)


OWNER = """
import json, sys, time
from apbv.engine.api import Request
from apbv.engine.pool import EnginePool
model, video, when = sys.argv[1:]
pool = EnginePool(model=model, world_size=2, device="cpu").start(wait=when != "loading")
while len(pool.health()["pids"]) < 2:  # started in the engine thread when loading
    time.sleep(0.01)
print(json.dumps(pool.health()["pids"]), flush=True)
if when == "decoding":
    handle = pool.submit(Request(video, "What color?", num_frames=4, max_new_tokens=400))
    next(e for e in handle.events(timeout=120) if e.kind == "token")
    print("decoding", flush=True)
sys.stdin.read()  # until killed
"""


@pytest.mark.parametrize("when", ["loading", "idle", "decoding"])
def test_ranks_exit_when_the_pool_owner_is_killed(tiny_dir, example_video, when):
    """SIGKILL on the process that owns the pool: its ranks leave by themselves (while still loading the model,
    waiting for a request, or decoding one), within a few seconds."""
    marker = f"APBV_OWNER_TEST={uuid.uuid4().hex}"
    env = {**os.environ, marker.split("=")[0]: marker.split("=")[1]}
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(tiny_dir), example_video, when], cwd=ROOT, env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_until(lambda: len(processes_with(marker)) == 3, 60, "the owner has started two ranks")
        pids = json.loads(owner.stdout.readline())
        if when == "decoding":
            assert owner.stdout.readline().strip() == "decoding"
        assert len(pids) == 2 and not any(_gone(pid) for pid in pids)
    finally:
        owner.kill()
        owner.wait()
    wait_until(lambda: processes_with(marker) == [], 10, "every rank has left after its owner died")


def test_rank0_drops_a_late_cancel_and_exits_when_its_pool_is_lost(tiny_dir, example_video, tmp_path):
    """The pool protocol spoken to a real one-rank worker: a Cancel that comes after its request ended (the pool
    sends it when it races the result) is dropped, so a later job of the same id (a new pool, attached to the
    same ranks) is answered; a connection closed without Shutdown ends the rank with EXIT_POOL_LOST."""
    key, listen = secrets.token_bytes(16), f"127.0.0.1:{free_port()}"
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "APBV_AUTHKEY": key.hex(),
           "CUDA_VISIBLE_DEVICES": ""}  # fmt: skip
    cmd = [sys.executable, "-m", "apbv.engine.worker", "--listen", listen, "--model", str(tiny_dir),
           "--rendezvous-file", str(tmp_path / "rendezvous")]  # fmt: skip
    worker = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        conn = _connect(listen, key, worker)
        assert isinstance(conn.recv(), Ready)
        job = Job("req-1", _small(example_video, strategy="dense", world_size=1))
        for _ in range(2):
            conn.send(job)
            assert _last_event(conn).kind == "result"
            conn.send(Cancel("req-1"))  # late
        conn.close()  # lost: no Shutdown
        assert worker.wait(timeout=30) == EXIT_POOL_LOST
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


def _connect(listen: str, key: bytes, worker: subprocess.Popen):
    host, port = listen.rsplit(":", 1)
    deadline = time.monotonic() + 60
    while True:
        try:
            return Client((host, int(port)), authkey=key)
        except ConnectionRefusedError:
            assert worker.poll() is None and time.monotonic() < deadline, "the worker did not come up"
            time.sleep(0.1)


def _last_event(conn) -> Event:
    """Read one request's messages up to its terminal event."""
    while True:
        assert conn.poll(WAIT_S), "no message from rank 0"
        event = conn.recv().event
        if event.kind in TERMINAL:
            return event


@pytest.fixture
def torchrun_ranks(tmp_path) -> Iterator[tuple[subprocess.Popen, str, str]]:
    """Two CPU ranks under torchrun, restarted on failure (the README's multi-node launch, on one node)."""
    key, listen = secrets.token_hex(16), f"127.0.0.1:{free_port()}"
    env = {**os.environ, "APBV_AUTHKEY": key, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "--max-restarts", "1", "-m", "apbv.engine.worker", "--listen", listen]
    with open(tmp_path / "torchrun.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    yield proc, listen, key
    if proc.poll() is None:  # the agent and its ranks (which a killed agent leaves behind)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_attached_pool_reconnects_after_torchrun_restarts_a_killed_rank(torchrun_ranks, example_video, monkeypatch):
    """SIGKILL on attached rank 0 while idle: the pool sees its connection close, its Shutdown to the dead ranks
    fails without leaving the dead connection behind (which blocked every reconnect), and once torchrun has
    started the ranks again the next request is answered. One restart must do: the restarted group meets under
    keys of its own in torchrun's store (with the last group's keys it fails to form or never does)."""
    proc, listen, key = torchrun_ranks
    monkeypatch.setenv("APBV_AUTHKEY", key)
    with EnginePool(attach=listen, device="cpu") as pool:
        assert pool.submit(_small(example_video)).result(timeout=WAIT_S).token_ids
        os.kill(_holding_port(proc.pid, int(listen.rsplit(":", 1)[1])), signal.SIGKILL)
        wait_until(lambda: pool.health()["restarts"] == 1, 10, "the idle pool saw its connection close")
        wait_until(lambda: pool.health()["state"] == "ready", 3 * WAIT_S, "torchrun restarted, the pool reconnected")
        assert pool.submit(_small(example_video)).result(timeout=WAIT_S).token_ids
        assert pool.health()["alive"] and pool.health()["restarts"] == 1
    assert proc.wait(timeout=60) == 0


def _holding_port(root: int, port: int) -> int:
    """The child process of `root` that holds a TCP socket on local `port` (rank 0: its pool connection)."""
    children = [pid for task in Path(f"/proc/{root}/task").iterdir() for pid in (task / "children").read_text().split()]
    return next(int(pid) for pid in children if any(s.port == port for s in tcp_sockets(int(pid))))
