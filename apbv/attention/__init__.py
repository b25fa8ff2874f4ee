"""Sequence-parallel attention core: kernels, layouts, strategies, distributed (decode) attention."""

from .base import RankLayout, SequencePlan, Strategy, get_strategy
from .decode import distributed_attention, start_distributed_attention
from .kernels import attend, merge_partials

__all__ = [
    "RankLayout",
    "SequencePlan",
    "Strategy",
    "attend",
    "distributed_attention",
    "get_strategy",
    "merge_partials",
    "start_distributed_attention",
]
