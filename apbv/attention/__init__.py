"""Sequence-parallel attention core: kernels, layouts, strategies, distributed (decode) attention."""

from .base import RankLayout, SequencePlan, Strategy
from .config import AttentionConfig
from .decode import distributed_attention, start_distributed_attention
from .kernels import attend, merge_partials
from .registry import get_strategy

__all__ = [
    "AttentionConfig",
    "RankLayout",
    "SequencePlan",
    "Strategy",
    "attend",
    "distributed_attention",
    "get_strategy",
    "merge_partials",
    "start_distributed_attention",
]
