"""Comm over real gloo processes: uneven all-gather, async handles, ring send/recv, broadcast, sub-groups, bytes."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from apbv.comm import Comm
from apbv.metrics import COMM_WAIT, MetricsRecorder

from .distributed import run_ranks

SIZES = [2, 0, 3]


def _payload(rank: int, size: int) -> torch.Tensor:
    return torch.full((2, size, 4), float(rank)) + torch.arange(size)[None, :, None]


def _exercise(rank: int, world: int) -> dict:
    comm = Comm()
    metrics = MetricsRecorder(rank, torch.device("cpu"))
    gathered = comm.all_gather(_payload(rank, SIZES[rank]), SIZES, dim=1, metrics=metrics)
    handle = comm.all_gather_async(torch.tensor([rank * 10.0]), metrics=metrics)
    recv = comm.irecv(torch.empty(3), (rank - 1) % world, metrics)
    send = comm.isend(torch.full((3,), float(rank)), (rank + 1) % world, metrics)
    from_left = recv.wait()
    send.wait()
    ring = comm.sendrecv_async(torch.full((2,), rank * 1.0), (rank + 1) % world, torch.empty(2), (rank - 1) % world, metrics)
    token = comm.all_reduce_max(torch.tensor([rank + 100, -rank]), metrics=metrics)
    sub = dist.new_group([0, 1])  # every rank must create the group; only members use it
    in_sub = None
    if rank < 2:
        sub_comm = Comm(sub)
        in_sub = (sub_comm.rank, sub_comm.world_size, sub_comm.all_gather(torch.tensor([rank + 0.5])))
    return {
        "gathered": gathered,
        "async": handle.wait(),
        "from_left": from_left,
        "ring": ring.wait(),
        "token": token,
        "sub": in_sub,
        "metrics": metrics.finish(),
    }


@pytest.mark.multiprocess
def test_comm_on_three_gloo_ranks():
    results = run_ranks(3, _exercise, timeout=90)
    for rank, res in enumerate(results):
        assert len(res["gathered"]) == 3
        for src, part in enumerate(res["gathered"]):
            assert torch.equal(part, _payload(src, SIZES[src]))  # padding trimmed, rank order
        assert [t.item() for t in res["async"]] == [0.0, 10.0, 20.0]
        assert torch.equal(res["from_left"], torch.full((3,), float((rank - 1) % 3)))
        assert torch.equal(res["ring"], torch.full((2,), float((rank - 1) % 3)))
        assert res["token"].tolist() == [102, 0]  # element-wise max over ranks
        if rank < 2:
            sub_rank, sub_world, sub_gathered = res["sub"]
            assert (sub_rank, sub_world) == (rank, 2) and [t.item() for t in sub_gathered] == [0.5, 1.5]
        counters = res["metrics"].counters
        padded = 2 * max(SIZES) * 4 * 4  # bytes of one padded payload
        reduced = 2 * 16  # two int64 values to and from each of the 2 peers
        assert counters["bytes_sent"] == 2 * padded + 2 * 4 + 12 + 8 + reduced
        assert counters["bytes_recv"] == 2 * padded + 2 * 4 + 12 + 8 + reduced
        assert COMM_WAIT in res["metrics"].totals


def test_single_rank_comm_is_identity():
    comm = Comm.single()
    t = torch.randn(2, 3)
    assert (comm.rank, comm.world_size) == (0, 1)
    for got in (comm.all_gather(t), comm.all_gather_async(t).wait()):
        assert len(got) == 1 and torch.equal(got[0], t) and got[0].data_ptr() == t.data_ptr()  # no copy
    assert comm.all_reduce_max(t) is t
