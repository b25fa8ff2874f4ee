"""Rank 0's admission of a checked request (`Request.check`): the size of its conversation, before the video is
planned or another rank is involved. (The video's own size is counted exactly by its plan, also before a frame is
decoded: `prepare_job` refuses prompts over the limit there.)"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from apbv.config import Limits
from apbv.engine.api import Request
from apbv.errors import QuestionTooLong


def admit(request: Request, tokenizer: PreTrainedTokenizerBase, limits: Limits) -> None:
    """Raise QuestionTooLong when the conversation's text exceeds limits.max_query_tokens."""
    texts = [request.question, *(text for turn in request.history for text in turn)]
    query = sum(len(tokenizer.encode(text, add_special_tokens=False)) for text in texts)
    if query > limits.max_query_tokens:
        raise QuestionTooLong(
            f"the conversation has {query} text tokens, more than the limit of {limits.max_query_tokens}; "
            "ask a shorter question or start a new conversation"
        )
