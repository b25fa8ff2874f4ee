"""apbv.synthetic: determinism, needles where the sample says, answers that follow from the frames, MP4s."""

from __future__ import annotations

import json

import numpy as np
import pytest

from apbv.synthetic import COLORS, TASKS, main, make_dataset, make_sample, write_mp4
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


@pytest.mark.parametrize("task", TASKS)
def test_same_seed_same_sample_and_different_seeds_differ(task):
    a, b, c = make_sample(7, 32, task=task), make_sample(7, 32, task=task), make_sample(8, 32, task=task)
    assert a.frames.tobytes() == b.frames.tobytes()
    assert (a.question, a.answer, a.needle_frames, a.choices) == (b.question, b.answer, b.needle_frames, b.choices)
    assert not np.array_equal(a.frames, c.frames)
    assert a.frames.shape == (32, 112, 112, 3) and a.frames.dtype == np.uint8
    assert a.answer in a.choices and a.task == task


@pytest.mark.parametrize("seed", range(4))
def test_needles_are_where_the_sample_says(seed):
    for task in TASKS:
        s = make_sample(seed, 40, (96, 128), task, needle_len=3)
        marked = [i for i in range(40) if (colored(s.frames[i]).any() or (s.frames[i] == 255).all(-1).sum() > 200)]
        assert marked == s.needle_frames, task  # white cards count as needles too
        assert all(len(seg) == 3 for seg in segments(s.needle_frames))


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


def test_cli_writes_examples_with_sidecars(tmp_path):
    main(["--out", str(tmp_path), "--n", "2", "--frames", "32", "--needle-len", "4"])
    sidecars = sorted(tmp_path.glob("*.json"))
    assert len(sidecars) == 2 and len(list(tmp_path.glob("*.mp4"))) == 2
    for i, file in enumerate(sidecars):
        meta = json.loads(file.read_text())
        sample = make_dataset(0, 2, 32, needle_len=4)[i]
        assert (meta["question"], meta["answer"], meta["needle_frames"]) == (
            sample.question, sample.answer, sample.needle_frames)  # fmt: skip
        assert probe_video(file.with_suffix(".mp4")).frame_count == 32
