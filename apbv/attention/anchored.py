"""The "anchor + hosts + passing" mechanism shared by APB-V, APB and Star (spec §3, Appendix A).

Local sequence of rank r: [anchor (A) | its host blocks, in host order | query (Lq)]. Visibility:
- anchor rows: causal over the anchor (dense-exact);
- rows of host h: Pass(h) (the selected K/V of every earlier host, all of it) + the whole anchor + host h causally;
- query rows: everything before them, exact, via distributed partial attention (each rank: its anchor slice, its
  host blocks and, on the tail rank, the query keys with causal masking over that segment only (fix §9.1)).
Per layer: select K/V of each owned host (query-aware, §3.1-3.3), launch one all-gather per slot position
(sizes may differ across ranks; the last host's selection is never needed and is neither computed nor sent),
compute the query partial and launch its gathers, then wait slot by slot and attend (§4.1 overlap).
Subclasses choose the host layout and the passing budget.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from torch import Tensor

from apbv.comm import Comm, Handle
from apbv.metrics import ATTENTION, MetricsRecorder

from .base import Strategy, attend_counted
from .decode import start_distributed_attention
from .layout import AnchoredPlan, Range, anchored_plan, check_request
from .selection import mean_query, select_kv


class AnchoredStrategy(Strategy):
    exact = False

    @property
    def overlap(self) -> bool:
        return self.config.overlap

    @abstractmethod
    def layout(self, n_context: int, world_size: int) -> tuple[int, tuple[Range, ...], tuple[tuple[int, ...], ...], int]:
        """(anchor length, host ranges, host slots per rank, tail rank) for a valid request."""

    @abstractmethod
    def budget(self, n_context: int, layer_idx: int) -> int:
        """Passing budget P: entries per host per KV head."""

    def plan(self, n_context: int, n_query: int, world_size: int) -> AnchoredPlan:
        check_request(n_context, n_query, world_size)
        anchor_len, hosts, slots, tail = self.layout(n_context, world_size)
        return anchored_plan(self.name, n_context, n_query, world_size, anchor_len, hosts, slots, tail)

    def prefill(
        self, q: Tensor, k: Tensor, v: Tensor, plan: AnchoredPlan, layer_idx: int, comm: Comm, metrics: MetricsRecorder
    ) -> Tensor:
        self.check_inputs(q, k, plan, comm)
        rank, anchor, d = comm.rank, plan.anchor_len, q.shape[-1]
        query_start = q.shape[1] - plan.n_query
        counts = plan.selection_counts(self.budget(plan.n_context, layer_idx))
        blocks = plan.host_offsets(rank)

        gathers = self._launch_selections(q, k, v, plan, blocks, counts, comm, metrics)
        a0, a1 = plan.anchor_slices[rank]
        keys_end = q.shape[1] if rank == plan.tail_rank else query_start
        query = start_distributed_attention(
            q[:, query_start:],
            torch.cat([k[:, a0:a1], k[:, anchor:keys_end]], dim=1),
            torch.cat([v[:, a0:a1], v[:, anchor:keys_end]], dim=1),
            comm, metrics, causal=rank == plan.tail_rank,
        )
        query_out = None if self.overlap else query.wait()

        outs = [attend_counted(q[:, :anchor], k[:, :anchor], v[:, :anchor], True, metrics)[0]]
        selected: dict[int, Tensor] = {}
        nothing = k.new_empty(k.shape[0], 0, 2 * d)
        for h, start, end in blocks:
            passing = _passing(h, counts, plan, gathers, selected, nothing)
            keys = torch.cat([passing[..., :d], k[:, :anchor], k[:, start:end]], dim=1)
            values = torch.cat([passing[..., d:], v[:, :anchor], v[:, start:end]], dim=1)
            outs.append(attend_counted(q[:, start:end], keys, values, True, metrics)[0])
        outs.append(query.wait() if query_out is None else query_out)
        return torch.cat(outs, dim=1)

    def _launch_selections(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        plan: AnchoredPlan,
        blocks: list[tuple[int, int, int]],
        counts: tuple[int, ...],
        comm: Comm,
        metrics: MetricsRecorder,
    ) -> list[Handle | None]:
        """Select this rank's entries per slot position and launch their all-gathers (None: nothing to send)."""
        hkv, d = k.shape[0], k.shape[-1]
        qbar = None
        gathers: list[Handle | None] = []
        for j in range(max(len(s) for s in plan.slots)):
            sizes = [counts[s[j]] if j < len(s) else 0 for s in plan.slots]
            if not any(sizes):
                gathers.append(None)
                continue
            payload = k.new_empty(hkv, 0, 2 * d)
            if sizes[comm.rank]:
                _, start, end = blocks[j]
                with metrics.timed(ATTENTION):
                    if qbar is None:
                        qbar = mean_query(q[:, q.shape[1] - plan.n_query :], hkv)
                    payload = select_kv(k[:, start:end], v[:, start:end], qbar, sizes[comm.rank], self.config.pool_kernel)
            handle = comm.all_gather_async(payload, sizes, dim=1, metrics=metrics)
            if not self.overlap:
                handle.wait()
            gathers.append(handle)
        return gathers


def _passing(
    h: int, counts: tuple[int, ...], plan: AnchoredPlan, gathers: list[Handle | None], selected: dict[int, Tensor],
    nothing: Tensor,
) -> Tensor:
    """Pass(h): the selections of hosts 0..h-1 in host order, waiting for the gathers that carry them."""
    needed = [g for g in range(h) if counts[g]]
    for j, handle in enumerate(gathers):
        if all(g in selected for g in needed):
            break
        if handle is not None:
            for i, part in enumerate(handle.wait()):
                if j < len(plan.slots[i]):
                    selected[plan.slots[i][j]] = part
    return torch.cat([nothing] + [selected[g] for g in needed], dim=1)
