"""The project as a package (issue 15, item 7): `pip install -e .` (README's commands) installs it, and a pool
started from any working directory starts ranks that import `apbv` (they used to fail: "No module named 'apbv'")."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent

ASK = """
import sys
sys.path.insert(0, sys.argv[1])  # how a script outside the checkout finds an uninstalled apbv
from apbv.engine.api import Request
from apbv.engine.pool import EnginePool
with EnginePool(world_size=1, device="cpu") as pool:
    request = Request(sys.argv[2], "What color was the shape?", strategy="dense", world_size=1, num_frames=4,
                      max_new_tokens=4)
    print(pool.submit(request).result(timeout=120).answer)
"""


def _env_without_pythonpath() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}


def test_pool_started_outside_the_checkout_starts_working_ranks(tmp_path, example_video):
    done = subprocess.run([sys.executable, "-c", ASK, str(ROOT), example_video], cwd=tmp_path,
                          env=_env_without_pythonpath(), capture_output=True, text=True, timeout=180)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip()


def test_editable_install_imports_the_checkout_from_anywhere(tmp_path):
    """README's `pip install -e .` in a throw-away virtual environment (offline: the build backend and the
    dependencies come from this environment through a .pth file, and --no-deps skips their resolution)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    (Path(purelib) / "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = [python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index", "-e",
               str(ROOT)]  # fmt: skip
    done = subprocess.run(install, cwd=tmp_path, env=_env_without_pythonpath(), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    where = subprocess.run([python, "-c", "import apbv.engine.pool, apbv; print(apbv.__file__)"], cwd=tmp_path,
                           env=_env_without_pythonpath(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert where.returncode == 0, where.stderr[-2000:]
    assert Path(where.stdout.strip()) == ROOT / "apbv" / "__init__.py"
