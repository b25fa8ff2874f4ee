"""What a local engine may take of this machine: how many ranks (one per visible GPU, or on CPU one per core
within the available memory; checked when a pool is made, before any process starts), and how much of a rank's
memory its caches may hold (checked by each rank once its model has loaded)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from apbv.errors import InvalidWorldSize
from apbv.model.loading import default_model_path

CPU_RANK_BYTES = 450 * 2**20  # memory of one CPU rank before the weights (torch, transformers, gloo): ~410 MB seen
CACHE_SHARE = 0.25  # the most a rank's caches hold together, as a share of its memory free after the model loaded


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _available_memory() -> int | None:
    """Bytes of memory available to new processes (Linux: MemAvailable); None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cpu_rank_bytes(model: str | None) -> int:
    """Estimated memory of one CPU rank: CPU_RANK_BYTES plus twice the checkpoint's weight files (bf16 weights
    load as fp32; a hub id not on disk counts as none)."""
    path = Path(model) if model else default_model_path()
    weights = [f for f in path.glob("*") if f.suffix in (".safetensors", ".bin")] if path.is_dir() else []
    return CPU_RANK_BYTES + 2 * sum(f.stat().st_size for f in weights)


def checked_world_size(world_size: int | None, device: str, model: str | None) -> int:
    """The ranks of a local pool (None: every GPU, else 2 CPU ranks or fewer); raises InvalidWorldSize for a
    number this machine cannot run: below 1, above the visible GPUs, or on CPU above its cores or memory."""
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    if device == "cuda" and gpus == 0:
        raise InvalidWorldSize("device cuda was asked for, but no GPU is visible")
    if world_size is None:
        return gpus if device == "cuda" else min(2, cores())
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise InvalidWorldSize(f"world size must be a whole number of ranks >= 1, got {world_size!r}")
    if device == "cuda":
        if world_size > gpus:
            raise InvalidWorldSize(f"{world_size} ranks need {world_size} GPUs; {gpus} are visible")
        return world_size
    if world_size > cores():
        raise InvalidWorldSize(f"{world_size} CPU ranks need {world_size} cores; this machine gives {cores()}")
    need, available = world_size * _cpu_rank_bytes(model), _available_memory()
    if available is not None and need > available:
        raise InvalidWorldSize(
            f"{world_size} CPU ranks need about {need / 2**30:.1f} GiB of memory; {available / 2**30:.1f} GiB "
            "are available"
        )
    return world_size


def free_memory(device: torch.device) -> int | None:
    """Bytes free for this rank's data: the GPU's free memory, or the host's available memory for a CPU rank."""
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else _available_memory()


def cache_budgets(asked: tuple[int, ...], free: int | None) -> tuple[int, ...]:
    """The bytes each cache may hold: as `asked`, scaled down together so that they hold at most CACHE_SHARE of
    `free` (the memory left once the model has loaded; None: unknown, as asked). The rest stays for requests,
    whose limits (`apbv.config.Limits`) do not count the caches."""
    total = sum(asked)
    if free is None or total <= CACHE_SHARE * free:
        return tuple(asked)
    return tuple(int(b * CACHE_SHARE * free / total) for b in asked)
