"""Per-request limits the engine enforces."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """Per-request limits that protect memory and latency; max_prompt_tokens counts the whole prompt (visual
    tokens, template and question)."""

    max_prompt_tokens: int = 200_000
    max_new_tokens: int = 512
    max_frames: int = 768
