"""`app.py` as users start it: a subprocess on a free loopback port, for the browser and API tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from apbv.comm import free_port

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
STARTUP_TIMEOUT_S = 240


@contextmanager
def app_server(*args: str, log_name: str = "app.log", env: dict[str, str] | None = None) -> Iterator[str]:
    """Serve `python app.py --device cpu --gpus 2 ARGS` and yield its URL once the page answers (the engine may
    still be starting); the server's output goes to test-artifacts/`log_name`."""
    ARTIFACTS.mkdir(exist_ok=True)
    port, log = free_port(), ARTIFACTS / log_name
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           **(env or {})}  # fmt: skip
    cmd = [sys.executable, "app.py", "--device", "cpu", "--gpus", "2", "--port", str(port), *args]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_ready(url, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_ready(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app.py exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"app.py not ready after {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
