"""Drives one engine request and folds its event stream into the state the page shows."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator, Protocol

from apbv.engine.api import Request, Result
from apbv.errors import ApbvError

STAGES = ("read", "vision", "prefill", "decode")


class Handle(Protocol):
    def events(self, timeout: float | None = None) -> Iterator: ...


class Pool(Protocol):
    """The part of `apbv.engine.pool.EnginePool` the page uses."""

    def submit(self, request: Request) -> Handle: ...

    def health(self) -> dict: ...


@dataclass(frozen=True)
class RunState:
    """Where a request stands: queue position, stages reached, answer so far, and how it ended."""

    position: int | None = None  # requests ahead of this one in the engine queue, until it starts
    stages: tuple[str, ...] = ()  # stages started, in order; the last one is running until the request ends
    answer: str = ""
    result: Result | None = None
    error_code: str | None = None
    error_message: str = ""
    finished: bool = False

    @property
    def ok(self) -> bool:
        return self.result is not None


def stream(pool: Pool, request: Request) -> Iterator[RunState]:
    """Yields a new `RunState` for every event of the request; the last one has `finished` set."""
    state = RunState()
    try:
        handle = pool.submit(request)
        for event in handle.events():
            state = _apply(state, event.kind, event.data)
            yield state
    except ApbvError as e:  # rejected at submit (busy, bad input) or raised while streaming
        yield replace(state, error_code=e.code, error_message=str(e), finished=True)


def run(pool: Pool, request: Request) -> RunState:
    """Runs a request to its end and returns its final state."""
    state = RunState()
    for state in stream(pool, request):
        pass
    return state


def _apply(state: RunState, kind: str, data: dict) -> RunState:
    if kind == "queued":
        return replace(state, position=int(data["position"]))
    if kind == "stage":
        return replace(state, position=None, stages=(*state.stages, data["name"]))
    if kind == "token":
        return replace(state, answer=state.answer + data["text"])
    if kind == "result":
        result = Result.from_dict(data)
        return replace(state, result=result, answer=result.answer, finished=True)
    if kind == "error":
        return replace(state, error_code=data["code"], error_message=data["message"], finished=True)
    if kind == "cancelled":
        return replace(state, error_code="cancelled", error_message="The request was cancelled.", finished=True)
    return state
