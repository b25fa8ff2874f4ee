"""Real Qwen2.5-VL architectures with random weights, for speed runs (speed does not depend on weight values).

Sizes are those of the public Qwen2.5-VL-3B/7B-Instruct configs; special-token ids are the project's tokenizer's
(built offline), so prompts built by `apbv.inputs` drive them exactly like a real checkpoint.
"""

from __future__ import annotations

import argparse

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from apbv.model.tiny import tiny_config

_VISION = {  # shared by 3B and 7B
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "spatial_merge_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "tokens_per_second": 2,
}

ARCHITECTURES = {
    "qwen2.5-vl-3b": {
        "text": {"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16,
                 "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True},
    },
    "qwen2.5-vl-7b": {
        "text": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                 "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False},
    },
    "tiny": {  # for checking the benchmarks themselves on a CPU
        "text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "mrope_section": [2, 3, 3]},
        "vision": {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                   "fullatt_block_indexes": [1]},
    },
}


def architecture_config(name: str) -> Qwen2_5_VLConfig:
    arch = ARCHITECTURES[name]
    text = dict(arch["text"])
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": text.pop("mrope_section", [16, 24, 24])}
    text |= {"max_position_embeddings": 128000, "rope_parameters": rope}
    vision = {**_VISION, **arch.get("vision", {}), "out_hidden_size": text["hidden_size"]}
    return tiny_config(text_config=text, vision_config=vision)


def random_model(name: str, device: torch.device, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """A randomly initialised model of a real architecture, built directly on `device`."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(architecture_config(name), dtype=dtype)
    return model.eval()


def add_run_arguments(parser: argparse.ArgumentParser, warmup: int = 1, repeats: int = 3) -> None:
    """The options every model benchmark shares: architecture, frame counts, device, warm-up and repeat counts."""
    parser.add_argument("--arch", choices=ARCHITECTURES, default="qwen2.5-vl-3b")
    parser.add_argument("--frames", type=int, nargs="+", default=[64])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--repeats", type=int, default=repeats, help="timed runs; the median is reported")


def model_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs (as deployed), fp32 on CPUs."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32
