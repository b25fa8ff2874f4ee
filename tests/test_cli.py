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


def _ask(*args: str, launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run the CLI (through `launcher`, e.g. torchrun, when given) and check that nothing it started lives on."""
    marker = f"APBV_TEST_RUN={uuid.uuid4().hex}"
    key, value = marker.split("=")
    env = {**os.environ, key: value, "HF_HUB_OFFLINE": "1"}
    cmd = [*(launcher or (sys.executable,)), "-m", "apbv", "ask", *args, "--device", "cpu", "--max-new-tokens", "4"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    assert processes_with(marker) == []  # no worker outlives the CLI
    return done


def test_ask_prints_the_answer(example_video):
    done = _ask(example_video, "What color was the shape?", "--frames", "8", "--world-size", "2")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() and "Traceback" not in done.stderr


TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port")


@pytest.mark.parametrize("launcher", ["pool", "torchrun"])
def test_ask_json_prints_one_result_object(example_video, launcher):
    """Through the CLI's own pool, and as two torchrun ranks (the one-shot channel)."""
    args = (example_video, "What color was the shape?", "--frames", "8", "--json")
    if launcher == "pool":
        done = _ask(*args, "--world-size", "2")
    else:
        done = _ask(*args, launcher=(*TORCHRUN, str(free_port())))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)  # the whole of stdout is one JSON object
    assert result["answer"] and 1 <= len(result["token_ids"]) <= 4
    assert result["visual_tokens"] > 0 and [r["rank"] for r in result["ranks"]] == [0, 1]


@pytest.mark.parametrize("kind", ["text", "missing"])
def test_bad_input_exits_2_with_one_line(videos, kind):
    done = _ask(str(videos[kind]), "What color was the shape?", "--frames", "8", "--world-size", "2")
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stdout == ""
