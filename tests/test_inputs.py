"""apbv.inputs: patchify against transformers' own code, prompt layout, errors, 3-D rope positions."""

from __future__ import annotations

import ast
import importlib.util
import json

import numpy as np
import pytest
import torch

from apbv.errors import EmptyQuestion, InvalidQuestion, TooManyTokens
from apbv.inputs import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    READ_PIXELS_KEY,
    ProcessorSpec,
    build_prompt,
    patchify,
    prepare_inputs,
)
from apbv.synthetic import write_mp4
from apbv.video import SampledVideo, estimate_visual_tokens, read_video

SPEC = ProcessorSpec()
CLOSING = "<|im_end|>\n<|im_start|>assistant\n"


def random_frames(t: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def sampled(frames: np.ndarray, sample_fps: float = 2.0) -> SampledVideo:
    return SampledVideo(frames, sample_fps=sample_fps, source_fps=30.0, duration_s=10.0, source_path=None)


def test_patchify_matches_transformers_image_processor():
    """A video whose frames come in identical pairs is, patch by patch, a list of images (the image processor
    repeats each image over the temporal patch)."""
    hf = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    images = random_frames(3, 56, 84)
    pixel_values, grid = patchify(np.repeat(images, 2, axis=0), SPEC)
    ref = hf.Qwen2VLImageProcessorPil()(list(images), do_resize=False, return_tensors="np")
    assert grid.tolist() == [[3, 4, 6]] and grid.dtype == torch.int64
    assert pixel_values.dtype == torch.float32 and pixel_values.shape == (3 * 4 * 6, 3 * 2 * 14 * 14)
    assert ref["image_grid_thw"].tolist() == [[1, 4, 6]] * 3
    assert np.abs(pixel_values.numpy() - ref["pixel_values"]).max() < 1e-6


def _transformers_video_patchify():
    """Qwen2VLVideoProcessor.patchify, compiled from the installed transformers source (the module itself needs
    torchvision to import)."""
    spec = importlib.util.find_spec("transformers.models.qwen2_vl.video_processing_qwen2_vl")
    tree = ast.parse(open(spec.origin).read())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Qwen2VLVideoProcessor")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "patchify")
    fn.returns = None
    for arg in fn.args.args:
        arg.annotation = None
    namespace = {"torch": torch}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), spec.origin, "exec"), namespace)
    return namespace["patchify"]


@pytest.mark.parametrize("t", [4, 5])  # 5: padded by repeating the last frame
def test_patchify_matches_transformers_video_processor(t):
    frames = random_frames(t, 84, 112, seed=t)
    pixel_values, grid = patchify(frames, SPEC)
    # independent rescale + normalize in float64, then transformers' own patch ordering
    x = (frames.astype(np.float64) / 255 - OPENAI_CLIP_MEAN) / OPENAI_CLIP_STD
    videos = torch.from_numpy(x).permute(0, 3, 1, 2)[None]
    ref, grid_t, grid_h, grid_w = _transformers_video_patchify()(None, videos, 14, 2, 2)
    assert grid.tolist() == [[grid_t, grid_h, grid_w]] == [[(t + 1) // 2, 6, 8]]
    assert torch.allclose(pixel_values.double(), ref[0], atol=1e-6, rtol=0)


def test_patchify_rejects_unresized_frames():
    with pytest.raises(ValueError, match="multiple of 28"):
        patchify(random_frames(2, 50, 56), SPEC)


def test_processor_spec_from_pretrained(tmp_path):
    assert ProcessorSpec.from_pretrained(tmp_path) == ProcessorSpec()
    # the real Qwen2.5-VL preprocessor_config.json's fields
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD),
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
    }))  # fmt: skip
    assert ProcessorSpec.from_pretrained(tmp_path) == ProcessorSpec(min_pixels=3136, max_pixels=12845056)
    (tmp_path / "video_preprocessor_config.json").write_text(
        json.dumps({"size": {"shortest_edge": 1000, "longest_edge": 2000}, "temporal_patch_size": 2})
    )
    assert ProcessorSpec.from_pretrained(tmp_path) == ProcessorSpec(min_pixels=1000, max_pixels=2000)


def test_processor_spec_round_trip(tmp_path):
    spec = ProcessorSpec(min_pixels=3136, max_pixels=28 * 28 * 64, image_mean=(0.5, 0.5, 0.5))
    spec.save_pretrained(tmp_path)
    assert ProcessorSpec.from_pretrained(tmp_path) == spec


def test_read_bounds_only_from_the_projects_key(tmp_path):
    """A video config that transformers 4.5x wrote (image bounds under min/max_pixels) changes nothing about how
    videos are read: only this project's key (the embedded model's) does."""
    spec = ProcessorSpec(min_pixels=3136, max_pixels=12845056)
    spec.save_pretrained(tmp_path)
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps({**spec.to_dict(), "min_pixels": 3136,
                                                                        "max_pixels": 12845056}))  # fmt: skip
    assert ProcessorSpec.from_pretrained(tmp_path).read_video_pixels() == {}
    assert ProcessorSpec.from_pretrained(tmp_path).read_video_pixels(max_pixels=5000) == {"max_pixels": 5000}
    spec.save_video_config(tmp_path, min_pixels=3136, max_pixels=112 * 112)
    loaded = ProcessorSpec.from_pretrained(tmp_path)
    assert loaded.bounds == (3136, 112 * 112)
    assert loaded.read_video_pixels() == {"min_pixels": 3136, "max_pixels": 112 * 112}
    assert loaded.read_video_pixels(max_pixels=5000) == {"min_pixels": 3136, "max_pixels": 5000}  # request wins
    assert READ_PIXELS_KEY not in json.loads((tmp_path / "preprocessor_config.json").read_text())


def test_transformers_5_processor_config_is_read_first(tmp_path):
    """transformers 5 saves one processor_config.json with the video processor nested in it."""
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 3136, "max_pixels": 12845056}))
    (tmp_path / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2_5_VLProcessor",
        "video_processor": {"size": {"shortest_edge": 100352, "longest_edge": 602112}, "patch_size": 14}}))  # fmt: skip
    assert ProcessorSpec.from_pretrained(tmp_path).bounds == (100352, 602112)


def test_read_video_at_model_bounds_keeps_small_frames(tmp_path):
    path = write_mp4(np.zeros((4, 112, 112, 3), np.uint8), tmp_path / "small.mp4")
    spec = ProcessorSpec(read_pixels=(("max_pixels", 112 * 112), ("min_pixels", 3136)))
    assert read_video(path, num_frames=4, **spec.read_video_pixels()).size == (112, 112)
    assert read_video(path, num_frames=4, **ProcessorSpec().read_video_pixels()).size == (336, 336)  # upsampled


QUESTION = "What color was the shape shown in the video? Answer with one word."


def test_prompt_layout(tokenizer):
    frames = random_frames(6, 56, 84)
    p = prepare_inputs(tokenizer, sampled(frames, sample_fps=4.0), QUESTION, SPEC)
    ids = p.input_ids.tolist()
    pad, start, end = tokenizer.convert_tokens_to_ids(["<|video_pad|>", "<|vision_start|>", "<|vision_end|>"])
    assert p.visual_tokens == 3 * 4 * 6 // 4 == ids.count(pad)
    assert p.visual_tokens == estimate_visual_tokens(56, 84, 6, min_pixels=28 * 28)
    assert p.input_ids.dtype == torch.int64 and p.input_ids.ndim == 1
    assert p.n_context + p.n_query == len(ids)
    assert ids[p.n_context - 1] == end and ids[p.n_context - p.visual_tokens - 2] == start
    # the query is the question plus the closing template tokens, tokenized on its own (the harness' method)
    assert ids[p.n_context :] == tokenizer.encode(QUESTION + CLOSING, add_special_tokens=False)
    assert tokenizer.decode(ids[p.n_context :]) == QUESTION + CLOSING
    # Qwen2_5_VLProcessor's way: expand the pad in the templated text, then tokenize
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}],
        tokenize=False, add_generation_prompt=True,
    )  # fmt: skip
    assert ids == tokenizer.encode(text.replace("<|video_pad|>", "<|video_pad|>" * p.visual_tokens))
    assert p.mm_token_type_ids.dtype == torch.int32
    assert p.mm_token_type_ids.tolist() == [2 if i == pad else 0 for i in ids]
    assert p.video_grid_thw.tolist() == [[3, 4, 6]]
    assert p.second_per_grid_ts.tolist() == [0.5]  # temporal_patch_size / sample_fps
    assert torch.equal(p.pixel_values_videos, patchify(frames, SPEC)[0])


def test_speed_test_prompt_sizes(tokenizer):
    """Spec §1.1: a 14-token system turn and user header, an 11-token query for the speed-test question."""
    p = prepare_inputs(tokenizer, sampled(random_frames(2, 28, 28)), "What is in this video?", SPEC)
    assert p.n_context == 14 + 1 + 1 + 1 and p.n_query == 11


@pytest.mark.parametrize("question", ["", "   ", "\n\t "])
def test_empty_question(tokenizer, question):
    with pytest.raises(EmptyQuestion):
        prepare_inputs(tokenizer, sampled(random_frames(2, 28, 28)), question, SPEC)


def test_question_with_vision_tokens(tokenizer):
    with pytest.raises(InvalidQuestion):
        prepare_inputs(tokenizer, sampled(random_frames(2, 28, 28)), "what is <|video_pad|>?", SPEC)


def test_too_many_tokens(tokenizer):
    video = sampled(random_frames(4, 112, 112))  # 2 * 16 = 32 visual tokens
    length = prepare_inputs(tokenizer, video, "Why?", SPEC).input_ids.numel()
    assert prepare_inputs(tokenizer, video, "Why?", SPEC, max_tokens=length).input_ids.numel() == length
    with pytest.raises(TooManyTokens) as info:
        prepare_inputs(tokenizer, video, "Why?", SPEC, max_tokens=length - 1)
    message = str(info.value)
    assert str(length) in message and str(length - 1) in message and "fewer frames" in message


def test_get_rope_index_gives_3d_video_positions(tokenizer, tiny_model):
    """The installed transformers' get_rope_index on PreparedInputs: video tokens get (t, row, col) positions
    (spec §1.5), text continues from the largest position + 1."""
    t, h, w = 4, 56, 84
    p = prepare_inputs(tokenizer, sampled(random_frames(t, h, w), sample_fps=2.0), "Why?", SPEC)
    kw = p.model_kwargs()
    pos, delta = tiny_model.model.get_rope_index(
        kw["input_ids"], kw["mm_token_type_ids"], video_grid_thw=kw["video_grid_thw"],
        second_per_grid_ts=kw["second_per_grid_ts"],
    )  # fmt: skip
    pos = pos[:, 0]
    first = p.n_context - 1 - p.visual_tokens
    start = first  # text before the video counts 0 .. first-1
    assert torch.equal(pos[:, :first], torch.arange(first).expand(3, -1))
    interval = tiny_model.config.vision_config.tokens_per_second * p.second_per_grid_ts.item()
    tt, rr, cc = torch.meshgrid(torch.arange(t // 2), torch.arange(h // 28), torch.arange(w // 28), indexing="ij")
    expected = torch.stack([(tt * interval).long(), rr, cc]).reshape(3, -1) + start
    assert torch.equal(pos[:, first : first + p.visual_tokens], expected)
    after = expected.max() + 1
    tail = pos[:, p.n_context - 1 :]
    assert torch.equal(tail, (torch.arange(tail.shape[1]) + after).expand(3, -1))
    assert delta.item() == pos.max().item() + 1 - p.input_ids.numel()


def test_tokenizer_without_chat_template_gets_qwen_template(tokenizer):
    """Some checkpoints keep the template in the processor's chat_template.json only."""
    from apbv.model.tiny import build_tokenizer

    bare = build_tokenizer()
    bare.chat_template = None
    video = sampled(random_frames(2, 28, 56))
    expected = prepare_inputs(tokenizer, video, QUESTION, SPEC).input_ids
    assert torch.equal(prepare_inputs(bare, video, QUESTION, SPEC).input_ids, expected)


def test_earlier_turns_come_between_the_video_and_the_question(tokenizer):
    """A follow-up question: the video opens the first user turn, earlier answers are assistant turns, and the
    context (up to <|vision_end|>) is the same as for the first question."""
    video = sampled(random_frames(4, 56, 56))  # 2 temporal patches of 2x2 merged tokens
    history = (("What color?", "red"), ("Which shape?", "a circle"))
    first = build_prompt(tokenizer, video, "What color?", SPEC)
    follow_up = build_prompt(tokenizer, video, "How many?", SPEC, history=history)
    pads = "<|video_pad|>" * follow_up.visual_tokens
    assert tokenizer.decode(follow_up.input_ids) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        f"<|vision_start|>{pads}<|vision_end|>What color?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n"
        "<|im_start|>user\nWhich shape?<|im_end|>\n<|im_start|>assistant\na circle<|im_end|>\n"
        "<|im_start|>user\nHow many?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert follow_up.n_context == first.n_context
    assert torch.equal(follow_up.input_ids[: first.n_context], first.input_ids[: first.n_context])
    with pytest.raises(EmptyQuestion):
        build_prompt(tokenizer, video, "How many?", SPEC, history=(("  ", "red"),))
    with pytest.raises(InvalidQuestion):
        build_prompt(tokenizer, video, "How many?", SPEC, history=(("What?", "<|vision_end|>"),))
