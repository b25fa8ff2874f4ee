"""apbv.video: qwen-vl-utils' sampling and sizes, the probe, per-rank decoding, the resize, typed errors, on files the
tests write."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from apbv import video as video_mod
from apbv.errors import InputError, NoFrames, VideoNotFound, VideoUnreadable
from apbv.inputs import ProcessorSpec, shard_frames, temporal_shards
from apbv.video import decode as decode_module
from apbv.video import (
    decode_frames,
    estimate_visual_tokens,
    frame_size,
    plan_video,
    probe_video,
    read_video,
    resize_frames,
    sample_frame_count,
    smart_resize,
    synthetic_video,
)
from tests.conftest import SOURCE_FPS, SOURCE_FRAMES, frame_index, grey_ramp
from tests.reference import antialiased_bicubic


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
    pixels = {"max_pixels": 16384 * 28 * 28, "total_pixels": 10**12, "uncapped": True}
    assert estimate_visual_tokens(h, w, 2, **pixels) == np.prod(merged_grid)


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


def test_read_video_samples_uniformly(videos):
    v = read_video(videos["ramp"])
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


def test_max_pixels_lowers_the_cap_but_never_raises_it_unless_asked():
    """qwen-vl-utils: a given max_pixels is min()-ed with the per-frame cap (768 * 28 * 28 at most); below min_pixels
    it refuses. `uncapped` is this project's option to go beyond."""
    cap = video_mod.VIDEO_MAX_PIXELS
    assert frame_size(720, 1280, 16, max_pixels=921_600) == frame_size(720, 1280, 16) == smart_resize(720, 1280, 28, video_mod.VIDEO_MIN_PIXELS, cap)
    assert frame_size(720, 1280, 16, max_pixels=921_600, uncapped=True) == (700, 1260)  # 5,625 tokens, not 3,600
    assert frame_size(720, 1280, 16, max_pixels=200_000) == smart_resize(720, 1280, 28, video_mod.VIDEO_MIN_PIXELS, 200_000)
    with pytest.raises(InputError, match="below the minimum"):
        frame_size(720, 1280, 16, max_pixels=90_000)


def test_read_video_counts_and_pixel_bounds(videos):
    v = read_video(videos["ramp"], num_frames=7, min_pixels=28 * 28, max_pixels=56 * 56 * 4)
    assert v.num_frames == 8 and v.frames.shape[1:3] == (84, 112)  # smart_resize(112, 160) under the cap
    v = read_video(videos["ramp"], num_frames=3, min_pixels=28 * 28)
    assert v.num_frames == 4 and v.frames.shape[1:3] == (112, 168)
    v = read_video(videos["ramp"], num_frames=40, min_pixels=28 * 28, total_pixels=28 * 28 * 40)
    assert v.frames.shape[1] * v.frames.shape[2] <= max(28 * 28 * 40 / 40 * 2, 28 * 28 * 1.05)


def test_processor_bounds_resize_a_second_time(videos):
    """Frames qwen-vl-utils sized outside the checkpoint processor's bounds are resized again, as transformers'
    video processor does; within them, once."""
    plan = plan_video(videos["ramp"], num_frames=4, processor_bounds=(28 * 28, 56 * 56))
    assert plan.sizes == (frame_size(112, 160, 4), smart_resize(*frame_size(112, 160, 4), 28, 28 * 28, 56 * 56))
    assert plan_video(videos["ramp"], num_frames=4, processor_bounds=(3136, 12845056)).sizes == (frame_size(112, 160, 4),)
    assert read_video(videos["ramp"], num_frames=4, processor_bounds=(28 * 28, 56 * 56)).size == plan.size


@pytest.mark.parametrize("size", [(336, 476), (56, 84), (140, 84)])
def test_resize_equals_a_float64_reference_of_torchvision_within_one_level(size):
    frames = np.random.default_rng(1).integers(0, 256, (3, 112, 160, 3), dtype=np.uint8)
    expected = np.clip(antialiased_bicubic(frames, size), 0, 255).round()
    for chunk in (1, 2, None):
        got = resize_frames(torch.from_numpy(frames), size, chunk=chunk).numpy()
        assert got.dtype == np.uint8 and got.shape == (3, *size, 3)
        assert np.abs(got - expected).max() <= 1 and np.mean(got == expected) > 0.99


def _encode(path, frames: np.ndarray, container_kind: str = "mp4", gop: int = 4, pts: list[int] | None = None,
            codec: str = "libx264", options: dict[str, str] | None = None):  # fmt: skip
    """H.264 with B-frames (or `codec` with `options`) and a keyframe every `gop` frames; `pts` (in 1/1000 s) for
    variable frame rates."""
    options = {"g": str(gop), **(options if options is not None else {"keyint_min": str(gop), "bf": "2"})}
    with av.open(str(path), "w", format=container_kind if container_kind != "mp4" else None) as container:
        stream = container.add_stream(codec, rate=8, options=options)
        stream.height, stream.width, stream.pix_fmt = *frames.shape[1:3], "yuv420p"
        if pts is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for i, frame in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
            if pts is not None:
                vf.pts, vf.time_base = pts[i], Fraction(1, 1000)
            container.mux(stream.encode(vf))
        container.mux(stream.encode())
    return path


X265_QUIET = "log-level=error"


@pytest.fixture(scope="module")
def seekable(tmp_path_factory) -> dict:
    d, ramp = tmp_path_factory.mktemp("seek"), grey_ramp(40, (64, 96))
    vfr = np.cumsum([0] + [60 + 80 * (i % 3) for i in range(39)]).tolist()
    return {"cfr": _encode(d / "cfr.mp4", ramp), "vfr": _encode(d / "vfr.mp4", ramp, pts=vfr),
            "mkv": _encode(d / "count.mkv", ramp, "matroska"), "gop1": _encode(d / "intra.mp4", ramp, gop=1),
            "hevc": _encode(d / "hevc.mp4", ramp, gop=8, codec="libx265", options={"x265-params": X265_QUIET}),
            "hevc-layers": _encode(d / "layers.mp4", ramp, gop=8, codec="libx265",
                                   options={"x265-params": f"{X265_QUIET}:temporal-layers=3"}),
            "av1": _encode(d / "av1.mp4", ramp, gop=8, codec="libsvtav1", options={}),
            "vp9": _encode(d / "vp9.webm", ramp, "webm", gop=8, codec="libvpx-vp9", options={})}  # fmt: skip


@pytest.mark.parametrize("kind", ["cfr", "vfr", "mkv", "gop1", "hevc"])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("reseek_min_frames", [1, decode_module.RESEEK_MIN_FRAMES])
def test_each_rank_decodes_exactly_the_frames_of_the_single_reader(seekable, kind, world_size, reseek_min_frames,
                                                                   monkeypatch):  # fmt: skip
    """Per-rank decoding (seek to the keyframe before the rank's first frame, and again past the rest of a GOP with
    no frame wanted: on these short GOPs only when any skipped frame makes a jump worth it) returns the same
    frames, pixel for pixel, as decoding the whole file once, for constant and variable rates and a header without
    a frame count."""
    monkeypatch.setattr(decode_module, "RESEEK_MIN_FRAMES", reseek_min_frames)
    plan = plan_video(seekable[kind], num_frames=14)
    single = list(decode_frames(plan.path, plan.info, plan.indices))
    assert [frame_index(f) for f in single] == list(plan.indices)
    spec = ProcessorSpec()
    for patches in temporal_shards(plan.num_frames, world_size, spec):
        mine = shard_frames(plan.indices, patches, spec)
        got = list(decode_frames(plan.path, plan.info, mine))
        expected = single[spec.temporal_patch_size * patches.start : spec.temporal_patch_size * patches.stop]
        assert len(got) == len(mine) and all(np.array_equal(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize("kind, skips", [("cfr", True), ("vfr", True), ("mkv", True), ("hevc", True),
                                         ("hevc-layers", False), ("av1", False), ("vp9", False)])  # fmt: skip
@pytest.mark.parametrize("first", [1, 2])
def test_unwanted_frames_nothing_refers_to_are_skipped_and_the_wanted_ones_decode_exactly(seekable, kind, skips,
                                                                                          first):  # fmt: skip
    """H.264 and single-layer HEVC: the reader leaves non-reference frames it does not want undecoded; AV1 (whose
    decoder reads the setting once), VP9 and HEVC with temporal sub-layers decode every frame. Either way the frames
    it gives equal those of a plain decode of every frame, pixel for pixel (the first wanted frame is not the
    keyframe the decoder opens on)."""
    path, info = seekable[kind], probe_video(seekable[kind])
    with av.open(str(path)) as container:
        everything = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    wanted = list(range(first, len(everything), 5))
    got = list(decode_frames(path, info, wanted))
    assert len(got) == len(wanted) and all(np.array_equal(g, everything[i]) for g, i in zip(got, wanted))
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        must = decode_module._must_decode(wanted, info) if decode_module._skips_exactly(stream.codec_context) else None
        decoded = sum(1 for _ in decode_module._decode_skipping(container, stream, must))
    assert decoded < len(everything) if skips else decoded == len(everything)


@pytest.mark.parametrize("kind, codec", [("cfr", "h264"), ("hevc", "hevc"), ("av1", "av1"), ("vp9", "vp9")])
def test_probe_names_the_format_not_the_decoder(seekable, kind, codec):
    assert probe_video(seekable[kind]).codec == codec  # AV1's decoder is libdav1d; NVDEC and the page ask for "av1"


def test_variable_frame_rate_is_indexed_by_presentation_order(seekable):
    info = probe_video(seekable["vfr"])
    assert info.frame_count == 40 and len(info.frame_pts) == 40 and list(info.frame_pts) == sorted(info.frame_pts)
    assert info.keyframe_pts and set(info.keyframe_pts) <= set(info.frame_pts)
    frames = list(decode_frames(seekable["vfr"], info, [0, 13, 13, 39]))
    assert [frame_index(f) for f in frames] == [0, 13, 13, 39]


def test_indices_past_the_stream_repeat_its_last_frame(seekable, monkeypatch):
    info = probe_video(seekable["cfr"])
    frames = list(decode_frames(seekable["cfr"], info, [38, 39, 45]))
    assert [frame_index(f) for f in frames] == [38, 39, 39]
    monkeypatch.setattr(decode_module, "RESEEK_MIN_FRAMES", 1)  # the index past the end gets a seek of its own
    frames = list(decode_frames(seekable["cfr"], info, [3, 45, 50]))
    assert [frame_index(f) for f in frames] == [3, 39, 39]
    with pytest.raises(ValueError, match="ascending"):
        list(decode_frames(seekable["cfr"], info, [3, 1]))


def test_container_without_frame_count(tmp_path):
    """Matroska headers carry no frame count: it is counted from the packets."""
    path = tmp_path / "ramp.mkv"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.height, stream.width, stream.pix_fmt = 112, 112, "yuv420p"
        for frame in grey_ramp(12, (112, 112)):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    assert probe_video(path).frame_count == 12
    v = read_video(path, num_frames=12)
    assert [frame_index(f) for f in v.frames] == list(range(12))


def test_probe_video(videos):
    info = probe_video(videos["ramp"])
    assert (info.frame_count, info.fps, info.height, info.width) == (SOURCE_FRAMES, SOURCE_FPS, 112, 160)
    assert info.duration_s == pytest.approx(5.0)


def test_plan_identifies_the_content_not_the_path(videos, tmp_path):
    copy = tmp_path / "copy.mp4"
    copy.write_bytes(videos["ramp"].read_bytes())
    a, b = plan_video(videos["ramp"], num_frames=4), plan_video(copy, num_frames=4)
    assert a.content_hash == b.content_hash and a.path != b.path
    copy.write_bytes(videos["ramp"].read_bytes()[:-1] + b"x")
    assert plan_video(copy, num_frames=4).content_hash != a.content_hash


def test_a_probe_that_fails_stops_the_hashing_beside_it(tmp_path, monkeypatch):
    """A large file that is no video is refused without being read through by the hash (set beside the probe)."""
    from concurrent.futures import CancelledError

    from apbv.video import plan as plan_module

    big = tmp_path / "zeros.mp4"
    with open(big, "wb") as f:
        f.truncate(1 << 30)  # sparse: 1 GiB of zeros
    ended, hash_file = [], plan_module.content_hash

    def watched(path, stop):
        try:
            return hash_file(path, stop)
        except BaseException as e:
            ended.append(type(e))
            raise

    monkeypatch.setattr(plan_module, "content_hash", watched)
    with pytest.raises(VideoUnreadable):
        plan_video(big)
    assert ended == [CancelledError]


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
def test_bad_files_raise_typed_one_line_errors(videos, kind, error):
    with pytest.raises(error) as info:
        read_video(videos[kind])
    message = str(info.value)
    assert message and "\n" not in message and len(message) < 300
    assert videos[kind].name in message


def test_directory_is_not_a_video(tmp_path):
    with pytest.raises(VideoUnreadable, match="is a directory"):  # it exists: not "no such video file"
        read_video(tmp_path)
