"""Load a Qwen2.5-VL checkpoint (hub id or local path) or the project's embedded model, once per rank."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase, Qwen2_5_VLForConditionalGeneration

from apbv.inputs import ProcessorSpec
from apbv.model.qwen2_5_vl import QwenVLRank

REPO_ROOT = Path(__file__).resolve().parents[2]
ANSWERS_FILE = "answers.json"
EMBEDDED_MODEL = REPO_ROOT / "assets" / "model"


@dataclass
class LoadedModel:
    name: str
    rank_model: QwenVLRank
    tokenizer: PreTrainedTokenizerBase
    spec: ProcessorSpec
    stop_ids: tuple[int, ...]
    generation_config: GenerationConfig
    answers: tuple[tuple[int, ...], ...] = ()  # token ids of the only answers the model may give (ANSWERS_FILE)


def default_model_path() -> Path:
    """The embedded model shipped in assets/ (trained on the synthetic task); built from a seed if absent."""
    if (EMBEDDED_MODEL / "config.json").exists():
        return EMBEDDED_MODEL
    from apbv.model.tiny import build_tiny_model

    cache = Path(os.environ.get("APBV_CACHE", Path.home() / ".cache" / "apbv")) / "tiny-random"
    if not (cache / "config.json").exists():  # build aside, then rename: concurrent builders never see half a model
        cache.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=cache.parent, prefix=".tiny-"))
        build_tiny_model(staging)
        try:
            staging.rename(cache)
        except OSError:  # another process won the race
            shutil.rmtree(staging, ignore_errors=True)
    return cache


def load_model(name_or_path: str | None, device: torch.device) -> LoadedModel:
    """bf16 on GPU, fp32 on CPU; no remote code."""
    path = str(name_or_path or default_model_path())
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    generation = model.generation_config
    return LoadedModel(
        name=name_or_path or "embedded",
        rank_model=QwenVLRank(model),
        tokenizer=tokenizer,
        spec=ProcessorSpec.from_pretrained(path),
        stop_ids=stop_ids(generation, tokenizer),
        generation_config=generation,
        answers=answer_ids(Path(path), tokenizer),
    )


def answer_ids(path: Path, tokenizer: PreTrainedTokenizerBase) -> tuple[tuple[int, ...], ...]:
    """The token ids of each answer listed in the checkpoint's ANSWERS_FILE (this project's option for models that
    answer from a closed set, as the embedded one does), each ending with <|im_end|>; () without the file."""
    file = path / ANSWERS_FILE
    if not file.is_file():
        return ()
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return tuple((*tokenizer.encode(answer, add_special_tokens=False), end) for answer in json.loads(file.read_text()))


def save_answers(path: str | Path, answers: tuple[str, ...]) -> Path:
    """Write a checkpoint's ANSWERS_FILE: decoding is then constrained to these answers."""
    file = Path(path) / ANSWERS_FILE
    file.write_text(json.dumps(list(answers)) + "\n")
    return file


def stop_ids(generation: GenerationConfig, tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """The tokens that end an answer: the generation config's eos ids, the tokenizer's eos and <|im_end|>."""
    eos = generation.eos_token_id
    found = [*(eos if isinstance(eos, (list, tuple)) else [eos]), tokenizer.eos_token_id,
             tokenizer.convert_tokens_to_ids("<|im_end|>")]  # fmt: skip
    return tuple(sorted({i for i in found if isinstance(i, int) and i >= 0}))
