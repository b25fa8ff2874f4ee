"""Strategy name -> class (adding a strategy: one new file plus one line here)."""

from __future__ import annotations

from .apb import APBStrategy
from .apbv import APBVStrategy
from .base import Strategy
from .dense import DenseStrategy
from .ring import RingStrategy
from .star import StarStrategy

STRATEGY_CLASSES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (DenseStrategy, RingStrategy, StarStrategy, APBStrategy, APBVStrategy)
}
