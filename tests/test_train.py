"""The training script: deterministic batches over real footage and grey that never show the held-out footage, a
short real run that writes a checkpoint the engine loads and records the footage split and the evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from apbv import footage, synthetic
from apbv.inputs import ProcessorSpec, patchify
from apbv.model.loading import EMBEDDED_MODEL, load_model
from apbv.synthetic import FRAME_SIZE, TASKS
from apbv.train import (
    _SEEDS_PER_RUN,
    GREY_SHARE,
    NeedleClips,
    TrainingBatches,
    evaluate,
    main,
    make_example,
    training_footage,
)
from tests.footage_tracer import HELD_OUT_TRACER, using_bundle, write_tracer_bundle


def test_batches_are_a_pure_function_of_seed_and_step():
    def batches(seed: int) -> TrainingBatches:
        return TrainingBatches(10, 3, (8, 16), ("color", "digit"), seed=seed)

    a, first, again = batches(2), batches(2)[4], batches(2)[4]
    assert first.tasks == again.tasks and torch.equal(first.labels, again.labels)
    for key, value in first.model_kwargs.items():
        assert torch.equal(value, again.model_kwargs[key]), key
    pixels = first.model_kwargs["pixel_values_videos"][:10]
    assert not torch.equal(a[5].model_kwargs["pixel_values_videos"][:10], pixels)
    other_run = batches(3)[4]
    assert not torch.equal(other_run.model_kwargs["pixel_values_videos"][:10], pixels)


def test_labels_cover_only_the_answer_and_its_end_token():
    batch = TrainingBatches(4, 2, (8, 8), ("shape",), seed=0)[0]
    tokenizer = load_model(None, torch.device("cpu")).tokenizer
    for row, ids in zip(batch.labels, batch.model_kwargs["input_ids"]):
        targets = (row != -100).nonzero().flatten()
        assert torch.equal(row[targets], ids[targets])
        assert tokenizer.decode(ids[targets]) in {f"{shape}<|im_end|>" for shape in synthetic.SHAPES}
        assert targets.tolist() == list(range(targets[0], targets[0] + len(targets)))  # one contiguous answer


def test_frame_rates_are_drawn_from_the_given_range():
    """second_per_grid_ts = temporal patch (2 frames) / fps: the drawn rates stay inside --fps and spread over it."""
    rates = torch.cat([2 / TrainingBatches(20, 8, (4, 4), ("color",), seed=1, fps=(0.1, 8.0))[s].model_kwargs[
        "second_per_grid_ts"] for s in range(20)])  # fmt: skip
    assert 0.1 <= rates.min() and rates.max() <= 8.0 + 1e-4
    assert (rates < 0.5).any() and (rates > 2.0).any()  # log-uniform: about 37% below 0.5 fps, 31% above 2
    fixed = TrainingBatches(2, 8, (4, 4), ("color",), seed=1, fps=(3.0, 3.0))[0].model_kwargs["second_per_grid_ts"]
    assert torch.allclose(fixed, torch.full_like(fixed, 2 / 3))


def test_range_arguments_are_checked(tmp_path, capsys):
    for flag, bad in (("--frames", "1-8"), ("--frames", "9-8"), ("--fps", "0-8"), ("--fps", "x")):
        with pytest.raises(SystemExit):
            main(["--out", str(tmp_path / "m"), flag, bad])
        assert flag in capsys.readouterr().err


def test_needle_clips_are_one_patch_each_with_their_answer():
    needle_frames = set()
    clips = NeedleClips(5, 6, ("color", "shape", "digit"), seed=1)
    pixels, grid_thw, tasks, labels = clips[3]
    again = clips[3]
    assert torch.equal(pixels, again[0]) and torch.equal(labels, again[3])
    assert tasks == ("color", "shape", "digit") * 2 and grid_thw.tolist() == [[1, 8, 8]] * 6
    for j, (task, label) in enumerate(zip(tasks, labels.tolist())):
        seed = clips.first_seed + 3 * 6 + j
        sample = synthetic.make_sample(seed, 2, FRAME_SIZE, task, 1 + (18 + j) // 3 % 2, training_footage(seed))
        assert synthetic.RETRIEVAL_CHOICES[task][label] == sample.answer
        assert torch.equal(pixels[64 * j : 64 * (j + 1)], patchify(sample.frames, ProcessorSpec())[0])
        needle_frames.add(len(sample.needle_frames))
    assert needle_frames == {1, 2}  # the needle on one frame of the temporal patch, or on both
    with pytest.raises(ValueError, match="seeds"):  # more clips than the stage's half of the run's seeds
        NeedleClips(_SEEDS_PER_RUN // 2 + 1, 1, ("color",), seed=1)


def test_training_backgrounds_mix_grey_and_training_footage_only():
    scenes = [training_footage(seed) for seed in range(2000)]
    assert set(scenes) == {None, "train"} and abs(scenes.count(None) / 2000 - GREY_SHARE) < 0.03


def _held_out_rows(pixel_values: torch.Tensor) -> int:
    """Patch rows showing only the held-out tracer colour (a whole 14x14 x 2-frame patch of it)."""
    spec = ProcessorSpec()
    tracer = patchify(np.broadcast_to(np.array(HELD_OUT_TRACER, np.uint8), (2, 28, 28, 3)).copy(), spec)[0][0]
    return int(((pixel_values - tracer).abs().amax(1) < 0.1).sum())


def test_held_out_footage_never_reaches_training_batches(tmp_path, monkeypatch):
    """With every held-out source replaced by a cyan tracer, no training batch of either stage shows it, while the
    held-out set does (the check can fail)."""
    write_tracer_bundle(tmp_path / "tracer.npz")
    with using_bundle(monkeypatch, tmp_path / "tracer.npz"):
        batches = TrainingBatches(12, 6, (8, 64), TASKS, seed=4)
        assert all(_held_out_rows(batches[s].model_kwargs["pixel_values_videos"]) == 0 for s in range(12))
        clips = NeedleClips(8, 16, ("color", "shape", "digit", "word"), seed=4)
        assert all(_held_out_rows(clips[s][0]) == 0 for s in range(8))
        tokenizer, spec = load_model(None, torch.device("cpu")).tokenizer, ProcessorSpec()
        held_out = [make_example(tokenizer, spec, synthetic.held_out(i, 16, "color"), 2.0) for i in range(3)]
        assert all(_held_out_rows(e.pixel_values_videos) > 100 for e in held_out)


def test_short_training_run_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "model"
    main(["--out", str(out), "--vision-steps", "2", "--vision-batch", "3", "--steps", "3", "--batch", "2",
          "--frames", "8-8", "--warmup", "1", "--threads", "1", "--eval-n", "1", "--eval-frames", "8",
          "--tasks", "color"])  # fmt: skip
    record = json.loads((out / "training.json").read_text())
    assert record["steps"] == 3 and record["samples"] == 6 and record["command"].startswith("python -m")
    assert record["footage"]["split"] == {k: list(v) for k, v in footage.SPLIT.items()}
    assert record["footage"]["digest"] == footage.digest(footage.footage_files())
    for key in ("held_out_accuracy_dense", "held_out_outside_answer_set"):
        assert set(record[key]) == {"footage", "grey"} and set(record[key]["footage"]["8"]) == {"color"}
        assert record[key]["grey"]["8"]["color"] in (0.0, 1.0)
    loaded = load_model(str(out), torch.device("cpu"))
    assert dict(loaded.spec.read_pixels)["max_pixels"] == FRAME_SIZE[0] * FRAME_SIZE[1]

    main(["--out", str(out), "--evaluate-only", "--eval-n", "1", "--eval-frames", "6", "--eval-fps", "0.5",
          "--tasks", "color", "word", "--eval-sets", "footage", "--threads", "1"])  # fmt: skip
    record = json.loads((out / "training.json").read_text())
    accuracy, outside = record["held_out_accuracy_dense"], record["held_out_outside_answer_set"]
    assert set(accuracy["footage"]) == {"8", "6@0.5fps"} and set(accuracy["grey"]) == {"8"}
    assert set(accuracy["footage"]["6@0.5fps"]) == {"color", "word"} == set(outside["footage"]["6@0.5fps"])


def test_continued_run_with_frozen_vision_keeps_the_vision_tower_and_records_its_lineage(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    common = ["--batch", "2", "--frames", "4-4", "--warmup", "1", "--threads", "1", "--eval-n", "0", "--tasks", "digit"]
    main(["--out", str(first), "--steps", "2", *common])
    main(["--out", str(second), "--init", str(first), "--freeze-vision", "--steps", "2", "--lr", "1e-2", *common])
    before, after = (load_model(str(d), torch.device("cpu")).rank_model.model for d in (first, second))
    for (name, old), new in zip(before.named_parameters(), after.parameters()):
        assert torch.equal(old, new) == name.startswith("model.visual."), name
    record = json.loads((second / "training.json").read_text())
    assert record["steps"] == 2 and record["init"]["steps"] == 2 and "--freeze-vision" in record["command"]


def test_vision_pretraining_without_a_one_needle_task_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "m"), "--vision-steps", "2", "--tasks", "order", "count"])
    assert "--vision-steps needs a one-needle task" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


@pytest.mark.multiprocess
@pytest.mark.slow
def test_evaluation_in_worker_processes_matches_in_process():
    args = (EMBEDDED_MODEL, (8, 16), ("color", "order"), 2, 2.0, ("footage", "grey"))
    accuracy, outside = evaluate(*args, workers=2)
    assert (accuracy, outside) == evaluate(*args, workers=0)
    assert set(accuracy) == {"footage", "grey"} and set(accuracy["grey"]) == {"8", "16"}
    assert all(0 <= v <= 1 for table in (accuracy, outside) for rows in table.values() for row in rows.values()
               for v in row.values())  # fmt: skip
