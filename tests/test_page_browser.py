"""The page in a real headless Chromium, served by `app.py` in a subprocess on a free loopback port.

The server runs the seeded random tiny model (it never stops early, so a long answer is still decoding when the
Stop test clicks). Needs the system Chromium at /usr/bin/chromium (Debian: apt-get install chromium). Screenshots
go to test-artifacts/.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.app_server import ARTIFACTS, app_server

pytestmark = [pytest.mark.browser, pytest.mark.multiprocess, pytest.mark.slow]

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-quic",
]
CHROMIUM = Path(__file__).with_name("chromium_without_realtime")  # /usr/bin/chromium, unable to go real-time
READY_TIMEOUT_MS = 240_000
ANSWER_TIMEOUT_MS = 180_000
DONE = "first token after"  # in the status line once an answer is complete


@pytest.fixture(scope="module")
def server(tiny_dir) -> Iterator[str]:
    with app_server("--model", str(tiny_dir), log_name="app-browser.log") as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


def _open(browser: Browser, server: str) -> Page:
    pg = browser.new_page(viewport={"width": 1400, "height": 2000})
    pg.goto(server)
    return pg


@pytest.fixture
def page(browser: Browser, server: str, example_video: str) -> Iterator[Page]:
    pg = _open(browser, server)
    expect(pg.locator("#banner")).to_be_hidden(timeout=READY_TIMEOUT_MS)
    pg.locator("#video input[type=file]").set_input_files(example_video)
    expect(pg.locator("#video-info")).to_contain_text("visual tokens", timeout=30_000)
    yield pg
    pg.close()


def _ask(page: Page, question: str) -> None:
    page.locator("#question textarea").fill(question)
    page.locator("#ask").click()


def _number(page: Page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(value)
    box.press("Enter")
    expect(box).to_have_value(value)


def _strategy(page: Page, label: str) -> None:
    page.locator("#strategy input").click()
    page.get_by_role("option", name=label).click()


def _answered(page: Page) -> None:
    """Wait until the turn has ended (the answer and, when asked for, FlashAttention beside it)."""
    expect(page.locator("#status")).to_contain_text(DONE, timeout=ANSWER_TIMEOUT_MS)
    expect(page.locator("#stop")).to_be_hidden(timeout=ANSWER_TIMEOUT_MS)
    expect(page.locator("#ask")).to_be_enabled()


def _shot(page: Page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _prompt_tokens(page: Page) -> int:
    return int(re.search(r"([\d,]+) prompt tokens", page.locator("#status").inner_text()).group(1).replace(",", ""))


def test_banner_shows_while_the_engine_starts(browser: Browser, server: str):
    """The page is served at once; the banner says the engine is starting until it is ready (the first test of
    this module, so the engine is still loading)."""
    pg = _open(browser, server)
    expect(pg.locator("#banner")).to_contain_text("The engine is starting", timeout=30_000)
    _shot(pg, "starting")
    expect(pg.locator("#banner")).to_be_hidden(timeout=READY_TIMEOUT_MS)
    expect(pg.locator("h1")).to_contain_text("APB-V Video QA")
    pg.close()


def test_answer_with_flashattention_side_by_side(page: Page):
    _strategy(page, "APB-V")
    _ask(page, "What moves in the video?")
    status = page.locator("#status")
    expect(status).to_contain_text(DONE, timeout=ANSWER_TIMEOUT_MS)
    assert page.locator('#chat [data-testid="bot"]').last.inner_text().strip() not in ("", "…")
    expect(status).to_contain_text("FlashAttention (1 GPU) on 1 rank(s)", timeout=ANSWER_TIMEOUT_MS)
    for plot in ("#plot-stages", "#plot-work", "#plot-timeline"):  # both runs on the same axes
        expect(page.locator(f"{plot} .js-plotly-plot")).to_contain_text("APB-V")
        expect(page.locator(f"{plot} .js-plotly-plot")).to_contain_text("FlashAttention (1 GPU)")
    work = page.locator("#plot-work")
    expect(work).to_contain_text(re.compile(r"balance max/mean: APB-V \d\.\d\d · FlashAttention \(1 GPU\) \d\.\d\d"))
    expect(work).to_contain_text(re.compile(r"attention work \([kMGTP]?FLOP\)"))
    assert "μ" not in work.inner_text()  # no SI prefix on top of the unit
    expect(page.locator("#plot-history .js-plotly-plot")).to_be_visible()
    expect(page.locator("#stop")).to_be_hidden()
    expect(page.locator("#ask")).to_be_enabled()
    _shot(page, "side_by_side")


def test_follow_up_carries_the_conversation(page: Page):
    _ask(page, "What colour is the square?")
    _answered(page)
    first = _prompt_tokens(page)
    page.locator("#side-by-side input").uncheck()
    _ask(page, "What colour is the square?")
    expect(page.locator('#chat [data-testid="user"]')).to_have_count(2, timeout=ANSWER_TIMEOUT_MS)
    _answered(page)
    assert _prompt_tokens(page) > first  # the same question, now after one earlier turn
    expect(page.locator('#chat [data-testid="bot"]')).to_have_count(2)
    page.locator("#clear-btn").click()
    expect(page.locator('#chat [data-testid="user"]')).to_have_count(0)
    _ask(page, "What colour is the square?")
    _answered(page)
    assert _prompt_tokens(page) == first  # cleared: a fresh conversation again
    _shot(page, "follow_up")


def test_stop_cancels_the_running_answer(page: Page):
    _strategy(page, "APB-V")  # two ranks: a slower decode than dense's on one
    page.locator("#side-by-side input").uncheck()
    _number(page, "max-new-tokens", "512")  # the random model decodes all of them: seconds
    _ask(page, "Tell me everything about the video.")
    expect(page.locator("#stop")).to_be_visible(timeout=ANSWER_TIMEOUT_MS)
    expect(page.locator("#ask")).to_be_disabled()
    expect(page.locator("#status")).to_contain_text("▶ decode", timeout=ANSWER_TIMEOUT_MS)  # tokens are streaming
    page.locator("#stop").click()
    expect(page.locator("#status")).to_contain_text("Stopped", timeout=60_000)
    expect(page.locator('#chat [data-testid="bot"]').last).to_contain_text("(stopped)")
    expect(page.locator("#ask")).to_be_enabled()
    expect(page.locator("#stop")).to_be_hidden()
    _shot(page, "stopped")
    _ask(page, "And now?")  # the engine keeps serving, the stopped turn is not part of the conversation
    _answered(page)


def test_out_of_range_settings_get_the_pages_own_message(page: Page):
    page.locator("#sample-by").get_by_text("frame count").click()
    _number(page, "frames", "1000")
    expect(page.locator("#video-info")).to_contain_text("frames must be between 1 and 768, got 1000")
    _ask(page, "What moves?")
    expect(page.locator("#status")).to_contain_text("frames must be between 1 and 768, got 1000", timeout=60_000)
    expect(page.locator(".toast-body")).to_have_count(0)  # no generic Gradio toast
    _shot(page, "frames_out_of_range")
    _number(page, "frames", "8")
    _ask(page, "What moves?")
    expect(page.locator("#status")).not_to_contain_text("frames must be", timeout=10_000)  # stale message cleared
    _answered(page)


def test_empty_question_shows_a_readable_error_and_the_page_still_answers(page: Page):
    _ask(page, "")
    expect(page.locator("#status")).to_contain_text("Please type a question about the video.", timeout=60_000)
    _ask(page, "What colour is the square?")
    _answered(page)
    expect(page.locator('#chat [data-testid="user"]')).to_have_count(1)  # the failed turn left no trace


def test_controls_show_only_what_applies(page: Page):
    expect(page.locator("#frames")).to_be_hidden()  # the engine samples at a rate by default
    page.locator("#sample-by").get_by_text("frame count").click()
    expect(page.locator("#frames")).to_be_visible()
    expect(page.locator("#fps")).to_be_hidden()
    page.locator("#sample-by").get_by_text("frames per second").click()
    expect(page.locator("#fps")).to_be_visible()
    expect(page.locator("#frames")).to_be_hidden()
    expect(page.locator("#ranks")).to_be_visible()
    _strategy(page, "FlashAttention (1 GPU)")
    expect(page.locator("#ranks")).to_be_hidden()
    expect(page.get_by_text("Advanced: APB-V parameters")).to_be_hidden()


def test_compare_remeasures_both_strategies(page: Page):
    _strategy(page, "APB-V")
    page.locator("#side-by-side input").uncheck()
    _ask(page, "What moves in the video?")
    _answered(page)
    page.locator("#compare-btn").click()
    rows = page.locator("#compare table tbody tr")
    expect(rows).to_have_count(2, timeout=ANSWER_TIMEOUT_MS)
    names = [rows.nth(i).locator("td").first.inner_text().strip() for i in range(2)]
    assert names == ["APB-V", "FlashAttention (1 GPU)"]
    expect(page.locator("#compare")).to_contain_text("Median of 3 run(s) after 1 warm-up(s)")
    for header in page.locator("#compare th").all():  # headers never wrap mid-word
        assert header.evaluate("e => getComputedStyle(e).whiteSpace") == "nowrap"
    expect(page.locator("#plot-compare")).to_contain_text(re.compile(r"prefill speedup \d+\.\d\d×"))
    expect(page.locator("#plot-stages .js-plotly-plot")).to_contain_text("FlashAttention (1 GPU)")
    _shot(page, "compare")
