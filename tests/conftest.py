"""Shared fixtures: recorded engine results, a small test video, the real engine pool (CPU, 2 ranks)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import av
import numpy as np
import pytest

from apbv.engine.api import Result
from ui.examples import load_examples

RECORDED = Path(__file__).parent / "data" / "recorded_results.json"


def load_recorded(path: Path = RECORDED) -> list[Result]:
    """The results in a recording written by `python -m tests.data.record_results`."""
    return [Result.from_dict(d) for d in json.loads(path.read_text())["results"]]


def write_test_video(path: Path, frames: int = 48, fps: int = 8, size: tuple[int, int] = (160, 120)) -> str:
    """An H.264 MP4 of a red square moving right on white: `frames` frames of `size` (w, h) at `fps`."""
    w, h = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            img = np.full((h, w, 3), 255, np.uint8)
            x = (i * 2) % (w - 20)
            img[h // 2 - 10 : h // 2 + 10, x : x + 20] = (220, 30, 30)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        container.mux(stream.encode())
    return str(path)


@pytest.fixture(scope="session")
def recorded() -> list[Result]:
    return load_recorded()


@pytest.fixture(scope="session")
def example_video(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The first bundled example video, or a generated one while assets/examples/ is empty."""
    examples = load_examples()
    return examples[0].video if examples else write_test_video(tmp_path_factory.mktemp("video") / "red_square.mp4")


@pytest.fixture(scope="session")
def pool() -> Iterator:
    """The real engine pool: embedded default model, CPU, 2 ranks."""
    from apbv.engine.pool import EnginePool

    with EnginePool(world_size=2, device="cpu") as p:
        yield p
