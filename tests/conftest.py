"""Shared fixtures: MP4s and bad files written by the tests themselves, the tiny tokenizer and checkpoint,
recorded engine results, and the real engine pool (embedded model, CPU, 2 ranks)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never touch the network
os.environ["APBV_TEST_RUN"] = str(os.getpid())  # tests/realtime_guard.py's mark of this run's processes

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Iterator  # noqa: E402

import av  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from apbv.engine.api import Result  # noqa: E402
from apbv.synthetic import write_mp4  # noqa: E402
from ui.examples import load_examples  # noqa: E402

RECORDED = Path(__file__).parent / "data" / "recorded_results.json"
GUARD_LOG = Path(__file__).parents[1] / "test-artifacts" / "realtime_guard.log"


def pytest_configure(config) -> None:
    """Start tests/realtime_guard.py (before any test starts a process, which would inherit a real-time policy),
    writing to the run's real output (its first scan also puts back a runner started at a real-time policy); it
    exits with the runner."""
    GUARD_LOG.parent.mkdir(exist_ok=True)
    GUARD_LOG.unlink(missing_ok=True)
    output = os.dup(1)  # the terminal's: pytest captures fd 1 later
    guard = [sys.executable, str(Path(__file__).with_name("realtime_guard.py")), str(os.getpid()), str(GUARD_LOG)]
    config.realtime_guard = subprocess.Popen([*guard, str(output)], pass_fds=(output,))
    os.close(output)


def pytest_unconfigure(config) -> None:
    guard = getattr(config, "realtime_guard", None)
    if guard is not None:
        guard.terminate()
        guard.wait()


def pytest_terminal_summary(terminalreporter) -> None:
    if GUARD_LOG.exists():
        terminalreporter.section("threads found at a real-time policy and put back to SCHED_OTHER")
        terminalreporter.write(GUARD_LOG.read_text())


SOURCE_FRAMES = 40
SOURCE_FPS = 8.0


def grey_ramp(num_frames: int, size: tuple[int, int] = (112, 160)) -> np.ndarray:
    """Flat frames whose grey level encodes the frame index (6 levels apart), to identify sampled frames."""
    levels = (10 + 6 * np.arange(num_frames)).astype(np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (num_frames, *size, 3)).copy()


def frame_index(frame: np.ndarray) -> int:
    """Index of a grey_ramp frame after compression and resizing."""
    return int(round((float(frame.mean()) - 10) / 6))


@pytest.fixture(scope="session")
def videos(tmp_path_factory) -> dict[str, Path]:
    """Good and bad video files, keyed by kind."""
    d = tmp_path_factory.mktemp("videos")
    good = write_mp4(grey_ramp(SOURCE_FRAMES), d / "ramp.mp4", SOURCE_FPS)
    data = good.read_bytes()
    faststart = _faststart(grey_ramp(SOURCE_FRAMES), d / "fs.mp4")
    contents = {
        "text": b"this is a text file, not a video\n" * 20,
        "empty": b"",
        "truncated": data[: len(data) // 2],  # the index (moov, written last) is lost
        "truncated_faststart": faststart[: len(faststart) // 2],  # index intact, media data cut
    }
    files = {"ramp": good, "missing": d / "missing.mp4"}
    for kind, content in contents.items():
        files[kind] = d / f"{kind}.mp4"
        files[kind].write_bytes(content)
    files["zero_frames_mp4"] = _no_frames(d / "zero.mp4", "libx264")
    files["zero_frames_avi"] = _no_frames(d / "zero.avi", "mpeg4")
    return files


def _faststart(frames: np.ndarray, path: Path) -> bytes:
    """MP4 with the index before the media data, so that a truncated copy still opens."""
    with av.open(str(path), "w", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=int(SOURCE_FPS))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path.read_bytes()


def _no_frames(path: Path, codec: str) -> Path:
    """A container written with a video stream and no frames at all."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=8)
        stream.width = stream.height = 112
        stream.pix_fmt = "yuv420p"
        container.start_encoding()
        container.mux(stream.encode())
    return path


@pytest.fixture(scope="session")
def tokenizer():
    from apbv.model.tiny import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    from apbv.model.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir).eval()


def load_recorded(path: Path = RECORDED) -> list[Result]:
    """The results in a recording written by `python -m tests.data.record_results`."""
    return [Result.from_dict(d) for d in json.loads(path.read_text())["results"]]


@pytest.fixture(scope="session")
def recorded() -> list[Result]:
    return load_recorded()


@pytest.fixture(scope="session")
def example_video() -> str:
    """The first bundled example video (assets/examples/)."""
    return load_examples()[0].video


@pytest.fixture(scope="session")
def pool() -> Iterator:
    """The real engine pool: embedded default model, CPU, 2 ranks."""
    from apbv.engine.pool import EnginePool

    with EnginePool(world_size=2, device="cpu") as p:
        yield p
