"""Fault injection for the fault suite (tests/test_faults.py), read once when a worker starts; inert unless set.

    APBV_FAULT_OOM="RANK:TOKENS[,RANK:TOKENS...]"   rank RANK runs out of memory (torch.OutOfMemoryError, as CUDA
        raises it) in the prefill of any request whose local sequence on that rank reaches TOKENS tokens
    APBV_FAULT_TOKENIZER="TEXT"   the tokenizer raises TypeError on any text containing TEXT (as it once did on a
        lone surrogate): an unexpected exception while rank 0 prepares a request

The faults enter through a forward hook on the first language-model layer and a wrapped tokenizer method, so the
request path runs unchanged.
"""

from __future__ import annotations

import os

import torch

from apbv.model.loading import LoadedModel
from apbv.model.qwen2_5_vl import QwenVLRank

OOM_ENV = "APBV_FAULT_OOM"
TOKENIZER_ENV = "APBV_FAULT_TOKENIZER"


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


def _arm_out_of_memory(rank_model: QwenVLRank, rank: int) -> None:
    limits = dict(tuple(int(n) for n in entry.split(":")) for entry in os.environ.get(OOM_ENV, "").split(",") if entry)
    if rank not in limits:
        return
    tokens = limits[rank]

    def out_of_memory(module: torch.nn.Module, args: tuple) -> None:
        if args[0].shape[1] >= tokens:
            raise torch.OutOfMemoryError(f"injected by {OOM_ENV}: rank {rank}, {args[0].shape[1]} local tokens")

    rank_model.text.layers[0].register_forward_pre_hook(out_of_memory)
