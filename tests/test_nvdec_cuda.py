"""CUDA + PyNvVideoCodec only: NVDEC gives the same frames as the CPU decoder (same indices, pixels within the
difference of two YUV-to-RGB conversions) for a rank's share of an H.264 file, seeking into its middle."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch

from apbv.engine.video_pipeline import decoded_chunks
from apbv.metrics import MetricsRecorder
from apbv.video import plan_video

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytest.importorskip("PyNvVideoCodec")


def _video(path: Path, frames: int = 96) -> Path:
    """Moving noise texture with a bright square: every frame differs clearly from its neighbours."""
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 256, (360 + frames * 3, 640, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=24, options={"g": "12", "crf": "12"})
        stream.height, stream.width, stream.pix_fmt = 360, 640, "yuv420p"
        for i in range(frames):
            frame = np.ascontiguousarray(texture[i * 3 : i * 3 + 360])
            frame[100:160, (i * 5) % 560 :][:, :60] = 255
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def test_nvdec_frames_match_the_cpu_decoder(tmp_path):
    path = str(_video(tmp_path / "noise.mp4"))
    plan = plan_video(path, num_frames=32)
    share = plan.indices[10:26]  # a rank's share: starts after a keyframe, so the decoder seeks
    cuda = torch.device("cuda", 0)
    metrics = MetricsRecorder(0, cuda)
    gpu = torch.cat(list(decoded_chunks(path, plan, share, 6, metrics, cuda, decoder="nvdec"))).float().cpu()
    assert metrics.counters["nvdec"] == 1
    every = plan_video(path, num_frames=96)  # all frames on the CPU, to tell neighbours apart
    cpu = torch.cat(list(decoded_chunks(path, every, every.indices, 96, MetricsRecorder(0, "cpu"), torch.device("cpu"))))
    cpu = cpu.float()
    for frame, index in zip(gpu, share):
        distances = {i: float((frame - cpu[i]).abs().mean()) for i in (index - 1, index, index + 1) if 0 <= i < 96}
        assert min(distances, key=distances.get) == index
        assert distances[index] < 3.0, distances  # two YUV->RGB conversions of the same frame
    print(f"NVDEC vs CPU: mean |diff| {float((gpu - cpu[list(share)]).abs().mean()):.3f} levels, "
          f"max {float((gpu - cpu[list(share)]).abs().max()):.0f}")
