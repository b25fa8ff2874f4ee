"""Header-only video facts, frame sampling, and bundled examples."""

from __future__ import annotations

import json

from apbv.synthetic import make_sample, write_mp4
from ui.examples import load_examples
from ui.video_info import VideoInfo, probe, sampled_frames


def _clip(path, frames: int) -> str:
    return str(write_mp4(make_sample(0, num_frames=frames, size=(64, 96)).frames, path, fps=8))


def test_probe_reads_the_header(tmp_path):
    info = probe(_clip(tmp_path / "v.mp4", 24))
    assert (info.width, info.height, info.frame_count, info.fps) == (96, 64, 24, 8.0)
    assert abs(info.duration_s - 3.0) < 0.2


def test_probe_rejects_non_videos(tmp_path):
    (tmp_path / "x.mp4").write_text("not a video")
    assert probe(str(tmp_path / "x.mp4")) is None
    assert probe(str(tmp_path / "missing.mp4")) is None


def test_sampled_frames_prefers_count_then_fps_capped_at_the_file():
    info = VideoInfo(frame_count=100, fps=10.0, height=64, width=64, codec="h264")
    assert sampled_frames(info, 32, 2.0) == 32
    assert sampled_frames(info, None, 2.0) == 20
    assert sampled_frames(info, 500, None) == 100


def test_examples_pair_videos_with_sidecars(tmp_path):
    assert load_examples(tmp_path) == []
    _clip(tmp_path / "b.mp4", 4)
    _clip(tmp_path / "a.mp4", 4)
    (tmp_path / "a.json").write_text(json.dumps({"question": "What moves?", "answer": "A red square."}))
    a, b = load_examples(tmp_path)
    assert (a.question, a.answer, b.question) == ("What moves?", "A red square.", "")
    assert a.video.endswith("a.mp4")
