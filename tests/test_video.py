"""apbv.video: sampling, resizing and typed errors, with both readers, on files the tests write."""

from __future__ import annotations

import av
import numpy as np
import pytest

from apbv import video as video_mod
from apbv.errors import NoFrames, VideoNotFound, VideoUnreadable
from apbv.video import (
    estimate_visual_tokens,
    frame_size,
    probe_video,
    read_video,
    sample_frame_count,
    smart_resize,
    synthetic_video,
)
from tests.conftest import SOURCE_FPS, SOURCE_FRAMES, frame_index, grey_ramp

BACKENDS = ["decord", "pyav"]


def test_smart_resize_matches_transformers():
    hf = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    bounds = [(4 * 28 * 28, 16384 * 28 * 28), (128 * 28 * 28, 768 * 28 * 28), (56 * 56, 28 * 28 * 64)]
    for height in (29, 100, 112, 360, 481, 720, 1080, 1440, 2000):
        for width in (50, 112, 333, 640, 1280, 1920, 2560):
            for lo, hi in bounds:
                assert smart_resize(height, width, 28, lo, hi) == hf.smart_resize(height, width, 28, lo, hi)


@pytest.mark.parametrize(
    "name, merged_grid", [("360p", (13, 23)), ("720p", (26, 46)), ("1080p", (39, 69)), ("1440p", (51, 91))]
)
def test_synthetic_video_token_counts_match_spec(name, merged_grid):
    """Spec §6.3: the speed test's resolutions and their merged grids per temporal patch."""
    v = synthetic_video(name, num_frames=1, seed=3)
    assert v.frames.shape == (2, merged_grid[0] * 28, merged_grid[1] * 28, 3)
    assert np.array_equal(v.frames[0], v.frames[1])  # odd count padded by repeating the last frame
    assert v.sample_fps == 2.0  # second_per_grid_t = 1
    h, w = (int(x) for x in video_mod.RESOLUTIONS[name])
    assert estimate_visual_tokens(h, w, 2, max_pixels=16384 * 28 * 28, total_pixels=10**12) == np.prod(merged_grid)


def test_synthetic_video_deterministic():
    a, b, c = (synthetic_video((56, 84), 4, seed) for seed in (1, 1, 2))
    assert np.array_equal(a.frames, b.frames) and not np.array_equal(a.frames, c.frames)


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({}, 10),  # 40 frames at 8 fps = 5 s, 2 fps -> 10
        ({"fps": 1.0}, 4),  # 5 frames raised to the minimum of 4
        ({"fps": 4.0}, 20),
        ({"fps": 100.0}, 40),  # never more than the video has
        ({"fps": 4.0, "max_frames": 13}, 12),
        ({"num_frames": 7}, 8),  # rounded to even (round half to even: 3.5 -> 4)
        ({"num_frames": 5}, 4),
        ({"num_frames": 1}, 2),  # at least one temporal patch
        ({"num_frames": 99}, 40),
    ],
)
def test_sample_frame_count(kwargs, expected):
    assert sample_frame_count(SOURCE_FRAMES, SOURCE_FPS, **kwargs) == expected


def test_sample_frame_count_short_video():
    assert sample_frame_count(1, 30.0) == 2  # a single frame is read twice
    assert sample_frame_count(3, 30.0, num_frames=8) == 2
    with pytest.raises(ValueError):
        sample_frame_count(40, 8.0, num_frames=4, fps=2.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_video_samples_uniformly(videos, backend):
    v = read_video(videos["ramp"], backend=backend)
    assert v.frames.dtype == np.uint8 and v.frames.ndim == 4 and v.frames.shape[-1] == 3
    assert v.num_frames == 10
    expected = np.linspace(0, SOURCE_FRAMES - 1, 10).round().astype(int).tolist()
    assert [frame_index(f) for f in v.frames] == expected
    assert v.sample_fps == pytest.approx(10 / SOURCE_FRAMES * SOURCE_FPS)
    assert v.source_fps == pytest.approx(SOURCE_FPS)
    assert v.duration_s == pytest.approx(SOURCE_FRAMES / SOURCE_FPS)
    assert v.source_path == str(videos["ramp"])
    h, w = v.size
    assert h % 28 == 0 and w % 28 == 0
    assert (h, w) == frame_size(112, 160, 10)  # 112x160 is below min_pixels: scaled up, aspect kept
    assert h * w >= video_mod.VIDEO_MIN_PIXELS and abs(w / h - 160 / 112) < 0.1


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_video_counts_and_pixel_bounds(videos, backend):
    v = read_video(videos["ramp"], num_frames=7, min_pixels=28 * 28, max_pixels=56 * 56 * 4, backend=backend)
    assert v.num_frames == 8 and v.frames.shape[1:3] == (84, 112)  # smart_resize(112, 160) under the cap
    v = read_video(videos["ramp"], num_frames=3, min_pixels=28 * 28, backend=backend)
    assert v.num_frames == 4 and v.frames.shape[1:3] == (112, 168)
    v = read_video(videos["ramp"], num_frames=40, min_pixels=28 * 28, total_pixels=28 * 28 * 40, backend=backend)
    assert v.frames.shape[1] * v.frames.shape[2] <= max(28 * 28 * 40 / 40 * 2, 28 * 28 * 1.05)


def test_readers_agree(videos):
    a = read_video(videos["ramp"], num_frames=12, backend="decord").frames.astype(int)
    b = read_video(videos["ramp"], num_frames=12, backend="pyav").frames.astype(int)
    assert a.shape == b.shape and np.abs(a - b).max() <= 2


def test_pyav_fallback_without_decord(videos, monkeypatch):
    monkeypatch.setattr(video_mod, "decord", None)
    v = read_video(videos["ramp"], num_frames=6)
    assert [frame_index(f) for f in v.frames] == np.linspace(0, 39, 6).round().astype(int).tolist()
    with pytest.raises(ValueError, match="decord is not installed"):
        read_video(videos["ramp"], backend="decord")


def test_decord_failure_falls_back_to_pyav(videos, monkeypatch):
    class Broken:
        def __init__(self, *args):
            raise RuntimeError("decord cannot open this")

    monkeypatch.setattr(video_mod, "_DecordReader", Broken)
    assert read_video(videos["ramp"], num_frames=4).num_frames == 4
    with pytest.raises(VideoUnreadable, match="decord cannot read"):
        read_video(videos["ramp"], backend="decord")


@pytest.mark.parametrize("backend", BACKENDS)
def test_container_without_frame_count(tmp_path, backend):
    """Matroska headers carry no frame count: it is counted from the packets."""
    path = tmp_path / "ramp.mkv"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.height, stream.width, stream.pix_fmt = 112, 112, "yuv420p"
        for frame in grey_ramp(12, (112, 112)):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    assert probe_video(path).frame_count == 12
    v = read_video(path, num_frames=12, backend=backend)
    assert [frame_index(f) for f in v.frames] == list(range(12))


def test_probe_video(videos):
    info = probe_video(videos["ramp"])
    assert (info.frame_count, info.fps, info.height, info.width) == (SOURCE_FRAMES, SOURCE_FPS, 112, 160)
    assert info.duration_s == pytest.approx(5.0)


@pytest.mark.parametrize("backend", [None, *BACKENDS])
@pytest.mark.parametrize(
    "kind, error",
    [
        ("missing", VideoNotFound),
        ("text", VideoUnreadable),
        ("empty", VideoUnreadable),
        ("truncated", VideoUnreadable),
        ("truncated_faststart", VideoUnreadable),
        ("zero_frames_mp4", NoFrames),
        ("zero_frames_avi", NoFrames),
    ],
)
def test_bad_files_raise_typed_one_line_errors(videos, kind, error, backend):
    with pytest.raises(error) as info:
        read_video(videos[kind], backend=backend)
    message = str(info.value)
    assert message and "\n" not in message and len(message) < 300
    assert videos[kind].name in message


def test_directory_is_not_a_video(tmp_path):
    with pytest.raises(VideoUnreadable, match="is a directory"):  # it exists: not "no such video file"
        read_video(tmp_path)
