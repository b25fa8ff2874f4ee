"""Rank 0's admission of a checked request (`Request.check`): the size of its conversation and of its video work,
judged from the video's header before a frame is decoded or another rank is involved."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from apbv.config import Limits
from apbv.engine.api import Request
from apbv.errors import QuestionTooLong, TooManyTokens
from apbv.inputs import ProcessorSpec
from apbv.video import VideoInfo, estimate_visual_tokens, probe_video, sample_frame_count


def admit(request: Request, tokenizer: PreTrainedTokenizerBase, spec: ProcessorSpec, limits: Limits) -> VideoInfo:
    """Raise QuestionTooLong when the conversation's text exceeds limits.max_query_tokens, TooManyTokens when the visual tokens
    estimated from the probe and the sampling settings (`estimate_visual_tokens`) would take the prompt past
    limits.max_prompt_tokens; raises probe_video's errors for bad files. Returns the probe."""
    texts = [request.question, *(text for turn in request.history for text in turn)]
    query = sum(len(tokenizer.encode(text, add_special_tokens=False)) for text in texts)
    if query > limits.max_query_tokens:
        raise QuestionTooLong(
            f"the conversation has {query} text tokens, more than the limit of {limits.max_query_tokens}; "
            "ask a shorter question or start a new conversation"
        )
    info = probe_video(request.video_path)
    frames = sample_frame_count(info.frame_count, info.fps, num_frames=request.num_frames,
                                fps=None if request.num_frames else request.fps, max_frames=limits.max_frames)  # fmt: skip
    visual = estimate_visual_tokens(info.height, info.width, frames, **spec.read_video_pixels(request.max_pixels))
    if visual + query > limits.max_prompt_tokens:
        raise TooManyTokens(
            f"{frames} frames of this {info.width}x{info.height} video make about {visual} visual tokens, more "
            f"than the limit of {limits.max_prompt_tokens} prompt tokens; use fewer frames or a lower resolution"
        )
    return info
