"""The page in a real headless Chromium, served by `app.py` in a subprocess on a free loopback port.

Needs the system Chromium at /usr/bin/chromium (Debian: apt-get install chromium) and the real engine pool.
Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from apbv.comm import free_port

pytestmark = [pytest.mark.browser, pytest.mark.multiprocess, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-quic",
]
STARTUP_TIMEOUT_S = 240
ANSWER_TIMEOUT_MS = 180_000


def _wait_ready(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app.py exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"app.py not ready after {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    ARTIFACTS.mkdir(exist_ok=True)
    port, log = free_port(), ARTIFACTS / "app.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    cmd = [sys.executable, "app.py", "--device", "cpu", "--gpus", "2", "--port", str(port)]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_ready(url, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser: Browser, server: str, example_video: str) -> Iterator[Page]:
    pg = browser.new_page(viewport={"width": 1400, "height": 1800})
    pg.goto(server)
    pg.locator("#video input[type=file]").set_input_files(example_video)
    expect(pg.locator("#video-info")).to_contain_text("frames", timeout=30_000)
    yield pg
    pg.close()


def _ask(page: Page, question: str) -> None:
    page.locator("#question textarea").fill(question)
    page.locator("#ask").click()


def _shot(page: Page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_ask_then_compare_with_flashattention(page: Page):
    _ask(page, "What moves in the video?")
    expect(page.locator("#status")).to_contain_text("end to end", timeout=ANSWER_TIMEOUT_MS)
    answer = page.locator('#chat [data-testid="bot"]').last
    assert answer.inner_text().strip() not in ("", "…")
    for plot in ("#plot-stages", "#plot-work", "#plot-timeline", "#plot-history"):
        expect(page.locator(f"{plot} .js-plotly-plot")).to_be_visible()
    expect(page.locator("#plot-work")).to_contain_text("balance max/mean")
    _shot(page, "answer")

    page.locator("#compare-btn").click()
    rows = page.locator("#compare table tbody tr")
    expect(rows).to_have_count(2, timeout=ANSWER_TIMEOUT_MS)
    cells = [[c.strip() for c in rows.nth(i).inner_text().split("\t")] for i in range(2)]
    (base_name, _, base_ms, _, base_x, base_answer), (name, _, ms, _, x, answer_text) = cells
    assert base_name == "FlashAttention (1 GPU)" and name == "APB-V"
    assert float(base_ms) > 0 and float(ms) > 0 and base_answer and answer_text
    assert base_x == "1.00×"  # the speedup agrees with the shown times (each rounded to 0.1 ms)
    assert float(x.rstrip("×")) == pytest.approx(float(base_ms) / float(ms), rel=0.02, abs=0.01)
    expect(page.locator("#plot-compare .js-plotly-plot")).to_be_visible()
    expect(page.locator("#plot-compare")).to_contain_text(re.compile(r"prefill speedup \d+\.\d\d×"))
    _shot(page, "compare")


def test_empty_question_shows_a_readable_error_and_the_page_still_answers(page: Page):
    _ask(page, "")
    expect(page.locator("#status")).to_contain_text("Please type a question about the video.", timeout=60_000)
    _shot(page, "empty_question")
    _ask(page, "What colour is the square?")
    expect(page.locator("#status")).to_contain_text("end to end", timeout=ANSWER_TIMEOUT_MS)
    assert page.locator('#chat [data-testid="bot"]').last.inner_text().strip() not in ("", "…")
    expect(page.locator('#chat [data-testid="user"]')).to_have_count(1)  # the failed turn left no trace
