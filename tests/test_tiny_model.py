"""apbv.model.tiny: offline save/load round trip, config consistency, a forward pass on prepared inputs."""

from __future__ import annotations

import json

import numpy as np
import torch
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from apbv.inputs import ProcessorSpec, prepare_inputs
from apbv.model.tiny import (
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    build_tiny_model,
    build_tokenizer,
    tiny_config,
)
from apbv.synthetic import make_sample
from apbv.video import SampledVideo


def test_tokenizer_is_deterministic_byte_level_bpe(tokenizer):
    again = build_tokenizer()
    assert again.get_vocab() == tokenizer.get_vocab()
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    for text in ["Which shape was shown in the video?", "naïve café — 日本語 ✓ 12345\n\ttabs", ""]:
        assert tokenizer.decode(tokenizer.encode(text)) == text  # byte level: nothing is unknown
    assert len(tokenizer.encode("red green blue yellow purple orange circle square triangle")) == 9


def test_tokenizer_special_tokens(tokenizer):
    ids = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(len(tokenizer) - len(SPECIAL_TOKENS), len(tokenizer)))  # after the vocabulary
    for token in SPECIAL_TOKENS:
        assert tokenizer.encode(f"a{token}b")[1] == tokenizer.convert_tokens_to_ids(token)  # never split
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"


def test_config_is_small_and_consistent(tokenizer):
    config = tiny_config()
    text, vision = config.text_config, config.vision_config
    assert text.vocab_size == len(tokenizer)
    assert (text.num_attention_heads, text.num_key_value_heads) == (4, 2)
    head_dim = text.hidden_size // text.num_attention_heads
    assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
    assert vision.out_hidden_size == text.hidden_size
    assert all(0 <= i < vision.depth for i in vision.fullatt_block_indexes)
    assert vision.window_size % (vision.patch_size * vision.spatial_merge_size) == 0
    keys = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    tokens = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
    assert [getattr(config, k) for k in keys] == tokenizer.convert_tokens_to_ids(tokens)
    bigger = tiny_config(text_config={"num_hidden_layers": 3, "hidden_size": 192, "num_attention_heads": 6})
    assert bigger.text_config.num_hidden_layers == 3 and bigger.vision_config.out_hidden_size == 192
    assert sum(bigger.text_config.rope_parameters["mrope_section"]) == 16


def test_save_load_round_trip(tiny_dir, tiny_model):
    files = {p.name for p in tiny_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= files
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer.get_vocab() == build_tokenizer().get_vocab()
    assert ProcessorSpec.from_pretrained(tiny_dir) == ProcessorSpec(min_pixels=3136, max_pixels=12845056)
    generation = json.loads((tiny_dir / "generation_config.json").read_text())
    assert set(generation["eos_token_id"]) == set(tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        fresh = Qwen2_5_VLForConditionalGeneration(tiny_config()).state_dict()
    loaded = tiny_model.state_dict()
    assert fresh.keys() == loaded.keys()
    assert all(torch.equal(fresh[k], loaded[k]) for k in fresh)


def test_seed_changes_weights(tmp_path, tiny_model):
    other = Qwen2_5_VLForConditionalGeneration.from_pretrained(build_tiny_model(tmp_path, seed=1))
    w = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(other.state_dict()[w], tiny_model.state_dict()[w])


def _prepared(tokenizer, frames: np.ndarray):
    video = SampledVideo(frames, sample_fps=2.0, source_fps=8.0, duration_s=4.0)
    sample_question = "Which shape was shown in the video? Answer with one word."
    return prepare_inputs(tokenizer, video, sample_question, ProcessorSpec())


def test_forward_on_prepared_inputs(tiny_dir, tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    frames = make_sample(0, 8, (112, 112), "shape").frames
    p = _prepared(tokenizer, frames)
    with torch.no_grad():
        logits = tiny_model(**p.model_kwargs()).logits
        # the video reaches the language model: other pixels change the answer logits
        other = tiny_model(**_prepared(tokenizer, frames[::-1].copy()).model_kwargs()).logits
        # mm_token_type_ids select the 3-D positions: without them transformers falls back to 1-D ones
        kw = p.model_kwargs()
        kw.pop("mm_token_type_ids")
        fallback = tiny_model(**kw).logits
        tiny_model.model.rope_deltas = None
    assert logits.shape == (1, p.input_ids.numel(), len(tokenizer)) and torch.isfinite(logits).all()
    assert not torch.allclose(logits[0, -1], other[0, -1])
    assert not torch.allclose(logits[0, p.n_context :], fallback[0, p.n_context :])
