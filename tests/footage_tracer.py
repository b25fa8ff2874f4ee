"""Tracer footage for tests: a bundle with every source of apbv.footage replaced by one flat colour of its own
(clips as real H.264 MP4s, stills as PNGs), so that a frame's colour names the source it was filmed from."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from apbv import footage
from apbv.synthetic import write_mp4

HELD_OUT_TRACER = (0, 255, 255)  # every held-out source is cyan: far from every needle colour and training tracer


def tracer_colours() -> dict[str, tuple[int, int, int]]:
    """Training sources: distinct dim colours (channels 40-200, steps of 40); held-out sources: HELD_OUT_TRACER."""
    levels = range(40, 201, 40)
    palette = iter((r, g, b) for r in levels for g in levels for b in levels if len({r, g, b}) > 1)
    return {name: next(palette) if name in footage.SPLIT["train"] else HELD_OUT_TRACER
            for name in (*footage.CLIPS, *footage.STILLS)}  # fmt: skip


def write_tracer_bundle(path: Path) -> dict[str, tuple[int, int, int]]:
    colours, files = tracer_colours(), {}
    for name, colour in colours.items():
        if name in footage.CLIPS:
            clip = np.broadcast_to(np.array(colour, np.uint8), (6, 144, 176, 3))
            files[name] = write_mp4(clip, path.parent / f"{name}.mp4").read_bytes()
        else:
            buffer = io.BytesIO()
            Image.new("RGB", (200, 160), colour).save(buffer, format="PNG")
            files[name] = buffer.getvalue()
    footage.write_bundle(path, files)
    return colours


@contextlib.contextmanager
def using_bundle(monkeypatch: pytest.MonkeyPatch, path: Path) -> Iterator[None]:
    """This process reads its footage from the bundle at `path` (APBV_FOOTAGE) until the block ends."""
    footage.footage_files.cache_clear()
    footage.library.cache_clear()
    with monkeypatch.context() as m:
        m.setenv("APBV_FOOTAGE", str(path))
        try:
            yield
        finally:
            footage.footage_files.cache_clear()
            footage.library.cache_clear()
