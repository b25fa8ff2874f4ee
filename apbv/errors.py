"""Typed errors. Every error a user can cause or see has a class here with a one-line message.

`code` is a stable machine-readable identifier (used by the CLI exit path, the engine and the page).
"""

from __future__ import annotations


class ApbvError(Exception):
    """Base of all errors this project raises on purpose."""

    code = "error"


class InputError(ApbvError):
    """The request itself is bad; retrying it unchanged will fail again."""

    code = "bad_input"


class VideoNotFound(InputError):
    code = "video_not_found"


class VideoUnreadable(InputError):
    """Not a video, a corrupt file, or a container/codec no installed reader can decode."""

    code = "video_unreadable"


class UnsupportedVideo(InputError):
    """A readable video the model cannot take: frames too narrow (an aspect ratio beyond qwen-vl-utils' 200:1) or
    too large to decode safely (beyond 8192x8192)."""

    code = "unsupported_video"


class NoFrames(InputError):
    code = "no_frames"


class TooFewFrames(InputError):
    """Fewer temporal patches than the ranks need (each rank encodes at least one)."""

    code = "too_few_frames"


class EmptyQuestion(InputError):
    code = "empty_question"


class InvalidQuestion(InputError):
    """A turn of the conversation is not plain text: it holds the tokenizer's control tokens (vision tokens,
    <|im_start|>, ...) or is not encodable as UTF-8 (a lone surrogate)."""

    code = "invalid_question"


class TooManyTokens(InputError):
    """The prompt exceeds the configured token budget (memory limit)."""

    code = "too_many_tokens"


class QuestionTooLong(TooManyTokens):
    """The conversation's text (question and earlier turns) exceeds its token limit."""

    code = "question_too_long"


class InvalidWorldSize(InputError):
    """A number of ranks this machine cannot run: below 1, more than its GPUs, or on CPU more than its cores or
    memory hold."""

    code = "invalid_world_size"


class LayoutError(InputError):
    """A sequence cannot be cut across the requested number of ranks."""

    code = "layout"


class EngineError(ApbvError):
    """The engine could not serve a valid request; the request may succeed when retried."""

    code = "engine"


class Busy(EngineError):
    code = "busy"


class WorkerDied(EngineError):
    code = "worker_died"


class RequestTimeout(EngineError):
    code = "timeout"


class Cancelled(EngineError):
    code = "cancelled"


class OutOfMemory(EngineError):
    code = "out_of_memory"


class FootageUnavailable(ApbvError):
    """The real footage of the training and evaluation videos is missing: neither its packages nor a bundle."""

    code = "footage_unavailable"


def error_from_code(code: str, message: str) -> ApbvError:
    """The typed error of a `code` (as sent between processes); unknown codes become a generic EngineError."""
    return _BY_CODE.get(code, EngineError)(message)


_BY_CODE = {c.code: c for c in list(globals().values()) if isinstance(c, type) and issubclass(c, ApbvError)}
ERROR_CODES: tuple[str, ...] = tuple(sorted(_BY_CODE))  # every code, in a fixed order (an index names a code)
