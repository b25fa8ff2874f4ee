"""The one list of attention strategies: name, label, where the class lives, and whether it runs on one rank.

Adding a strategy is one new file with its `Strategy` subclass plus one entry here; the engine, the CLI, the page
and the benchmarks all read their choices and labels from this table. Classes are resolved lazily by name (as
vLLM resolves attention backends), so this module imports none of them and nothing imports it in a circle.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # type hints only: the classes are imported on first use
    from .base import Strategy
    from .config import AttentionConfig


@dataclass(frozen=True)
class StrategyEntry:
    """name: the identifier requests use; label: what a user reads; target: "module:Class" of the Strategy;
    single_rank: runs on one rank only (the single-GPU baseline); exact: its prefill is exact attention (the
    others approximate the context's, so a cached context depends on the question it was built with)."""

    name: str
    label: str
    target: str
    single_rank: bool = False
    exact: bool = False


_ENTRIES = (
    StrategyEntry("dense", "FlashAttention (1 GPU)", "apbv.attention.dense:DenseStrategy", single_rank=True,
                  exact=True),
    StrategyEntry("ring", "ZigZag ring", "apbv.attention.ring:RingStrategy", exact=True),
    StrategyEntry("star", "Star", "apbv.attention.star:StarStrategy"),
    StrategyEntry("apb", "APB", "apbv.attention.apb:APBStrategy"),
    StrategyEntry("apbv", "APB-V", "apbv.attention.apbv:APBVStrategy"),
)
STRATEGIES: dict[str, StrategyEntry] = {e.name: e for e in _ENTRIES}
STRATEGY_NAMES: tuple[str, ...] = tuple(STRATEGIES)
BASELINE = "dense"  # the single-GPU FlashAttention baseline every comparison is made against
AUTO = "auto"  # not a strategy: the engine's pick of one (and of its ranks) per request, `apbv.engine.cost_model`
AUTO_LABEL = "Auto (fastest predicted)"


def check_strategy_name(name: str) -> StrategyEntry:
    """The entry of `name`; ValueError naming the choices when there is none."""
    try:
        return STRATEGIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGY_NAMES)}") from None


def strategy_label(name: str) -> str:
    """What a user reads for a strategy (the name itself when it is not registered)."""
    if name == AUTO:
        return AUTO_LABEL
    entry = STRATEGIES.get(name)
    return entry.label if entry else name


def ranks_for(name: str, world_size: int | None) -> int | None:
    """The ranks strategy `name` runs on when `world_size` are offered (one for a single-rank strategy; None, for
    "all of the engine's", stays None otherwise; `auto` may use up to all it is offered)."""
    return world_size if name == AUTO else 1 if check_strategy_name(name).single_rank else world_size


@cache
def strategy_class(name: str) -> type[Strategy]:
    """The Strategy subclass registered under `name`, imported on first use."""
    module, _, cls = check_strategy_name(name).target.partition(":")
    return getattr(importlib.import_module(module), cls)


def get_strategy(config: AttentionConfig) -> Strategy:
    """The strategy named by config.strategy, configured by `config`."""
    return strategy_class(config.strategy)(config)
