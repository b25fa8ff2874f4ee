"""The page's handlers without a browser, on the real engine pool (embedded model, CPU, 2 ranks): what each turn,
comparison, stop and control change does to the page, named by `ui.layout.Layout` field."""

from __future__ import annotations

from dataclasses import fields

import pytest

from ui import handlers
from ui.controls import DEFAULTS, SAMPLE_BY_FPS, SAMPLE_BY_FRAMES
from ui.layout import Layout

# strategy, ranks, sample_by, frames, fps, max_pixels, max_new_tokens, anchor, passing (ui.layout.SETTINGS)
SETTINGS = ["apbv", 2, SAMPLE_BY_FRAMES, 8, 1.0, 0, 4, None, None]


def _ask(pool, video, question, messages=(), turns=(), side_by_side=False, settings=SETTINGS) -> list[dict]:
    return list(handlers.ask(pool, video, question, list(messages), list(turns), [], None, side_by_side, *settings))


def _final(updates: list[dict]) -> dict:
    """Every field's last value over a handler's updates."""
    final: dict = {}
    for update in updates:
        final |= update
    return final


def test_outputs_name_layout_fields():
    names = {f.name for f in fields(Layout)}
    for outputs in (handlers.ENGINE_OUTPUTS, handlers.CONTROL_OUTPUTS, handlers.DESCRIBE_OUTPUTS,
                    handlers.START_OVER_OUTPUTS, handlers.ASK_OUTPUTS, handlers.COMPARE_OUTPUTS,
                    handlers.STOP_OUTPUTS, handlers.BUSY_OUTPUTS):  # fmt: skip
        assert set(outputs) <= names


@pytest.mark.multiprocess
def test_a_turn_streams_into_the_chat_then_keeps_the_conversation(pool, example_video):
    updates = _ask(pool, example_video, "What color was the shape?")
    assert updates[0]["status"] == "… Starting" and updates[0]["compare_table"] == ""  # nothing stale stays
    assert all(set(u) <= set(handlers.ASK_OUTPUTS) for u in updates)
    final = _final(updates)
    answer = final["turns"][-1][1]
    assert final["turns"] == [["What color was the shape?", answer]] and answer
    assert final["messages"] == [{"role": "user", "content": "What color was the shape?"},
                                 {"role": "assistant", "content": answer}]  # fmt: skip
    assert final["last_request"].question == "What color was the shape?" and final["question"] == ""
    assert "first token after" in final["status"] and len(final["runs"]) == 1
    follow_up = _final(_ask(pool, example_video, "And the shape?", final["messages"], final["turns"]))
    request = follow_up["last_request"]
    assert request.history == (("What color was the shape?", answer),)  # the model sees the earlier turn
    assert follow_up["runs"][-1].n_query > final["runs"][-1].n_query
    assert len(follow_up["messages"]) == 4


@pytest.mark.multiprocess
def test_side_by_side_measures_flashattention_on_the_same_inputs(pool, example_video):
    final = _final(_ask(pool, example_video, "What color was the shape?", side_by_side=True))
    asked, baseline = final["runs"]
    assert (asked.strategy, baseline.strategy, baseline.world_size) == ("apbv", "dense", 1)
    assert baseline.n_context == asked.n_context and baseline.n_query == asked.n_query
    assert list(final["stage_plot"].data[0].x[0]) == ["APB-V", "APB-V", "FlashAttention (1 GPU)"]
    assert "FlashAttention (1 GPU) on 1 rank(s)" in final["status"]
    assert len(final["messages"]) == 2  # the baseline's answer is not a turn


@pytest.mark.multiprocess
def test_auto_that_picked_the_baseline_is_not_measured_twice(pool, example_video):
    """Without a calibration for this device, auto runs the single-GPU baseline: the summary says so, and the
    side-by-side run (the same strategy on the same inputs) is skipped."""
    final = _final(_ask(pool, example_video, "What color was the shape?", side_by_side=True,
                        settings=["auto", *SETTINGS[1:]]))  # fmt: skip
    (run,) = final["runs"]
    assert (run.strategy, run.world_size, run.choice["predicted_s"]) == ("dense", 1, None)
    assert "picked by Auto (no speed calibration for this device" in final["status"]


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "video, settings, message",
    [
        ("example", [*SETTINGS[:3], 1000, *SETTINGS[4:]], "frames must be between 1 and 768, got 1000"),
        ("example", [*SETTINGS[:3], None, *SETTINGS[4:]], "enter the number of frames to sample"),
        ("http://127.0.0.1:9/v.mp4", SETTINGS, "This server does not fetch URLs"),
        ("/etc/hostname", SETTINGS, "only videos uploaded to this server and the bundled examples"),
        (None, SETTINGS, "Upload a video (or pick an example) first."),
    ],
)
def test_bad_settings_get_the_pages_own_message_and_run_nothing(pool, example_video, video, settings, message):
    video = example_video if video == "example" else video
    updates = _ask(pool, video, "What color?", settings=settings)
    assert message in updates[-1]["status"] and "running" not in _final(updates)
    assert "turns" not in _final(updates)


@pytest.mark.multiprocess
def test_stop_cancels_the_running_turn(pool, example_video):
    turn = handlers.ask(pool, example_video, "What color?", [], [], [], None, False, *SETTINGS)
    running = None
    for update in turn:
        running = update.get("running", running)
        if running:
            break
    assert handlers.stop(pool, running)["stop"]["interactive"] is False
    final = _final(list(turn))
    assert final["status"] == "■ **Stopped.**" and "turns" not in final


@pytest.mark.multiprocess
def test_compare_remeasures_the_last_question(pool, example_video):
    final = _final(_ask(pool, example_video, "What color was the shape?"))
    compared = _final(list(handlers.compare(pool, final["last_request"], final["runs"], None, every=False)))
    rows = compared["compare_table"].splitlines()[2:4]
    assert [row.split(" | ")[0] for row in rows] == ["| APB-V", "| FlashAttention (1 GPU)"]
    assert len(compared["runs"]) == 1 + 2 * 3  # the first run and three measured repeats of each strategy
    assert "prefill speedup" in compared["compare_plot"].layout.title.text
    assert handlers.compare(pool, None, [], None, every=True).__next__()["status"].endswith(
        "Ask a question first; the comparison re-measures your last question.**")


@pytest.mark.multiprocess
def test_describe_estimates_with_the_engines_pixel_bounds(pool, example_video):
    update = handlers.describe(pool, example_video, SAMPLE_BY_FRAMES, 8, 1.0, 0, [])
    assert update["estimate"] == 8 // 2 * (112 // 28) ** 2  # 4 temporal patches of 4 x 4 merged tokens
    assert "sampling 8 frames" in update["video_info"]
    by_fps = handlers.describe(pool, example_video, SAMPLE_BY_FPS, DEFAULTS.num_frames, 0.0, 0, [])
    assert "frames per second must be above 0" in by_fps["video_info"] and by_fps["estimate"] is None


def test_controls_follow_the_strategy_and_sampling():
    dense = handlers.show_controls("dense", SAMPLE_BY_FPS)
    assert (dense["ranks"]["visible"], dense["advanced"]["visible"]) == (False, False)
    assert (dense["frames"]["visible"], dense["fps"]["visible"]) == (False, True)
    apbv = handlers.show_controls("apbv", SAMPLE_BY_FRAMES)
    assert (apbv["ranks"]["visible"], apbv["advanced"]["visible"], apbv["frames"]["visible"]) == (True, True, True)


@pytest.mark.multiprocess
def test_engine_status_of_a_ready_pool_hides_the_banner_and_stops_polling(pool):
    update = handlers.engine_status(pool)
    assert update["banner"]["visible"] is False and update["engine_timer"].active is False
    assert "on 2 CPU ranks" in update["header"]
