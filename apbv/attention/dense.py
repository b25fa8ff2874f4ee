"""Dense causal attention on one rank: the FlashAttention baseline and the reference for exactness."""

from __future__ import annotations

from torch import Tensor

from apbv.comm import Comm
from apbv.metrics import MetricsRecorder

from .base import SequencePlan, Strategy, attend_counted
from .layout import whole_plan


class DenseStrategy(Strategy):
    name = "dense"
    exact = True

    def plan(self, n_context: int, n_query: int, world_size: int) -> SequencePlan:
        return whole_plan(self.name, n_context, n_query, world_size)

    def prefill(
        self, q: Tensor, k: Tensor, v: Tensor, plan: SequencePlan, layer_idx: int, comm: Comm, metrics: MetricsRecorder
    ) -> Tensor:
        self.check_inputs(q, k, plan, comm)
        return attend_counted(q, k, v, True, metrics)[0]
