"""The app's named API through `gradio_client`, as a client program uses it: `app.py` in a subprocess (embedded
model, 2 CPU ranks) on a free loopback port.

The server runs with an HTTP proxy that is a loopback listener of this test: had it fetched a URL a client sent
(Gradio downloads them before any handler runs), directly or through the proxy, that listener would see it.
"""

from __future__ import annotations

import http.server
import statistics
import threading
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from gradio_client import Client, handle_file

from apbv.synthetic import make_sample, write_mp4
from tests.app_server import ARTIFACTS, app_server
from ui.examples import load_examples

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

DELETE_AFTER_S = 20  # the server deletes uploads this long after they arrive


class _Listener(http.server.ThreadingHTTPServer):
    """A loopback HTTP server (and proxy) that records every request line it receives."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        listener = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _record(self) -> None:
                listener.seen.append(self.requestline)
                self.send_response(404)
                self.end_headers()

            do_GET = do_HEAD = do_POST = do_CONNECT = _record

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture(scope="module")
def listener() -> Iterator[_Listener]:
    server = _Listener()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def uploads(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gradio-uploads")


@pytest.fixture(scope="module")
def server(listener: _Listener, uploads: Path) -> Iterator[str]:
    proxy = {"HTTP_PROXY": listener.url, "HTTPS_PROXY": listener.url, "NO_PROXY": "127.0.0.1,localhost",
             "GRADIO_TEMP_DIR": str(uploads)}  # fmt: skip
    with app_server("--delete-uploads-after", str(DELETE_AFTER_S), log_name="app-api.log", env=proxy) as url:
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> Client:
    return Client(server, verbose=False)


@pytest.fixture(scope="module")
def example():
    return load_examples()[0]  # colour: the embedded model answers it


def test_only_ask_and_compare_with_named_parameters(client: Client):
    api = client.view_api(print_info=False, return_format="dict")
    assert set(api["named_endpoints"]) == {"/ask", "/compare"} and not api["unnamed_endpoints"]
    ask = [p["parameter_name"] for p in api["named_endpoints"]["/ask"]["parameters"]]
    assert ask == ["video", "question", "strategy", "ranks", "frames", "fps", "max_pixels", "max_new_tokens",
                   "anchor_ratio", "passing_ratio", "history", "reuse_context"]  # fmt: skip
    compare = [p["parameter_name"] for p in api["named_endpoints"]["/compare"]["parameters"]]
    assert compare == [*ask[:-1], "strategies", "warmup", "repeats"]  # full prefills: no reuse_context


def test_ask_streams_the_answer_then_the_structured_result(client: Client, example):
    job = client.submit(video=handle_file(example.video), question=example.question, strategy="apbv",
                        ranks="2", api_name="/ask")  # ranks as text is fine  # fmt: skip
    outputs = [tuple(o) for o in job]
    answer, result = job.result()
    assert answer == example.answer == result["answer"]
    assert all(data is None for _, data in outputs[:-1]) and outputs[-1] == (answer, result)
    assert all(answer.startswith(text) for text, _ in outputs)  # the answer grows
    summary = result["summary"]
    assert (summary["strategy"], summary["world_size"], result["strategy"]) == ("apbv", 2, "apbv")
    assert [r["rank"] for r in result["ranks"]] == [0, 1]
    prefill = max(sum(s["end"] - s["start"] for s in r["spans"] if s["name"] == "prefill") for r in result["ranks"])
    assert summary["prefill_s"] == pytest.approx(prefill)
    assert 0 < summary["prefill_s"] < summary["time_to_first_token_s"] <= summary["wall_s"]
    assert all(r["counters"]["attn_flops"] > 0 for r in result["ranks"])


def test_calls_are_stateless_and_history_carries_the_conversation(server: str, example):
    first, second = Client(server, verbose=False), Client(server, verbose=False)
    answer, alone = first.predict(video=handle_file(example.video), question=example.question, api_name="/ask")
    _, follow_up = first.predict(video=handle_file(example.video), question=example.question,
                                 history=[[example.question, answer]], api_name="/ask")  # fmt: skip
    _, fresh = second.predict(video=handle_file(example.video), question=example.question, api_name="/ask")
    assert follow_up["summary"]["prompt_tokens"] > alone["summary"]["prompt_tokens"]
    # auto runs dense here (no calibration for this CPU), which continues the conversation's K/V
    assert follow_up["summary"]["context_reused_tokens"] >= alone["summary"]["prompt_tokens"]
    _, afresh = first.predict(video=handle_file(example.video), question=example.question, reuse_context=False,
                              history=[[example.question, answer]], api_name="/ask")  # fmt: skip
    assert afresh["summary"]["context_reused_tokens"] == 0 and afresh["token_ids"] == follow_up["token_ids"]
    assert fresh["summary"]["prompt_tokens"] == alone["summary"]["prompt_tokens"]  # nothing of the first client's


def test_compare_returns_every_strategys_medians_as_data(client: Client, example):
    text, data = client.predict(video=handle_file(example.video), question=example.question, strategy="apbv",
                                frames=8, max_new_tokens=2, api_name="/compare")  # fmt: skip
    assert text.startswith("Compared 2 strategies")
    assert (data["baseline"], data["warmup"], data["repeats"]) == ("dense", 1, 3)
    apbv, dense = data["strategies"]
    assert (apbv["strategy"], apbv["world_size"], dense["strategy"], dense["world_size"]) == ("apbv", 2, "dense", 1)
    for entry in (apbv, dense):
        runs = [r["prefill_s"] for r in entry["runs"]]
        assert len(runs) == 3 and entry["prefill_s"]["median"] == pytest.approx(statistics.median(runs))
        assert entry["prefill_s"]["min"] == min(runs) and entry["prefill_s"]["max"] == max(runs)
    assert apbv["prefill_speedup"] == pytest.approx(dense["prefill_s"]["median"] / apbv["prefill_s"]["median"])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"frames": 1000}, "frames must be between 1 and 768, got 1000"),
        ({"question": ""}, "Please type a question about the video. (empty_question"),
        ({"strategy": "nope"}, "unknown strategy 'nope'"),
        ({"ranks": 5}, "world_size 5 is outside 1..2"),
        ({"video": "/etc/hostname"}, "only videos uploaded to this server and the bundled examples"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(client: Client, example, change, message):
    call = {"video": handle_file(example.video), "question": example.question, **change}
    with pytest.raises(Exception, match=message.replace("(", r"\(")):
        client.predict(**call, api_name="/ask")
    assert "Traceback" not in (ARTIFACTS / "app-api.log").read_text()  # an expected outcome, not a crash


@pytest.mark.parametrize("where", ["listener", "hf.co", "example.com"])
def test_a_url_is_refused_and_nothing_is_fetched(client: Client, listener: _Listener, where: str):
    url = {"listener": f"{listener.url}/video.mp4", "hf.co": "http://hf.co/video.mp4",
           "example.com": "https://example.com/video.mp4"}[where]  # fmt: skip
    with pytest.raises(Exception, match="This server does not fetch URLs"):
        client.predict(video=handle_file(url), question="What color?", api_name="/ask")
    time.sleep(0.5)
    assert listener.seen == []  # no connection: neither to the URL nor through the proxy
    assert "Traceback" not in (ARTIFACTS / "app-api.log").read_text()


def test_uploads_are_deleted_after_their_time(server: str, uploads: Path, tmp_path: Path):
    video = write_mp4(make_sample(3, num_frames=8, size=(64, 64)).frames, tmp_path / "fresh-upload.mp4", fps=8)
    response = httpx.post(f"{server}gradio_api/upload", files={"files": video.open("rb")}, timeout=30)
    (stored,) = map(Path, response.json())
    assert stored.is_file() and stored.is_relative_to(uploads)
    deadline = time.monotonic() + DELETE_AFTER_S * 2 + 10
    while stored.exists() and time.monotonic() < deadline:
        time.sleep(1)
    assert not stored.exists()
