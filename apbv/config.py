"""Per-request limits the engine enforces."""

from __future__ import annotations

from dataclasses import dataclass, replace

CPU_MAX_PROMPT_TOKENS = 32_768  # CPU ranks: a prompt of this size already takes minutes on a real checkpoint


@dataclass(frozen=True)
class Limits:
    """Per-request limits that protect memory and latency, checked before any rank starts a request.

    max_prompt_tokens: the whole prompt (visual tokens, template and conversation); checked on the visual tokens
    estimated from the video's header and the sampling settings before a frame is decoded, and again exactly.
    max_query_tokens: the conversation's text (question and earlier turns). max_frame_pixels: the largest per-frame
    pixel budget a request may ask for (qwen-vl-utils' image bound, 16384 merged patches)."""

    max_prompt_tokens: int = 200_000
    max_new_tokens: int = 512
    max_frames: int = 768
    max_query_tokens: int = 8_192
    max_frame_pixels: int = 16384 * 28 * 28

    @classmethod
    def for_device(cls, device: str) -> "Limits":
        """The default limits of an engine on `device` ("cpu" or "cuda"): CPU ranks take smaller prompts."""
        return replace(cls(), max_prompt_tokens=CPU_MAX_PROMPT_TOKENS) if device == "cpu" else cls()
