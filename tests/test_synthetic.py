"""apbv.synthetic: determinism, needles where the sample says (over grey and over real footage), answers that
follow from the frames, varied needles, the held-out sets, MP4s."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from apbv import footage
from apbv.synthetic import (
    COLORS,
    HELD_OUT_SEED,
    HELD_OUT_SETS,
    TASKS,
    background,
    held_out,
    main,
    make_dataset,
    make_sample,
    write_mp4,
)
from apbv.video import probe_video, read_video


def colored(frame: np.ndarray) -> np.ndarray:
    """Mask of saturated pixels (the distractor background is pure grey)."""
    f = frame.astype(int)
    return f.max(-1) - f.min(-1) > 60


def dominant_color(frame: np.ndarray) -> str:
    mean = frame[colored(frame)].mean(0)
    return min(COLORS, key=lambda c: np.abs(mean - COLORS[c]).sum())


def segments(indices: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for i in indices:
        if out and i == out[-1][-1] + 1:
            out[-1].append(i)
        else:
            out.append([i])
    return out


@pytest.mark.parametrize("scene", [None, *footage.SPLITS])
@pytest.mark.parametrize("task", TASKS)
def test_same_seed_same_sample_and_different_seeds_differ(task, scene):
    a, b = make_sample(7, 32, task=task, footage=scene), make_sample(7, 32, task=task, footage=scene)
    c = make_sample(8, 32, task=task, footage=scene)
    assert a.frames.tobytes() == b.frames.tobytes()
    assert (a.question, a.answer, a.needle_frames, a.choices) == (b.question, b.answer, b.needle_frames, b.choices)
    assert not np.array_equal(a.frames, c.frames)
    assert a.frames.shape == (32, 112, 112, 3) and a.frames.dtype == np.uint8
    assert a.answer in a.choices and a.task == task and a.footage == scene


@pytest.mark.parametrize("scene", [None, "train", "held_out"])
@pytest.mark.parametrize("seed", range(3))
def test_needles_are_where_the_sample_says(seed, scene):
    """The sample is its own background (drawn from a stream of its own) except on the needle frames."""
    for task in TASKS:
        s = make_sample(seed, 40, (96, 128), task, footage=scene)
        plain = background(seed, 40, (96, 128), scene)
        changed = [i for i in range(40) if not np.array_equal(s.frames[i], plain[i])]
        assert changed == s.needle_frames, task
        lengths = {len(seg) for seg in segments(s.needle_frames)}
        assert len(lengths) == 1 and lengths <= {1, 2, 3, 4}, task  # one drawn length per sample
        assert sorted(segments(s.needle_frames)) == segments(s.needle_frames)


def test_needles_vary_in_length_size_and_opacity():
    lengths, areas, opacities = set(), [], []
    for seed in range(40):
        s = make_sample(seed, 32, task="color")
        lengths.add(len(s.needle_frames))
        frame, plain = s.frames[s.needle_frames[0]].astype(float), background(seed, 32, (112, 112))[s.needle_frames[0]]
        mask = np.abs(frame - plain).max(-1) > 0
        areas.append(mask.mean())
        fill = np.array(COLORS[s.answer], float)  # inside the shape: alpha * fill + (1 - alpha) * background
        per_pixel = ((frame - plain)[mask] * (fill - plain[mask])).sum(-1) / ((fill - plain[mask]) ** 2).sum(-1)
        opacities.append(np.median(per_pixel))  # the median ignores the dark outline
    assert lengths == {1, 2, 3, 4}
    assert min(areas) < 0.1 and max(areas) > 0.25  # shapes from 0.3 to 0.6 of the side
    assert 0.74 < min(opacities) < 0.85 and 0.93 < max(opacities) <= 1.01
    count = [make_sample(seed, 16, task="count") for seed in range(20)]  # 4 needles fit only when short
    assert max(len(s.needle_frames) for s in count if s.answer == "4") <= 8


@pytest.mark.parametrize("seed", range(6))
def test_answers_follow_from_the_frames(seed):
    color = make_sample(seed, 32, task="color")
    assert dominant_color(color.frames[color.needle_frames[0]]) == color.answer
    order = make_sample(seed, 32, task="order")
    first, second = segments(order.needle_frames)
    assert dominant_color(order.frames[first[0]]) == order.answer
    assert {dominant_color(order.frames[second[0]]), order.answer} == set(order.choices)
    assert all(c in order.question for c in order.choices)
    count = make_sample(seed, 48, task="count")
    assert len(segments(count.needle_frames)) == int(count.answer)
    assert all(dominant_color(count.frames[seg[0]]) in count.question for seg in segments(count.needle_frames))


def test_held_out_sets():
    real, grey = held_out(2, 24, "word", "footage"), held_out(2, 24, "word", "grey")
    assert (real.footage, grey.footage) == ("held_out", None) and set(HELD_OUT_SETS) == {"footage", "grey"}
    assert real.answer == grey.answer and real.needle_frames == grey.needle_frames  # one seed, two backgrounds
    assert np.array_equal(real.frames, make_sample(HELD_OUT_SEED + 2, 24, task="word", footage="held_out").frames)
    with pytest.raises(ValueError, match="unknown held-out set"):
        held_out(0, 16, "color", "train")


def test_too_few_frames_for_the_needles():
    with pytest.raises(ValueError, match="too few"):
        make_sample(0, 3, task="color", needle_len=4)
    with pytest.raises(ValueError, match="unknown task"):
        make_sample(0, 16, task="weather")


def test_dataset_is_deterministic_and_lazy():
    ds = make_dataset(3, 12, num_frames=(16, 24))
    assert len(ds) == 12 and [ds[i].task for i in range(6)] == list(TASKS)
    assert all(16 <= len(ds[i].frames) <= 24 for i in range(12))
    assert ds[5].frames.tobytes() == make_dataset(3, 12, num_frames=(16, 24))[5].frames.tobytes()
    assert ds[-1].question == ds[11].question
    assert not np.array_equal(ds[0].frames[:16], make_dataset(4, 12, num_frames=(16, 24))[0].frames[:16])
    with pytest.raises(IndexError):
        ds[12]


@pytest.mark.parametrize("codec", ["libx264", "mpeg4"])
def test_written_mp4_reads_back(tmp_path, codec):
    s = make_sample(1, 24, (112, 112), "color")
    path = write_mp4(s.frames, tmp_path / "a.mp4", fps=8.0, codec=codec)
    assert write_mp4(s.frames, tmp_path / "b.mp4", fps=8.0, codec=codec).read_bytes() == path.read_bytes()
    info = probe_video(path)
    assert (info.frame_count, info.fps, info.codec) == (24, 8.0, {"libx264": "h264"}.get(codec, codec))
    v = read_video(path, num_frames=24, min_pixels=28 * 28)
    assert v.frames.shape == (24, 112, 112, 3)
    assert np.abs(v.frames.astype(int) - s.frames).mean() < 6
    assert dominant_color(v.frames[s.needle_frames[0]]) == s.answer  # the needle survives compression


@pytest.mark.parametrize("scene", [None, "held_out"])
def test_cli_writes_examples_with_sidecars(tmp_path, scene):
    main(["--out", str(tmp_path), "--n", "2", "--frames", "32", "--needle-len", "4", "--tasks", "shape", "digit",
          *(["--footage", scene] if scene else [])])  # fmt: skip
    sidecars = sorted(tmp_path.glob("*.json"))
    prefix = "unseen_footage" if scene else "synthetic"
    assert [f.stem for f in sidecars] == [f"{prefix}_{i}_{t}" for i, t in enumerate(("shape", "digit"))]
    assert len(list(tmp_path.glob("*.mp4"))) == 2
    for i, file in enumerate(sidecars):
        meta = json.loads(file.read_text())
        sample = make_dataset(0, 2, 32, tasks=("shape", "digit"), needle_len=4, footage=scene)[i]
        assert (meta["question"], meta["answer"], meta["needle_frames"], meta["footage"]) == (
            sample.question, sample.answer, sample.needle_frames, scene)  # fmt: skip
        assert probe_video(file.with_suffix(".mp4")).frame_count == 32


@pytest.mark.parametrize("sidecar", sorted((Path(__file__).parent.parent / "assets" / "examples").glob("*.json")),
                         ids=lambda p: p.stem)  # fmt: skip
def test_shipped_examples_are_what_their_sidecars_say(sidecar):
    """Each bundled example decodes to the sample its sidecar names (same question, answer, needles, frames)."""
    meta = json.loads(sidecar.read_text())
    sample = make_dataset(meta["seed"], meta["index"] + 1, meta["num_frames"], tasks=meta["tasks"],
                          needle_len=meta["needle_len"], footage=meta["footage"])[meta["index"]]  # fmt: skip
    assert (meta["question"], meta["answer"], meta["needle_frames"]) == (
        sample.question, sample.answer, sample.needle_frames)  # fmt: skip
    video = read_video(sidecar.with_suffix(".mp4"), num_frames=meta["num_frames"], min_pixels=28 * 28)
    assert video.frames.shape == sample.frames.shape and meta["fps"] == probe_video(sidecar.with_suffix(".mp4")).fps
    assert np.abs(video.frames.astype(int) - sample.frames).mean() < 8
