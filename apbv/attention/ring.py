"""Exact zigzag ring attention (spec §7, ZigZagRing).

The whole sequence [context | query] is cut into 2W balanced chunks; rank r holds chunks r and 2W-1-r. In W
steps every rank's K/V travels once around the ring (async send/recv, overlapped with the current step's
compute). A local query chunk attends a key chunk fully if the keys lie entirely before it, causally if it is
the same chunk, and not at all if they lie after it, so unequal (even empty) chunks need no padding. Partials
are folded by lse in step order.
"""

from __future__ import annotations

import torch
from torch import Tensor

from apbv.comm import Comm
from apbv.metrics import MetricsRecorder

from .base import Strategy, attend_counted
from .kernels import merge_partials
from .layout import Range, RingPlan, ring_plan


class RingStrategy(Strategy):
    name = "ring"
    exact = True

    def plan(self, n_context: int, n_query: int, world_size: int) -> RingPlan:
        return ring_plan(n_context, n_query, world_size)

    def prefill(
        self, q: Tensor, k: Tensor, v: Tensor, plan: RingPlan, layer_idx: int, comm: Comm, metrics: MetricsRecorder
    ) -> Tensor:
        self.check_inputs(q, k, plan, comm)
        rank, world, d = comm.rank, plan.world_size, q.shape[-1]
        mine = _local_chunks(plan, rank)
        acc: list[tuple[Tensor, Tensor] | None] = [None] * len(mine)
        kv, owner = torch.cat([k, v], dim=-1), rank
        for step in range(world):
            transfer = None
            if step < world - 1:
                source = (owner - 1) % world
                buffer = kv.new_empty(kv.shape[0], plan.ranks[source].length, kv.shape[-1])
                transfer = comm.sendrecv_async(kv, (rank + 1) % world, buffer, (rank - 1) % world, metrics)
                if not self.config.overlap:
                    transfer.wait()
            for i, (q_range, q_off) in enumerate(mine):
                for k_range, k_off in _local_chunks(plan, owner):
                    causal = _visibility(q_range, k_range)
                    if causal is None:
                        continue
                    qs = q[:, q_off : q_off + q_range[1] - q_range[0]]
                    ks = kv[:, k_off : k_off + k_range[1] - k_range[0]]
                    part = attend_counted(qs, ks[..., :d], ks[..., d:], causal, metrics)
                    acc[i] = part if acc[i] is None else merge_partials([acc[i], part])
            if transfer is not None:
                kv, owner = transfer.wait(), source
        return torch.cat([a[0].to(q.dtype) for a in acc if a is not None], dim=1)


def _local_chunks(plan: RingPlan, rank: int) -> list[tuple[Range, int]]:
    """(global range, local offset) of each chunk of `rank`."""
    found, offset = [], 0
    for c in plan.slots[rank]:
        found.append((plan.chunks[c], offset))
        offset += plan.chunks[c][1] - plan.chunks[c][0]
    return found


def _visibility(rows: Range, keys: Range) -> bool | None:
    """None: rows see none of the keys; False: all of them; True: causally (the same chunk)."""
    if rows[0] == rows[1] or keys[0] == keys[1] or keys[0] >= rows[1]:
        return None
    if keys[1] <= rows[0]:
        return False
    if rows != keys:
        raise ValueError(f"ring chunks {rows} and {keys} overlap without being equal")
    return True
