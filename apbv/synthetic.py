"""Synthetic long-video QA in the spirit of VNBench: find the needle in a video haystack.

A sample is a video of distractor content with one or more "needles": short segments (1-4 frames) showing a
saturated coloured shape, a digit or a word on a card, of varied size, place and opacity. The distractor content
is either synthetic grey (a drifting texture, moving grey blobs, faint noise) or real footage filmed by a
synthetic camera (`apbv.footage`: its training or its held-out sources). Questions need the needle: retrieval
(color, shape, digit, word), ordering (which of two colours came first) and counting (how many times a shape
appeared). Answers come from small closed sets, so accuracy is exact match. Everything is drawn from seeded
generators: same seed, same bytes; the background has its own stream (`background`), so the needles never
change it.

`python -m apbv.synthetic --out assets/examples --n 6 [--footage held_out]` writes playable example MP4s with
JSON sidecars.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from apbv import footage as real_footage
from apbv.video import SampledVideo

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 180, 50),
    "blue": (30, 80, 240),
    "yellow": (250, 220, 20),
    "purple": (150, 50, 210),
    "orange": (255, 130, 0),
}
SHAPES = ("circle", "square", "triangle", "cross", "diamond")
DIGITS = tuple("0123456789")
WORDS = ("cat", "dog", "sun", "car", "box", "hat", "cup", "key")
COUNTS = ("1", "2", "3", "4")
TASKS = ("color", "shape", "digit", "word", "order", "count")
RETRIEVAL_CHOICES = {"color": tuple(COLORS), "shape": SHAPES, "digit": DIGITS, "word": WORDS}  # one-needle tasks
ANSWERS = tuple(dict.fromkeys([*COLORS, *SHAPES, *DIGITS, *WORDS, *COUNTS]))  # every answer of every task

QUESTIONS = {
    "color": "What color was the shape shown in the video? Answer with one word.",
    "shape": "Which shape was shown in the video? Answer with one word.",
    "digit": "Which digit was shown in the video? Answer with one digit.",
    "word": "Which word was written on the card in the video? Answer with one word.",
    "order": "Which color appeared first in the video, {a} or {b}? Answer with one word.",
    "count": "How many times did the {color} {shape} appear in the video? Answer with one digit.",
}

_NEEDLE_GAP = 2  # background frames at least between two needles, so that counting is well defined
NEEDLE_LENGTHS = (1, 2, 2, 3, 4)  # a needle's duration in frames, drawn from these (longer ones when they fit)
SHAPE_SIDE = (0.3, 0.6)  # a shape's side as a fraction of the frame's short side
CARD_WIDTH = (0.4, 0.7)  # a card's text width as a fraction of the frame width (whole-pixel glyph scales)
OPACITY = (0.75, 1.0)  # a needle's opacity over the background
FRAME_SIZE = (112, 112)  # (H, W) of the embedded model's frames: 16 visual tokens per temporal patch
HELD_OUT_SEED = 1 << 31  # held-out samples have seeds from here on; training seeds stay below
EVAL_FPS = 2.0  # the frame rate held-out videos are read at


@dataclass
class Sample:
    """One video question. needle_frames: indices of the frames that show a needle."""

    frames: np.ndarray  # (T, H, W, 3) uint8
    question: str
    answer: str
    task: str
    needle_frames: list[int]
    choices: tuple[str, ...]  # the closed answer set of this question
    footage: str | None = None  # the footage split behind the needles; None: synthetic grey


def make_sample(
    seed: int,
    num_frames: int = 64,
    size: tuple[int, int] = FRAME_SIZE,
    task: str = "color",
    needle_len: int | None = None,
    footage: str | None = None,
) -> Sample:
    """One deterministic sample of `task` (one of TASKS) with num_frames frames of size (H, W) over `background`;
    needle_len: frames per needle (None: drawn from NEEDLE_LENGTHS, as long as the needles fit)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    frames = background(seed, num_frames, size, footage)
    rng = np.random.default_rng(seed)
    shape, color = str(rng.choice(SHAPES)), str(rng.choice(list(COLORS)))
    needles: list = []  # one overlay function per needle occurrence, in time order
    if task in ("color", "shape"):
        answer, choices = (color if task == "color" else shape), RETRIEVAL_CHOICES[task]
        needles = [lambda: _shape_overlay(rng, size, shape, color)]
    elif task in ("digit", "word"):
        choices = RETRIEVAL_CHOICES[task]
        answer = str(rng.choice(choices))
        needles = [lambda: _card_overlay(rng, size, answer.upper())]
    elif task == "order":
        first, second = (str(c) for c in rng.choice(list(COLORS), size=2, replace=False))
        answer, choices = first, ((first, second) if rng.random() < 0.5 else (second, first))
        needles = [lambda c=c: _shape_overlay(rng, size, shape, c) for c in (first, second)]
    else:  # count
        answer, choices = str(rng.choice(COUNTS)), COUNTS
        needles = [lambda: _shape_overlay(rng, size, shape, color)] * int(answer)
    question = QUESTIONS[task].format(color=color, shape=shape, a=choices[0], b=choices[-1])
    if needle_len is None:
        fitting = [n for n in NEEDLE_LENGTHS if _fits(num_frames, len(needles), n)] or [1]
        needle_len = int(rng.choice(fitting))

    needle_frames = []
    for start, overlay in zip(_place(rng, num_frames, len(needles), needle_len), needles):
        rgba = overlay()  # drawn once, held still over the segment while the background moves on
        alpha = (rgba[..., 3:] > 0) * rng.uniform(*OPACITY)
        segment = slice(start, start + needle_len)
        frames[segment] = np.rint(alpha * rgba[..., :3] + (1 - alpha) * frames[segment]).astype(np.uint8)
        needle_frames += range(start, start + needle_len)
    return Sample(frames, question, answer, task, needle_frames, choices, footage)


def background(seed: int, num_frames: int, size: tuple[int, int], footage: str | None = None) -> np.ndarray:
    """The needle-free frames of sample `seed`: synthetic grey, or `footage`'s split of real footage."""
    rng = np.random.default_rng([seed, 1])  # a stream of its own
    if footage is None:
        return _grey_background(rng, num_frames, size)
    return real_footage.background(rng, num_frames, size, footage)


HELD_OUT_SETS = {"footage": "held_out", "grey": None}  # held-out set -> the footage behind its needles


def held_out(i: int, num_frames: int, task: str, held_out_set: str = "footage") -> Sample:
    """Held-out sample i (seed HELD_OUT_SEED + i) of a HELD_OUT_SETS set: never drawn in training (the footage
    set's backgrounds are the held-out footage, never used in training either)."""
    if held_out_set not in HELD_OUT_SETS:
        raise ValueError(f"unknown held-out set {held_out_set!r}; choose one of {', '.join(HELD_OUT_SETS)}")
    return make_sample(HELD_OUT_SEED + i, num_frames, FRAME_SIZE, task, footage=HELD_OUT_SETS[held_out_set])


def as_video(sample: Sample, fps: float = EVAL_FPS) -> SampledVideo:
    """The sample's frames as a video read at `fps` (every frame kept; the rate sets the M-RoPE time step)."""
    return SampledVideo(sample.frames, sample_fps=fps, source_fps=fps, duration_s=len(sample.frames) / fps)


@dataclass(frozen=True)
class SyntheticDataset(Sequence):
    """n samples generated on access (nothing is held in memory); sample i cycles through `tasks` and has its
    own seed derived from (seed, i), with a frame count drawn from the inclusive range `num_frames`."""

    seed: int
    n: int
    num_frames: tuple[int, int] = (16, 64)
    size: tuple[int, int] = (112, 112)
    tasks: tuple[str, ...] = TASKS
    needle_len: int | None = None
    footage: str | None = None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Sample:
        if not -self.n <= i < self.n:
            raise IndexError(i)
        i %= self.n
        seed = int(np.random.SeedSequence([self.seed, i]).generate_state(1)[0])
        lo, hi = self.num_frames
        frames = int(np.random.default_rng(seed).integers(lo, hi + 1))
        return make_sample(seed, frames, self.size, self.tasks[i % len(self.tasks)], self.needle_len, self.footage)


def make_dataset(
    seed: int,
    n: int,
    num_frames: int | tuple[int, int] = (16, 64),
    size: tuple[int, int] = (112, 112),
    tasks: Sequence[str] = TASKS,
    needle_len: int | None = None,
    footage: str | None = None,
) -> SyntheticDataset:
    """A deterministic dataset of n samples (see SyntheticDataset); num_frames: a count or an inclusive range."""
    frames = (num_frames, num_frames) if isinstance(num_frames, int) else tuple(num_frames)
    return SyntheticDataset(seed, n, frames, tuple(size), tuple(tasks), needle_len, footage)


def write_mp4(frames: np.ndarray, path: str | Path, fps: float = 8.0, codec: str | None = None) -> Path:
    """Encode (T, H, W, 3) uint8 frames (even H and W) as an MP4 with PyAV; codec None: H.264 (libx264) if
    available, else MPEG-4 Part 2. Encoded so that the same frames give the same bytes."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"frames must be (T, H, W, 3) with even H and W, got {frames.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    codec = codec or ("libx264" if "libx264" in av.codecs_available else "mpeg4")
    # x264's macroblock-tree rate control gave run-to-run different bytes here, even single-threaded
    options = {"x264-params": "mbtree=0"} if codec == "libx264" else {}
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001), options=options)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        if codec == "mpeg4":
            stream.bit_rate = 2_000_000  # the encoder's default (200 kb/s) smears the needles
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
    return path


def _grey_background(rng: np.random.Generator, num_frames: int, size: tuple[int, int]) -> np.ndarray:
    """Grey distractor video: a smooth texture drifting by a constant step, moving grey blobs, faint noise."""
    height, width = size
    coarse = rng.integers(60, 180, (6, 6), dtype=np.uint8)
    texture = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    drift = rng.integers(-2, 3, 2)
    n_blobs = int(rng.integers(2, 5))
    pos = rng.uniform(0, 1, (n_blobs, 2)) * (height, width)
    vel = rng.uniform(-1.5, 1.5, (n_blobs, 2))
    radius = rng.uniform(0.06, 0.14, n_blobs) * min(size)
    grey = rng.integers(20, 236, n_blobs)
    yy, xx = np.mgrid[:height, :width]

    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for t in range(num_frames):
        img = np.roll(texture, tuple(drift * t), axis=(0, 1))
        for (y, x), r, g in zip(pos, radius, grey):
            img = np.where((yy - y) ** 2 + (xx - x) ** 2 < r * r, g, img)
        img = img + rng.integers(-3, 4, (height, width))
        frames[t] = np.clip(img, 0, 255).astype(np.uint8)[..., None]
        pos += vel
        vel[(pos < 0) | (pos > (height, width))] *= -1  # bounce off the edges
    return frames


def _shape_overlay(rng: np.random.Generator, size: tuple[int, int], shape: str, color: str) -> np.ndarray:
    """RGBA layer with a filled shape (SHAPE_SIDE of the frame) at a random place, thin dark outline."""
    height, width = size
    img = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    side = int(min(width, height) * rng.uniform(*SHAPE_SIDE))
    x0, y0 = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
    x1, y1, cx, cy = x0 + side, y0 + side, x0 + side // 2, y0 + side // 2
    fill, outline = (*COLORS[color], 255), (0, 0, 0, 255)
    draw = ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill, outline=outline)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill, outline=outline)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill, outline=outline)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill, outline=outline)
    else:  # cross
        arm = side // 6
        draw.rectangle((cx - arm, y0, cx + arm, y1), fill=fill)
        draw.rectangle((x0, cy - arm, x1, cy + arm), fill=fill)
    return np.asarray(img)


def _card_overlay(rng: np.random.Generator, size: tuple[int, int], text: str) -> np.ndarray:
    """RGBA layer with black text (PIL's built-in bitmap font, scaled up with nearest neighbour) on a white card."""
    font = ImageFont.load_default_imagefont()
    left, top, right, bottom = font.getbbox(text)
    glyphs = Image.new("L", (right - left, bottom - top), 255)
    ImageDraw.Draw(glyphs).text((-left, -top), text, fill=0, font=font)
    height, width = size
    scale = max(1, int(min(width * rng.uniform(*CARD_WIDTH) / glyphs.width, height * 0.45 / glyphs.height)))
    glyphs = glyphs.resize((glyphs.width * scale, glyphs.height * scale), Image.Resampling.NEAREST)
    margin = max(2, scale)
    card_w, card_h = glyphs.width + 2 * margin, glyphs.height + 2 * margin
    x0, y0 = int(rng.integers(0, width - card_w + 1)), int(rng.integers(0, height - card_h + 1))
    img = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    ImageDraw.Draw(img).rectangle((x0, y0, x0 + card_w - 1, y0 + card_h - 1), fill=(255, 255, 255, 255))
    img.paste(glyphs.convert("RGBA"), (x0 + margin, y0 + margin))
    return np.asarray(img)


def _fits(num_frames: int, k: int, length: int) -> bool:
    return k * length + (k - 1) * _NEEDLE_GAP <= num_frames


def _place(rng: np.random.Generator, num_frames: int, k: int, length: int) -> list[int]:
    """Start frames of k non-overlapping segments of `length` frames, at least _NEEDLE_GAP frames apart."""
    slack = num_frames - k * length - (k - 1) * _NEEDLE_GAP
    if not _fits(num_frames, k, length):
        raise ValueError(f"{num_frames} frames are too few for {k} needles of {length} frames")
    offsets = np.sort(rng.integers(0, slack + 1, k))
    return [int(o) + i * (length + _NEEDLE_GAP) for i, o in enumerate(offsets)]


EXAMPLE_PREFIX = {None: "synthetic", "train": "footage", "held_out": "unseen_footage"}  # example file names


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write synthetic video-QA examples (MP4 + JSON sidecar).")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--size", type=int, nargs=2, default=(112, 112), metavar=("H", "W"))
    parser.add_argument("--fps", type=float, default=8.0)
    parser.add_argument("--needle-len", type=int, default=8, help="frames per needle (8 at 8 fps: 1 s, so that "
                        "sampling at the default 2 fps always sees it)")
    parser.add_argument("--footage", choices=real_footage.SPLITS, default=None,
                        help="draw the needles over this split of the real footage (default: synthetic grey)")
    parser.add_argument("--tasks", nargs="+", default=TASKS, choices=TASKS)
    args = parser.parse_args(argv)
    dataset = make_dataset(args.seed, args.n, args.frames, tuple(args.size), args.tasks, args.needle_len, args.footage)
    for i, sample in enumerate(dataset):
        stem = args.out / f"{EXAMPLE_PREFIX[args.footage]}_{i}_{sample.task}"
        write_mp4(sample.frames, stem.with_suffix(".mp4"), args.fps)
        sidecar = {
            "question": sample.question,
            "answer": sample.answer,
            "task": sample.task,
            "choices": list(sample.choices),
            "needle_frames": sample.needle_frames,
            "num_frames": len(sample.frames),
            "fps": args.fps,
            "needle_len": args.needle_len,
            "footage": args.footage,
            "tasks": list(args.tasks),
            "seed": args.seed,
            "index": i,
        }
        stem.with_suffix(".json").write_text(json.dumps(sidecar, indent=2) + "\n")
        print(f"{stem}.mp4: {sample.question} -> {sample.answer}")


if __name__ == "__main__":
    main()
