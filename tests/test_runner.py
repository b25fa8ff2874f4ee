"""The page's request driver against the real engine pool (embedded model, CPU, 2 ranks), and its pure parts."""

from __future__ import annotations

import pytest

from apbv.engine.api import Request
from ui.controls import with_strategy
from ui.runner import STAGES, RunState, run, stream, throttle
from ui.video_info import estimate_visual_tokens, probe


def test_stage_elapsed_runs_the_last_stage_until_now():
    state = RunState(stages=(("read", 1.0), ("vision", 1.25), ("prefill", 2.0)), now=2.5)
    assert state.stage_elapsed() == [("read", 0.25), ("vision", 0.75), ("prefill", 0.5)]
    assert state.stage_names == ("read", "vision", "prefill")


def test_throttle_passes_new_stages_and_the_end_but_not_every_token():
    decoding = (("read", 0.0), ("decode", 0.125))
    states = [RunState(stages=decoding[:1], now=0.0)]  # times in 64ths of a second: exact in binary
    states += [RunState(stages=decoding, answer="x" * i, now=(8 + i) / 64) for i in range(50)]
    states += [RunState(stages=decoding, answer="done", finished=True, now=1.0)]
    shown = list(throttle(iter(states), interval_s=0.25))
    assert shown[0] is states[0] and shown[1] is states[1] and shown[-1] is states[-1]  # stage changes, the end
    assert [s.now for s in shown[1:-1]] == [0.125, 0.375, 0.625, 0.875]  # tokens at most every 0.25 s


@pytest.mark.multiprocess
def test_stream_reports_stages_tokens_and_the_result(pool, example_video):
    states = list(stream(pool, Request(example_video, "What moves in the video?", num_frames=8, max_new_tokens=8,
                                 strategy="apbv")))
    final = states[-1]
    assert final.ok and final.finished and not any(s.finished for s in states[:-1])
    assert final.stage_names == STAGES and final.request_id == states[0].request_id
    assert [s.now for s in states] == sorted(s.now for s in states)
    streamed = [s.answer for s in states if s.result is None]
    assert streamed[-1] == final.result.answer  # the streamed pieces add up to the final answer
    assert final.result.world_size == 2 and [m.rank for m in final.result.ranks] == [0, 1]


@pytest.mark.multiprocess
def test_a_stream_left_early_cancels_its_request(pool, example_video):
    submitted = []

    class Watched:
        """The real pool, keeping the handles it returns so that the test can read their ends."""

        def submit(self, request):
            submitted.append(pool.submit(request))
            return submitted[-1]

        def cancel(self, request_id):
            pool.cancel(request_id)

        def health(self):
            return pool.health()

    states = stream(Watched(), Request(example_video, "What moves?", num_frames=8, max_new_tokens=8))
    assert next(states).request_id == submitted[0].request_id
    states.close()  # the client went away before the first token
    assert [e.kind for e in submitted[0].events(timeout=60)][-1] == "cancelled"
    assert run(pool, Request(example_video, "What moves?", num_frames=8, max_new_tokens=4)).ok


@pytest.mark.multiprocess
def test_baseline_runs_on_one_rank(pool, example_video):
    request = with_strategy(Request(example_video, "What moves?", num_frames=8, max_new_tokens=4), "dense", 2)
    final = run(pool, request)
    assert final.ok and final.result.strategy == "dense" and len(final.result.ranks) == 1


@pytest.mark.multiprocess
def test_empty_question_ends_in_a_readable_error_and_the_pool_keeps_serving(pool, example_video):
    bad = run(pool, Request(example_video, "   ", num_frames=8))
    assert (bad.finished, bad.ok, bad.error_code) == (True, False, "empty_question")
    assert run(pool, Request(example_video, "What moves?", num_frames=8, max_new_tokens=4)).ok


@pytest.mark.multiprocess
def test_page_estimate_equals_the_engines_visual_tokens(pool, example_video):
    """The page's estimate uses the model's own pixel bounds (112x112 frames for the embedded model)."""
    health = pool.health()
    assert health["video_pixels"] == {"min_pixels": 4 * 28 * 28, "max_pixels": 112 * 112}
    info = probe(example_video)
    for frames, max_pixels in ((8, None), (16, 56 * 56)):
        pixels = health["video_pixels"] | ({"max_pixels": max_pixels} if max_pixels else {})
        result = run(pool, Request(example_video, "What color?", num_frames=frames, max_pixels=max_pixels,
                                   max_new_tokens=1)).result  # fmt: skip
        assert estimate_visual_tokens(info, frames, None, pixels) == result.visual_tokens
