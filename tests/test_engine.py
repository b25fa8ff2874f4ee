"""The engine pool (issue 4) with real worker processes: the seeded random tiny model, CPU, 2 gloo ranks.

The random model (unlike the trained embedded one) does not stop early, so long requests are still decoding when
a test cancels. Non-destructive cases share this module's `random_pool`; the small token limit uses a pool of its
own; killed, stopped and out-of-memory ranks are tests/test_faults.py's, bad input tests/test_bad_inputs.py's.
Every wait has a timeout, so a hung engine fails the test instead of stalling the run.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import pytest
import torch
from transformers import AutoConfig

from apbv.attention import get_strategy
from apbv.config import Limits
from apbv.engine.api import Request, Result
from apbv.engine.cost_model import CALIBRATION_ENV, Calibration
from apbv.engine.job import attention_config
from apbv.engine.pool import EnginePool
from apbv.engine.protocol import WorkerOptions
from apbv.errors import (
    Busy,
    EngineError,
    InputError,
    TooManyTokens,
)
from apbv.metrics import MetricsRecorder
from apbv.thread_comm import ThreadWorld
from ui.examples import load_examples

pytestmark = pytest.mark.multiprocess

WAIT_S = 120.0  # per request; a request of the tiny model takes well under a second
LONG = 400  # max_new_tokens of a request that is still decoding when the test acts on it (~2 s)
SMALL_LIMITS = Limits(max_prompt_tokens=400)  # prompt tokens: 4 frames of the example (288 visual) fit, 8 do not


def _request(video: str, **kw) -> Request:
    """APB-V on every rank unless `kw` says otherwise (auto would pick dense on one rank for these short prompts)."""
    return Request(**{"video_path": video, "question": "What color was the shape?", "strategy": "apbv",
                      "num_frames": 4, "max_new_tokens": 4, **kw})  # fmt: skip


def _answer(pool: EnginePool, request: Request) -> Result:
    return pool.submit(request).result(timeout=WAIT_S)


@pytest.fixture(scope="module")
def random_pool(tiny_dir) -> Iterator[EnginePool]:
    with EnginePool(model=str(tiny_dir), world_size=2, device="cpu") as p:
        yield p


@pytest.fixture(scope="module")
def small_pool(tiny_dir) -> Iterator[EnginePool]:
    """A pool of its own with a small prompt-token limit."""
    with EnginePool(model=str(tiny_dir), world_size=2, device="cpu", limits=SMALL_LIMITS) as p:
        yield p


def test_concurrent_clients_each_get_a_result_or_busy(random_pool, example_video):
    """20 submissions from 4 threads at once: the 8-slot queue overflows (Busy at submit), the rest all finish."""
    outcomes: list[Result | str] = []
    start = threading.Barrier(4)

    def client() -> None:
        start.wait()
        handles = []
        for _ in range(5):
            try:
                handles.append(random_pool.submit(_request(example_video, max_new_tokens=2)))
            except Busy:
                outcomes.append("busy")
        outcomes.extend(h.result(timeout=WAIT_S) for h in handles)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=4 * WAIT_S)
    assert not any(t.is_alive() for t in threads)
    results = [o for o in outcomes if isinstance(o, Result)]
    assert len(outcomes) == 20 and "busy" in outcomes and len(results) >= 8
    assert len({r.request_id for r in results}) == len(results)
    for r in results:
        assert r.answer == results[0].answer and r.token_ids and r.wall_s > 0  # greedy: the same answer
        assert [m.rank for m in r.ranks] == [0, 1] and all(m.spans and m.totals for m in r.ranks)
    assert random_pool.health()["queued"] == 0


def test_cancel_mid_request_and_while_queued(random_pool, example_video):
    running = random_pool.submit(_request(example_video, max_new_tokens=LONG))
    waiting = random_pool.submit(_request(example_video))
    random_pool.cancel(waiting.request_id)
    kinds = []
    for event in running.events(timeout=WAIT_S):
        kinds.append(event.kind)
        if kinds.count("token") == 1:
            random_pool.cancel(running.request_id)
    assert kinds[-1] == "cancelled" and 1 <= kinds.count("token") < LONG  # honoured at a token boundary
    assert [e.kind for e in waiting.events(timeout=WAIT_S)] == ["queued", "cancelled"]  # never started
    assert _answer(random_pool, _request(example_video)).token_ids


def test_long_request_runs_to_its_limit_without_cancel(random_pool, example_video):
    """The premise of the cancel and kill tests: a LONG request is still decoding when they act."""
    assert len(_answer(random_pool, _request(example_video, max_new_tokens=LONG)).token_ids) == LONG


def test_too_few_frames_fall_back_to_fewer_ranks_when_allowed(random_pool, example_video):
    request = _request(example_video, num_frames=2, strategy="apbv", world_size=2, allow_fewer_ranks=True)
    result = _answer(random_pool, request)  # one temporal patch: one rank
    assert result.world_size == 1 and [m.rank for m in result.ranks] == [0] and result.token_ids


def test_oversize_request_is_rejected_by_the_token_limit(small_pool, example_video):
    with pytest.raises(TooManyTokens, match="400"):
        _answer(small_pool, _request(example_video, num_frames=8))
    fits = _answer(small_pool, _request(example_video))
    assert fits.n_context + fits.n_query <= SMALL_LIMITS.max_prompt_tokens


def test_pool_started_without_waiting_queues_requests_until_ready(tiny_dir, example_video):
    """start(wait=False) returns at once; a request submitted while the ranks start waits and is answered."""
    pool = EnginePool(model=str(tiny_dir), world_size=2, device="cpu")
    try:
        pool.start(wait=False)
        assert pool.health()["state"] == "starting"
        handle = pool.submit(_request(example_video))
        assert next(handle.events(timeout=WAIT_S)).data == {"position": 1}  # behind the engine's start
        assert handle.result(timeout=WAIT_S).token_ids and pool.health()["state"] == "ready"
        assert next(pool.submit(_request(example_video)).events(timeout=WAIT_S)).data == {"position": 0}
    finally:
        pool.close()


def test_pool_that_cannot_start_fails_its_requests(tmp_path, example_video):
    pool = EnginePool(model=str(tmp_path / "no-such-model"), world_size=1, device="cpu")
    try:
        pool.start(wait=False)
        handle = pool.submit(_request(example_video, world_size=1))
        with pytest.raises(EngineError):
            handle.result(timeout=WAIT_S)
        assert pool.health()["state"] == "failed"
        with pytest.raises(EngineError, match="did not start"):
            pool.submit(_request(example_video, world_size=1))
    finally:
        pool.close()


def test_auto_picks_what_its_calibration_predicts_fastest_and_says_so(tiny_dir, example_video, tmp_path, monkeypatch):
    """With a calibration where dense wins on short prompts and APB-V on two ranks on long ones, `auto` (the
    default strategy) runs each request the way predicted fastest and reports the choice in the result."""
    calibration = Calibration("cpu", "test", {("dense", 1): ((100, 0.01), (5000, 1.0)),
                                              ("apbv", 2): ((100, 0.2), (5000, 0.3))})  # fmt: skip
    (tmp_path / "calibration.json").write_text(calibration.to_json())
    monkeypatch.setenv(CALIBRATION_ENV, str(tmp_path / "calibration.json"))
    with EnginePool(model=str(tiny_dir), world_size=2, device="cpu") as pool:
        short, long = (_answer(pool, Request(example_video, "What color?", num_frames=n, max_new_tokens=2))
                       for n in (4, 32))  # fmt: skip
    assert (short.strategy, short.world_size, long.strategy, long.world_size) == ("dense", 1, "apbv", 2)
    tokens = long.n_context + long.n_query
    assert long.choice["predicted_s"] == pytest.approx(calibration.predict("apbv", 2, tokens))
    assert set(long.choice["candidates"]) == {"dense@1", "apbv@2"} and long.summary()["auto_predicted_s"] > 0


def test_follow_up_carries_the_conversation(random_pool, example_video):
    """A follow-up request holds the earlier turns in its query; the context (the video) is unchanged."""
    first = _answer(random_pool, _request(example_video))
    follow_up = _answer(random_pool, _request(example_video, question="And its shape?",
                                              history=(("What color was the shape?", first.answer),)))  # fmt: skip
    assert follow_up.n_context == first.n_context and follow_up.n_query > first.n_query
    with pytest.raises(InputError, match="history"):
        random_pool.submit(_request(example_video, history=(("only a question",),)))


def test_follow_up_on_a_cached_video_skips_reading_and_vision(random_pool, example_video):
    """The second question on the same video and sampling reuses every rank's encoded video: no frames decoded, no
    encoder run, and the same answer as without the cache."""
    request = _request(example_video, num_frames=16, max_new_tokens=6)
    first, again = _answer(random_pool, request), _answer(random_pool, request)
    assert not first.summary()["video_cached"] and again.summary()["video_cached"]
    assert again.token_ids == first.token_ids
    for m in again.ranks:
        assert m.totals.get("vision", 0) == m.totals.get("preprocess", 0) == 0 and "read_busy_s" not in m.counters
    dense = _answer(random_pool, replace(request, strategy="dense", world_size=1))  # rank 0's copy serves W=1 too
    assert dense.summary()["video_cached"]


def test_a_changed_file_is_never_served_from_the_cache(random_pool, tmp_path):
    """Same path, new content: read and encoded afresh (the cache key is the content, not the path)."""
    examples = load_examples()
    path = tmp_path / "upload.mp4"
    path.write_bytes(Path(examples[0].video).read_bytes())
    _answer(random_pool, _request(str(path), num_frames=6))
    path.write_bytes(Path(examples[1].video).read_bytes())
    changed = _answer(random_pool, _request(str(path), num_frames=6))
    fresh = _answer(random_pool, _request(examples[1].video, num_frames=6))
    assert not changed.summary()["video_cached"] and changed.token_ids == fresh.token_ids


def test_ranks_without_the_file_get_it_from_rank_0(tiny_dir, random_pool, example_video):
    """ship_videos: rank 1 reads nothing itself (a node without shared storage); rank 0 sends it the compressed file,
    and the answer is the same."""
    request = _request(example_video, num_frames=18, max_new_tokens=6)
    with EnginePool(model=str(tiny_dir), world_size=2, device="cpu",
                    options=WorkerOptions(video_cache_mb=0, ship_videos=True)) as shipping:  # fmt: skip
        shipped = _answer(shipping, request)
    assert shipped.token_ids == _answer(random_pool, request).token_ids
    assert shipped.ranks[1].counters["bytes_recv"] > Path(example_video).stat().st_size


def _predicted_attn_pairs(request: Request, result: Result, model_dir) -> list[float]:
    """Per-rank attention pairs of the request's prefill, from the strategy's own plan: its prefill rerun on
    random q/k/v of the model's head shapes, one layer, times the number of layers."""
    text = AutoConfig.from_pretrained(model_dir).text_config
    hq, hkv, d = text.num_attention_heads, text.num_key_value_heads, text.hidden_size // text.num_attention_heads
    strategy = get_strategy(attention_config(request))
    plan = strategy.plan(result.n_context, result.n_query, result.world_size)

    def one_layer(rank: int, comm) -> float:
        recorder = MetricsRecorder(rank, torch.device("cpu"))
        s = plan.ranks[rank].length
        q, k, v = torch.randn(hq, s, d), torch.randn(hkv, s, d), torch.randn(hkv, s, d)
        strategy.prefill(q, k, v, plan, 0, comm, recorder)
        return recorder.counters["attn_pairs"] * text.num_hidden_layers

    with ThreadWorld(result.world_size) as world:
        return world.run(one_layer)


@pytest.mark.parametrize("strategy, world_size", [("apbv", 2), ("ring", 2), ("dense", 1)])
def test_metrics_add_up(random_pool, example_video, tiny_dir, strategy, world_size):
    frames = {"apbv": 10, "ring": 12, "dense": 14}[strategy]  # a sampling no other test uses: no cached video
    request = _request(example_video, strategy=strategy, world_size=world_size, num_frames=frames, max_new_tokens=6)
    result = _answer(random_pool, request)
    assert result.world_size == world_size and [m.rank for m in result.ranks] == list(range(world_size))
    for m in result.ranks:
        names = [s.name for s in m.spans]
        assert names == (["read"] if m.rank == 0 else []) + ["vision", "prefill", "decode"]
        span = {s.name: s.end - s.start for s in m.spans}
        bounds = [t for s in m.spans for t in (s.start, s.end)]
        assert 0 <= bounds[0] and bounds == sorted(bounds) and bounds[-1] <= result.wall_s  # in order, inside
        t = m.totals
        eps = 1e-6
        assert sum(t.values()) <= sum(span.values()) + eps  # each interval is in exactly one category
        # reading: the plan on rank 0 (its "read" span), waiting for decoded frames inside "vision" on every rank
        video = t.get("read", 0) + t.get("preprocess", 0) + t["vision"]
        assert video <= span.get("read", 0) + span["vision"] + eps and t["preprocess"] > 0 and t["vision"] > 0
        assert t["attention"] + t["other_layers"] <= span["prefill"] + eps and t["decode"] <= span["decode"] + eps
        assert t.get("comm_wait", 0) <= span["vision"] + span["prefill"] + eps
        assert (m.counters.get("bytes_sent", 0) > 0) == (world_size > 1) and m.counters["attn_flops"] > 0
    assert 0 < result.first_token_s <= result.wall_s  # seen by the client: submit -> first token -> last token
    summary = result.summary()
    assert summary["prefill_s"] == max(sum(s.end - s.start for s in m.spans if s.name == "prefill") for m in result.ranks)
    assert summary["decode_tokens_per_s"] == pytest.approx((len(result.token_ids) - 1) / summary["decode_s"])
    assert (summary["strategy"], summary["world_size"], summary["new_tokens"]) == (strategy, world_size, 6)
    first = [m.spans[0] for m in result.ranks]
    assert all(s.start >= first[0].end for s in first[1:])  # one time axis: other ranks start after rank 0's read
    assert [m.counters["attn_pairs"] for m in result.ranks] == _predicted_attn_pairs(request, result, tiny_dir)
