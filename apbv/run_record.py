"""What every benchmark result records so that anyone can rerun it: date, machine, versions, command."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import sys
from pathlib import Path

import torch
import transformers


def environment(device: torch.device) -> dict:
    cuda = device.type == "cuda"
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        "gpus_visible": torch.cuda.device_count() if cuda else 0,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "command": _launcher() + " ".join(shlex.quote(a) for a in [_module_name()] + sys.argv[1:]),
    }


def _launcher() -> str:
    """How this process was started: plain `python -m`, or as one of torchrun's ranks."""
    world, local = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if world == 1:
        return "python -m "
    nodes = f"--nnodes {world // local} " if world != local else ""
    return f"python -m torch.distributed.run {nodes}--nproc-per-node {local} -m "


def _module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None else Path(sys.argv[0]).stem


def write_json(path: str | Path, meta: dict, rows: list[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
