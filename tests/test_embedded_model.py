"""The shipped model (assets/model): loads offline, reads videos at its own size, answers questions about needles
drawn over real footage held out from its training (`apbv.footage`) and over the grey backgrounds: every answer one
of its closed set (answers.json constrains decoding), each task at no less than the accuracy it was shipped with
(LEAST_ACCURACY: the measured accuracy less about two standard errors of 20 samples; NOTES.md has the measured
table, below issue 16's targets on real footage), and held-out videos right through the engine's job path, dense
on one rank and APB-V on two gloo processes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from apbv.attention.config import AttentionConfig
from apbv.comm import Comm
from apbv.config import Limits
from apbv.engine.api import Request
from apbv.engine.job import prepare_job, run_job
from apbv.metrics import MetricsRecorder
from apbv.model.loading import EMBEDDED_MODEL, default_model_path, load_model
from apbv.qa import ask
from apbv.synthetic import ANSWERS, FRAME_SIZE, TASKS, as_video, held_out, write_mp4
from tests.distributed import run_ranks

pytestmark = pytest.mark.skipif(not (EMBEDDED_MODEL / "config.json").exists(), reason="no trained model shipped")

FRAMES = 32
HELD_OUT_INDEX = 3
SAMPLES = 20  # held-out videos per task and set in the accuracy test
LEAST_ACCURACY = {  # per held-out set; the shipped model measured 40 per cell at 16 and 64 frames (NOTES.md)
    "footage": {"color": 0.8, "shape": 0.3, "digit": 0.6, "word": 0.2, "order": 0.5, "count": 0.15},
    "grey": {"color": 0.9, "shape": 0.65, "digit": 0.85, "word": 0.45, "order": 0.75, "count": 0.25},
}


@pytest.fixture(scope="module")
def loaded():
    return load_model(None, torch.device("cpu"))


@pytest.mark.slow
@pytest.mark.parametrize("held_out_set", ("footage", "grey"))
@pytest.mark.parametrize("task", TASKS)
def test_held_out_accuracy_and_closed_answers(loaded, task, held_out_set):
    answers, truths = [], []
    for i in range(SAMPLES):
        sample = held_out(i, FRAMES, task, held_out_set)
        answers.append(ask(loaded, as_video(sample), sample.question, AttentionConfig("dense")).text)
        truths.append(sample.answer)
        assert answers[-1] in ANSWERS, (i, answers[-1])  # never "gre4" or "ssss"
    accuracy = sum(a == t for a, t in zip(answers, truths)) / SAMPLES
    assert accuracy >= LEAST_ACCURACY[held_out_set][task], list(zip(answers, truths))


@pytest.fixture(scope="module", params=("color", "shape", "digit", "word", "order"))
def sample_video(request, tmp_path_factory) -> tuple[Path, str, str]:
    sample = held_out(HELD_OUT_INDEX, FRAMES, request.param, "footage")
    path = write_mp4(sample.frames, tmp_path_factory.mktemp("embedded") / "needle.mp4", fps=8.0)
    return path, sample.question, sample.answer


def test_embedded_model_is_the_default_and_small():
    assert default_model_path() == EMBEDDED_MODEL
    assert sum(f.stat().st_size for f in EMBEDDED_MODEL.iterdir()) < 8 << 20
    loaded = load_model(None, torch.device("cpu"))
    assert dict(loaded.spec.read_pixels)["max_pixels"] == FRAME_SIZE[0] * FRAME_SIZE[1]
    assert loaded.rank_model.config.text_config.num_hidden_layers >= 2


def _answer(rank: int, world_size: int, video: str, question: str, strategy: str) -> str:
    """One rank of the engine's job path: every rank prepares the same header and takes its own frames."""
    torch.set_num_threads(1)
    loaded = load_model(None, torch.device("cpu"))
    request = Request(video, question, strategy=strategy, world_size=world_size, num_frames=FRAMES, max_new_tokens=8)
    metrics = MetricsRecorder(rank, torch.device("cpu"))
    header = prepare_job("t", request, world_size, loaded, Limits(), metrics)
    assert header.video.size == FRAME_SIZE  # read at the model's size, not upsampled to 336x336
    comm = Comm.single() if world_size == 1 else Comm()
    ids = list(run_job(header, loaded.rank_model, loaded.spec, comm, metrics, lambda: False))
    return loaded.tokenizer.decode(ids, skip_special_tokens=True).strip()


def test_answers_held_out_video_dense(sample_video):
    """Through the job path from the file: an answer of the closed set, and the right one for colours (1.00 and 0.90
    at 16 and 64 frames on held-out footage; the other tasks are not that reliable yet)."""
    path, question, answer = sample_video
    got = _answer(0, 1, str(path), question, "dense")
    assert got in ANSWERS and (got == answer or "color" not in question)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_answers_held_out_video_apbv_two_processes(sample_video):
    """APB-V on two processes gives the dense answer, on every rank."""
    path, question, _ = sample_video
    dense = _answer(0, 1, str(path), question, "dense")
    assert run_ranks(2, _answer, str(path), question, "apbv", timeout=120) == [dense, dense]
