"""Bundled example videos: `assets/examples/*.mp4`, each with an optional JSON sidecar {"question", "answer"}."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "assets" / "examples"


@dataclass(frozen=True)
class Example:
    video: str
    question: str
    answer: str  # the reference answer, "" when the sidecar has none


def load_examples(directory: Path = EXAMPLES_DIR) -> list[Example]:
    """Every MP4 in `directory`, sorted by name, with its sidecar's question/answer; [] when there are none."""
    examples = []
    for video in sorted(directory.glob("*.mp4")):
        sidecar = video.with_suffix(".json")
        meta = json.loads(sidecar.read_text()) if sidecar.exists() else {}
        examples.append(Example(str(video), meta.get("question", ""), meta.get("answer", "")))
    return examples
