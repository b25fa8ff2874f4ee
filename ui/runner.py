"""Drives one engine request and folds its event stream into the state the page shows."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Iterator, Protocol

from apbv.engine.api import Request, Result
from apbv.errors import ApbvError, RequestTimeout

STAGES = ("read", "vision", "prefill", "decode")
TICK_S = 0.5  # a running request's state is re-yielded this often without events, so elapsed times advance
THROTTLE_S = 0.2  # what the page shows changes at most this often while tokens stream


class Handle(Protocol):
    request_id: str

    def events(self, timeout: float | None = None) -> Iterator: ...


class Pool(Protocol):
    """The part of `apbv.engine.pool.EnginePool` the page uses."""

    def submit(self, request: Request) -> Handle: ...

    def cancel(self, request_id: str) -> None: ...

    def health(self) -> dict: ...


@dataclass(frozen=True)
class RunState:
    """Where a request stands: queue position, stages reached (with when each began), answer so far, how it ended.

    Times are `time.monotonic()` seconds; `now` is when this state was produced."""

    request_id: str | None = None
    position: int | None = None  # requests ahead of this one in the engine queue, until it starts
    stages: tuple[tuple[str, float], ...] = ()  # (stage, start) in order; the last runs until the request ends
    answer: str = ""
    result: Result | None = None
    error_code: str | None = None
    error_message: str = ""
    finished: bool = False
    now: float = 0.0

    @property
    def ok(self) -> bool:
        return self.result is not None

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.stages)

    def stage_elapsed(self) -> list[tuple[str, float]]:
        """Seconds spent in each stage reached so far (the running one up to `now`)."""
        ends = [start for _, start in self.stages[1:]] + [self.now]
        return [(name, max(0.0, end - start)) for (name, start), end in zip(self.stages, ends)]


def stream(pool: Pool, request: Request, tick_s: float = TICK_S) -> Iterator[RunState]:
    """Yields a new `RunState` for every event of the request, and every `tick_s` while none comes; the last one
    has `finished` set. A consumer that stops early cancels the request."""
    state = RunState(now=time.monotonic())
    try:
        handle = pool.submit(request)
    except ApbvError as e:  # rejected at submit (busy, bad input)
        yield replace(state, error_code=e.code, error_message=str(e), finished=True)
        return
    state = replace(state, request_id=handle.request_id)
    try:
        yield state
        while not state.finished:
            try:
                for event in handle.events(timeout=tick_s):
                    state = _apply(state, event.kind, event.data, time.monotonic())
                    yield state
            except RequestTimeout:  # no event within tick_s: the same state, later
                state = replace(state, now=time.monotonic())
                yield state
    finally:
        if not state.finished:
            pool.cancel(handle.request_id)


def throttle(states: Iterator[RunState], interval_s: float = THROTTLE_S) -> Iterator[RunState]:
    """`states` at most once per `interval_s`, except that a new stage and the final state always pass: a page
    re-rendering the whole answer for every token falls behind on a busy machine."""
    shown: RunState | None = None
    for state in states:
        if shown is None or state.finished or state.stages != shown.stages or state.now - shown.now >= interval_s:
            shown = state
            yield state


def run(pool: Pool, request: Request) -> RunState:
    """Runs a request to its end and returns its final state."""
    state = RunState()
    for state in stream(pool, request):
        pass
    return state


def _apply(state: RunState, kind: str, data: dict, now: float) -> RunState:
    state = replace(state, now=now)
    if kind == "queued":
        return replace(state, position=int(data["position"]))
    if kind == "stage":
        return _enter(state, data["name"], now)
    if kind == "token":  # the first token ends prefill: what follows is decode
        return replace(_enter(state, "decode", now), answer=state.answer + data["text"])
    if kind == "result":
        result = Result.from_dict(data)
        return replace(state, result=result, answer=result.answer, finished=True)
    if kind == "error":
        return replace(state, error_code=data["code"], error_message=data["message"], finished=True)
    if kind == "cancelled":
        return replace(state, error_code="cancelled", error_message="The request was stopped.", finished=True)
    return state


def _enter(state: RunState, stage: str, now: float) -> RunState:
    """The state once `stage` has begun (no change when it already has)."""
    if stage in state.stage_names:
        return state
    return replace(state, position=None, stages=(*state.stages, (stage, now)))
