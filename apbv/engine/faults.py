"""Fault injection for the fault suite (tests/test_faults.py), read once when a worker starts; inert unless set.

    APBV_FAULT_OOM="RANK:TOKENS[,RANK:TOKENS...]"   rank RANK runs out of memory (torch.OutOfMemoryError, as CUDA
        raises it) in the prefill of any request whose local sequence on that rank reaches TOKENS tokens
    APBV_FAULT_TOKENIZER="TEXT"   the tokenizer raises TypeError on any text containing TEXT (as it once did on a
        lone surrogate): an unexpected exception while rank 0 prepares a request
    APBV_FAULT_DECODE="RANK:TEXT"   rank RANK finds the frames it decodes corrupt (VideoUnreadable, as FFmpeg's errors
        become) in any video whose path contains TEXT: data past what rank 0's probe saw

The faults enter through a forward hook on the first language-model layer, a wrapped tokenizer method and a wrapped
frame decoder, so the request path runs unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from apbv.engine import video_pipeline
from apbv.errors import VideoUnreadable
from apbv.model.loading import LoadedModel
from apbv.model.qwen2_5_vl import QwenVLRank

OOM_ENV = "APBV_FAULT_OOM"
TOKENIZER_ENV = "APBV_FAULT_TOKENIZER"
DECODE_ENV = "APBV_FAULT_DECODE"


def install_faults(loaded: LoadedModel, rank: int) -> None:
    """Arm the faults the environment asks for on this rank."""
    if poison := os.environ.get(TOKENIZER_ENV):
        encode = loaded.tokenizer.encode

        def failing_encode(text: object, *args: object, **kwargs: object) -> list[int]:
            if isinstance(text, str) and poison in text:
                raise TypeError(f"injected by {TOKENIZER_ENV}")
            return encode(text, *args, **kwargs)

        loaded.tokenizer.encode = failing_encode
    _arm_out_of_memory(loaded.rank_model, rank)
    victim, _, text = os.environ.get(DECODE_ENV, "").partition(":")
    if victim and int(victim) == rank:
        decode = video_pipeline.decode_frames

        def failing_decode(path: str, *args: object, **kwargs: object):
            if text in str(path):
                raise VideoUnreadable(f"{Path(path).name} is corrupt or truncated (injected by {DECODE_ENV})")
            return decode(path, *args, **kwargs)

        video_pipeline.decode_frames = failing_decode


def _arm_out_of_memory(rank_model: QwenVLRank, rank: int) -> None:
    limits = dict(tuple(int(n) for n in entry.split(":")) for entry in os.environ.get(OOM_ENV, "").split(",") if entry)
    if rank not in limits:
        return
    tokens = limits[rank]

    def out_of_memory(module: torch.nn.Module, args: tuple) -> None:
        if args[0].shape[1] >= tokens:
            raise torch.OutOfMemoryError(f"injected by {OOM_ENV}: rank {rank}, {args[0].shape[1]} local tokens")

    rank_model.text.layers[0].register_forward_pre_hook(out_of_memory)
