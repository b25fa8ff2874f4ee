"""The repository as a Hugging Face Space: README front matter the Hub reads, and app.py's settings from the
environment the Space provides (loopback everywhere else)."""

from __future__ import annotations

from pathlib import Path

import gradio
from huggingface_hub import SpaceCard

import app

ROOT = Path(__file__).resolve().parent.parent


def test_readme_front_matter_makes_a_gradio_space_of_app_py():
    card = SpaceCard.load(ROOT / "README.md")
    assert (card.data.sdk, card.data.app_file) == ("gradio", "app.py") and (ROOT / card.data.app_file).is_file()
    assert card.data.sdk_version.split(".")[0] == gradio.__version__.split(".")[0]
    assert card.data.title and card.text.lstrip().startswith("# APB-V Video QA")


def test_app_listens_on_loopback_with_the_embedded_model_unless_told(monkeypatch):
    for name in ("APBV_MODEL", "APBV_GPUS", "GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT"):
        monkeypatch.delenv(name, raising=False)
    args = app.parse_args([])
    assert (args.model, args.gpus, args.host, args.port) == (None, None, "127.0.0.1", 7860)


def test_space_settings_choose_the_checkpoint_ranks_and_address(monkeypatch):
    monkeypatch.setenv("APBV_MODEL", "Qwen/Qwen2.5-VL-7B-Instruct")
    monkeypatch.setenv("APBV_GPUS", "4")
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7861")
    args = app.parse_args([])
    assert (args.model, args.gpus, args.host, args.port) == ("Qwen/Qwen2.5-VL-7B-Instruct", 4, "0.0.0.0", 7861)
    assert app.parse_args(["--model", "/models/m"]).model == "/models/m"  # the command line wins
