"""The pool attached to workers that torchrun started (the multi-node launch, here two CPU ranks on one node):
requests are served, bad input is answered, and closing the pool shuts the torchrun group down cleanly."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from apbv.comm import free_port
from apbv.engine.api import Request
from apbv.engine.pool import EnginePool
from apbv.errors import EmptyQuestion, VideoUnreadable

pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).resolve().parent.parent
WAIT_S = 120.0


@pytest.fixture(scope="module")
def torchrun_workers(tmp_path_factory):
    key, listen = secrets.token_hex(16), f"127.0.0.1:{free_port()}"
    env = {**os.environ, "APBV_AUTHKEY": key, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "apbv.engine.worker", "--listen", listen]  # fmt: skip
    log = tmp_path_factory.mktemp("torchrun") / "workers.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    yield proc, listen, key, log
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_pool_attached_to_torchrun_serves_and_shuts_down(torchrun_workers, example_video, videos, monkeypatch):
    proc, listen, key, log = torchrun_workers
    monkeypatch.setenv("APBV_AUTHKEY", key)
    with EnginePool(attach=listen, world_size=1, device="cpu") as pool:
        assert pool.world_size == 2 and pool.health()["alive"] and pool.health()["pids"] == []
        request = Request(example_video, "What color was the shape?", strategy="apbv", world_size=2, num_frames=8,
                          max_new_tokens=4)  # fmt: skip
        result = pool.submit(request).result(timeout=WAIT_S)
        assert result.answer and [r.rank for r in result.ranks] == [0, 1]
        with pytest.raises(VideoUnreadable):
            pool.submit(Request(str(videos["text"]), "What color?", num_frames=8)).result(timeout=WAIT_S)
        with pytest.raises(EmptyQuestion):
            pool.submit(Request(example_video, "  "))
        again = pool.submit(request).result(timeout=WAIT_S)
        assert again.token_ids == result.token_ids  # still serving, same greedy answer
    assert proc.wait(timeout=60) == 0, log.read_text(errors="replace")[-2000:]
