"""`python -m apbv ask` as a user runs it: a real subprocess that starts its own pool (2 CPU ranks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from apbv.comm import free_port
from tests.processes import processes_with

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
CLI_TIMEOUT_S = 180
QUESTIONS = ("What color was the shape?", "Which shape was shown?")


def _ask(*args: str, launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run the CLI (through `launcher`, e.g. torchrun, when given) and check that nothing it started lives on."""
    marker = f"APBV_TEST_RUN={uuid.uuid4().hex}"
    key, value = marker.split("=")
    env = {**os.environ, key: value, "HF_HUB_OFFLINE": "1"}
    cmd = [*(launcher or (sys.executable,)), "-m", "apbv", "ask", *args, "--device", "cpu", "--max-new-tokens", "4"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    assert processes_with(marker) == []  # no worker outlives the CLI
    return done


def test_ask_prints_the_answers(example_video):
    done = _ask(example_video, *QUESTIONS, "--frames", "8", "--world-size", "2")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert [line.split(": ", 1)[0] for line in lines] == ["Q", "A", "Q", "A"] and lines[0] == f"Q: {QUESTIONS[0]}"
    assert all(line[3:].strip() for line in lines[1::2]) and "Traceback" not in done.stderr


TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port")


@pytest.mark.parametrize("launcher", ["pool", "torchrun"])
def test_questions_file_gives_one_json_result_per_question_on_one_engine(example_video, tmp_path, launcher):
    """Through the CLI's own pool, and as two torchrun ranks (the one-shot channel)."""
    questions = tmp_path / "questions.txt"
    questions.write_text(f"{QUESTIONS[0]}\n\n  \n{QUESTIONS[1]}\n")
    args = (example_video, "--questions", str(questions), "--frames", "8", "--strategy", "apbv", "--json")
    if launcher == "pool":
        done = _ask(*args, "--world-size", "2")
    else:
        done = _ask(*args, launcher=(*TORCHRUN, str(free_port())))
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]  # every line is one JSON object
    assert [r["question"] for r in results] == list(QUESTIONS)
    for result in results:
        assert result["answer"] and 1 <= len(result["token_ids"]) <= 4
        assert result["visual_tokens"] > 0 and [r["rank"] for r in result["ranks"]] == [0, 1]
        summary = result["summary"]
        assert (summary["strategy"], summary["world_size"], summary["new_tokens"]) == (
            "apbv", 2, len(result["token_ids"]))  # fmt: skip
        assert 0 < summary["prefill_s"] and summary["time_to_first_token_s"] > 0
        assert summary["decode_tokens_per_s"] is None or summary["decode_tokens_per_s"] > 0
    if launcher == "pool":  # one pool served both: its request ids follow each other
        assert [r["request_id"] for r in results] == ["req-1", "req-2"]


@pytest.mark.parametrize(
    "kind, args, code",
    [
        ("missing", ("What color?",), "video_not_found"),
        ("text", ("What color?",), "video_unreadable"),
        ("ramp", ("   ",), "empty_question"),
        ("ramp", (), "bad_input"),
        ("ramp", ("What color?", "--frames", "0"), "bad_input"),
        ("ramp", ("What color?", "--world-size", "-1"), "bad_input"),
        ("ramp", ("What color?", "--world-size", "0"), "bad_input"),
        ("ramp", ("What color?", "--frames", "2"), "too_few_frames"),
        ("ramp", ("What color?", "--frames", "many"), "bad_input"),
    ],
)
@pytest.mark.parametrize("as_json", [False, True])
def test_bad_input_fails_before_any_rank_starts(videos, kind, args, code, as_json):
    """With a model that does not exist: had any rank started, it would have failed to load it (exit 1)."""
    ranks = () if "--world-size" in args else ("--world-size", "2")
    done = _ask(str(videos[kind]), *args, *ranks, "--model", "/no/such/model", *(["--json"] * as_json))
    assert done.returncode == 2, done.stderr
    if as_json:
        (line,) = done.stdout.splitlines()
        error = json.loads(line)["error"]
        assert error["code"] == code and error["message"] and done.stderr == ""
    else:
        assert done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert done.stdout == ""


@pytest.mark.parametrize("reuse, continued", [("auto", True), ("no", False)])
def test_later_questions_continue_the_videos_context_unless_told_not_to(example_video, reuse, continued):
    done = _ask(example_video, *QUESTIONS, "--frames", "8", "--strategy", "dense", "--reuse-context", reuse, "--json")
    assert done.returncode == 0, done.stderr
    first, second = (json.loads(line)["summary"] for line in done.stdout.splitlines())
    assert first["context_reused_tokens"] == 0
    assert (second["context_reused_tokens"] > 0) == continued  # dense is exact: it continues by default
