"""From (tokenizer, sampled video, question) to Qwen2.5-VL model inputs, without torchvision.

`patchify` reproduces transformers' Qwen2-VL video processor on frames that `apbv.video` already sampled and
resized (rescale, normalize, temporal patch grouping, merge-aware patch order). `prepare_inputs` applies the
tokenizer's chat template to one user turn [video, question], expands the single <|video_pad|> to one pad per
merged patch, and splits the sequence into context (everything up to <|vision_end|>) and query (the question
plus the closing template tokens).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from apbv.attention.layout import split_temporal_patches
from apbv.errors import EmptyQuestion, InvalidQuestion, TooManyTokens
from apbv.video import VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS, SampledVideo

VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
VIDEO_PAD = "<|video_pad|>"
VIDEO_TOKEN_TYPE = 2  # mm_token_type_ids: text 0, image 1, video 2 (transformers' ProcessorMixin)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The Qwen2-VL / Qwen2.5-VL chat template: default system turn, one <|vision_start|><|X_pad|><|vision_end|> per
# image or video item, text items verbatim, "<|im_start|>assistant\n" on add_generation_prompt.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)  # fmt: skip

# Checkpoint files ProcessorSpec.from_pretrained reads, first found wins: transformers 5 keeps the video processor in
# processor_config.json ("video_processor"), earlier versions in video_preprocessor_config.json.
PROCESSOR_CONFIG_FILE = "processor_config.json"
VIDEO_CONFIG_FILE = "video_preprocessor_config.json"
IMAGE_CONFIG_FILE = "preprocessor_config.json"
# This project's key in video_preprocessor_config.json: the per-frame bounds to read videos at (what a user would pass
# to qwen-vl-utils as the message's min_pixels / max_pixels). Only the embedded model has it.
READ_PIXELS_KEY = "apbv_read_pixels"


@dataclass(frozen=True)
class ProcessorSpec:
    """The checkpoint's video processor. min/max_pixels: its per-frame resize bounds (size.shortest/longest_edge):
    frames qwen-vl-utils sized within them pass unchanged, others the processor resizes again (`plan_video`'s
    processor_bounds).

    read_pixels: the bounds to read videos at instead of qwen-vl-utils' defaults, from READ_PIXELS_KEY; empty for
    real checkpoints, which get qwen-vl-utils' defaults exactly as the official pipeline gives them."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    min_pixels: int = VIDEO_MIN_PIXELS
    max_pixels: int = VIDEO_MAX_PIXELS
    read_pixels: tuple[tuple[str, int], ...] = ()

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ProcessorSpec:
        """The video processor of a checkpoint directory (defaults where it has none)."""
        root = Path(path)
        processor = root / PROCESSOR_CONFIG_FILE
        if processor.is_file() and "video_processor" in (nested := json.loads(processor.read_text())):
            return cls.from_dict(nested["video_processor"])
        for name in (VIDEO_CONFIG_FILE, IMAGE_CONFIG_FILE):
            if (root / name).is_file():
                return cls.from_dict(json.loads((root / name).read_text()))
        return cls()

    @classmethod
    def from_dict(cls, cfg: dict) -> ProcessorSpec:
        """Accepts both spellings of the pixel bounds: min/max_pixels and size.shortest/longest_edge."""
        size = cfg.get("size") or {}
        values = {
            "min_pixels": cfg.get("min_pixels", size.get("shortest_edge")),
            "max_pixels": cfg.get("max_pixels", size.get("longest_edge")),
            **{k: cfg.get(k) for k in ("patch_size", "temporal_patch_size", "merge_size", "rescale_factor")},
            **{k: tuple(cfg[k]) for k in ("image_mean", "image_std") if k in cfg},
            "read_pixels": tuple(sorted(cfg.get(READ_PIXELS_KEY, {}).items())) or None,
        }
        return cls(**{k: v for k, v in values.items() if v is not None})

    def to_dict(self) -> dict:
        """preprocessor_config.json contents that both this class and transformers' Qwen2-VL processors read."""
        fields = {k: v for k, v in asdict(self).items() if k != "read_pixels"}
        return {
            **fields,
            "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": "Qwen2_5_VLProcessor",
            "do_resize": True,
            "do_rescale": True,
            "do_normalize": True,
            "do_convert_rgb": True,
        }

    def save_pretrained(self, path: str | Path) -> Path:
        """Write preprocessor_config.json into a checkpoint directory; returns the file."""
        file = Path(path) / IMAGE_CONFIG_FILE
        file.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return file

    def save_video_config(self, path: str | Path, min_pixels: int, max_pixels: int) -> Path:
        """Write video_preprocessor_config.json: this spec with the per-frame video bounds the model expects, both
        as the processor's bounds and as the bounds to read videos at (READ_PIXELS_KEY)."""
        bounds = {"min_pixels": min_pixels, "max_pixels": max_pixels}
        cfg = {**replace(self, **bounds).to_dict(), "video_processor_type": "Qwen2VLVideoProcessor",
               READ_PIXELS_KEY: bounds}  # fmt: skip
        file = Path(path) / VIDEO_CONFIG_FILE
        file.write_text(json.dumps(cfg, indent=2) + "\n")
        return file

    def read_video_pixels(self, max_pixels: int | None = None) -> dict[str, int]:
        """Pixel keyword arguments for `apbv.video.plan_video`: the checkpoint's read bounds where it has them, a
        request's max_pixels over them; empty means qwen-vl-utils' defaults."""
        pixels = dict(self.read_pixels)
        if max_pixels:
            pixels["max_pixels"] = max_pixels
        return pixels

    @property
    def bounds(self) -> tuple[int, int]:
        """(min_pixels, max_pixels): the processor's own per-frame resize bounds."""
        return self.min_pixels, self.max_pixels

    @property
    def factor(self) -> int:
        """Frame sides must be multiples of this (28 for Qwen2.5-VL)."""
        return self.patch_size * self.merge_size


@dataclass(frozen=True)
class Prompt:
    """The tokenised prompt of one request, without pixels (batch dimension left out); small enough to send to
    every rank. n_context + n_query == len(input_ids)."""

    input_ids: torch.Tensor  # (L,) int64
    n_context: int  # tokens up to and including <|vision_end|>
    n_query: int  # question text + <|im_end|>\n<|im_start|>assistant\n
    video_grid_thw: torch.Tensor  # (1, 3) int64, in patches
    second_per_grid_ts: torch.Tensor  # (1,) float32
    mm_token_type_ids: torch.Tensor  # (L,) int32: 2 on video pads, 0 elsewhere
    visual_tokens: int


@dataclass(frozen=True)
class PreparedInputs(Prompt):
    """A Prompt with the pixels of every frame (single-process use; ranks patchify their own frames)."""

    pixel_values_videos: torch.Tensor  # (t*h*w, 3*temporal_patch*patch*patch) float32

    def model_kwargs(self) -> dict[str, torch.Tensor]:
        """Batched (B = 1) keyword arguments for a transformers Qwen2.5-VL forward / get_rope_index."""
        return {
            "input_ids": self.input_ids[None],
            "mm_token_type_ids": self.mm_token_type_ids[None],
            "pixel_values_videos": self.pixel_values_videos,
            "video_grid_thw": self.video_grid_thw,
            "second_per_grid_ts": self.second_per_grid_ts,
        }


def patchify(frames: np.ndarray | torch.Tensor, spec: ProcessorSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames (T, H, W, 3) uint8, sides multiples of spec.factor -> (pixel_values_videos float32, video_grid_thw),
    computed on the frames' device (a GPU rank patchifies on its GPU).

    Mirrors Qwen2VLVideoProcessor: odd T is padded by repeating the last frame; rows are ordered
    (t, h-block, w-block, h-in-block, w-in-block) with merge_size-sized blocks, columns (channel, time, y, x).
    """
    video = torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != torch.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got {tuple(video.shape)} {video.dtype}")
    t, height, width, channels = video.shape
    if height % spec.factor or width % spec.factor:
        raise ValueError(f"frame size {height}x{width} is not a multiple of {spec.factor}; resize with apbv.video")
    video = video.permute(0, 3, 1, 2)
    if pad := -t % spec.temporal_patch_size:
        video = torch.cat([video, video[-1:].expand(pad, -1, -1, -1)])
    # rescale and normalize fused, in float32, as transformers' torch backend does
    mean = torch.tensor(spec.image_mean, device=video.device) * (1.0 / spec.rescale_factor)
    std = torch.tensor(spec.image_std, device=video.device) * (1.0 / spec.rescale_factor)
    video = (video.to(torch.float32) - mean[:, None, None]) / std[:, None, None]

    p, m, tp = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    grid_t, grid_h, grid_w = video.shape[0] // tp, height // p, width // p
    patches = video.reshape(grid_t, tp, channels, grid_h // m, m, p, grid_w // m, m, p)
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    pixel_values = patches.reshape(grid_t * grid_h * grid_w, channels * tp * p * p)
    return pixel_values, torch.tensor([[grid_t, grid_h, grid_w]], dtype=torch.int64)


@dataclass(frozen=True)
class VideoShard:
    """One rank's share of a video: the pixel rows of its temporal patches, their grid, and every rank's count of
    merged visual tokens (the sizes of the embeddings' all-gather)."""

    pixels: torch.Tensor
    grid_thw: torch.Tensor
    tokens_per_rank: tuple[int, ...]


def temporal_shards(num_frames: int, world_size: int, spec: ProcessorSpec) -> tuple[range, ...]:
    """The temporal patches each rank encodes (frame-parallel vision): consecutive, remainders to the lowest ranks.
    Raises LayoutError when there are fewer patches than ranks."""
    n_patches = -(-num_frames // spec.temporal_patch_size)
    return tuple(split_temporal_patches(n_patches, world_size, spec.temporal_patch_size))


def shard_frames(frames: np.ndarray, patches: range, spec: ProcessorSpec) -> np.ndarray:
    """The frames of temporal patches `patches` (a rank's range from `temporal_shards`)."""
    tp = spec.temporal_patch_size
    return frames[tp * patches.start : tp * patches.stop]


def video_shard(local_frames: np.ndarray, shards: Sequence[range], spec: ProcessorSpec) -> VideoShard:
    """A rank's VideoShard from its own frames (`shard_frames`) and every rank's patches (`temporal_shards`)."""
    pixels, grid = patchify(local_frames, spec)
    per_patch = (local_frames.shape[1] // spec.factor) * (local_frames.shape[2] // spec.factor)
    return VideoShard(pixels, grid, tuple(len(r) * per_patch for r in shards))


class VideoLayout(Protocol):
    """What the prompt needs of a video: how many frames, their size (height, width), and their rate. Both frames
    already read (`SampledVideo`) and a plan of frames still to read (`VideoPlan`) have it."""

    num_frames: int
    size: tuple[int, int]
    sample_fps: float


def video_grid(frames_shape: tuple[int, ...], spec: ProcessorSpec) -> torch.Tensor:
    """video_grid_thw (1, 3) in patches for frames of shape (T, H, W[, 3]), as `patchify` returns it."""
    t, height, width = frames_shape[:3]
    grid_t = -(-t // spec.temporal_patch_size)
    return torch.tensor([[grid_t, height // spec.patch_size, width // spec.patch_size]], dtype=torch.int64)


def visual_token_count(frames_shape: tuple[int, ...], spec: ProcessorSpec) -> int:
    """Number of <|video_pad|> tokens for frames of shape (T, H, W, 3)."""
    return int(video_grid(frames_shape, spec).prod()) // spec.merge_size**2


def prepare_inputs(
    tokenizer: PreTrainedTokenizerBase,
    video: SampledVideo,
    question: str,
    spec: ProcessorSpec,
    max_tokens: int | None = None,
) -> PreparedInputs:
    """`build_prompt` plus the pixels of every frame."""
    prompt = build_prompt(tokenizer, video, question, spec, max_tokens)
    pixel_values, _ = patchify(video.frames, spec)
    return PreparedInputs(**vars(prompt), pixel_values_videos=pixel_values)


def chat_messages(question: str, history: Sequence[tuple[str, str]] = ()) -> list[dict]:
    """The conversation in the chat template's form: the video opens the first user turn, then each earlier
    (question, answer) turn, then `question`."""
    questions = [q for q, _ in history] + [question]
    for q in questions:
        if not q or not q.strip():
            raise EmptyQuestion("the question is empty")
    messages: list[dict] = []
    for i, (q, a) in enumerate([*history, (question, None)]):
        text = {"type": "text", "text": q}
        messages.append({"role": "user", "content": [{"type": "video"}, text] if i == 0 else [text]})
        if a is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": a}]})
    return messages


def build_prompt(
    tokenizer: PreTrainedTokenizerBase,
    video: VideoLayout,
    question: str,
    spec: ProcessorSpec,
    max_tokens: int | None = None,
    history: Sequence[tuple[str, str]] = (),
) -> Prompt:
    """Chat-template the conversation (`chat_messages`: the video and the first question, earlier answers,
    `question` last) with add_generation_prompt=True and tokenise it (the tokenizer's own template; the Qwen2.5-VL
    one if it has none). The context is everything up to <|vision_end|>; the query the rest.

    Raises EmptyQuestion (blank question), InvalidQuestion (a turn holds one of the tokenizer's control tokens,
    e.g. <|im_start|> or <|video_pad|>, which would forge roles or vision slots) and TooManyTokens (prompt longer
    than max_tokens; checked before the pixels are processed).
    """
    messages = chat_messages(question, history)
    _refuse_control_tokens(tokenizer, [question, *(text for turn in history for text in turn)])
    template = CHAT_TEMPLATE if tokenizer.chat_template is None else None  # checkpoints keeping it elsewhere
    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(text, add_special_tokens=False)
    pad_id, start_id, end_id = (_token_id(tokenizer, tok) for tok in (VIDEO_PAD, VISION_START, VISION_END))
    if ids.count(pad_id) != 1 or ids.count(start_id) != 1 or ids.count(end_id) != 1:
        raise InvalidQuestion("the conversation must not contain the special tokens <|vision_start|>, "
                              "<|video_pad|> or <|vision_end|>")

    shape = (video.num_frames, *video.size)
    visual_tokens = visual_token_count(shape, spec)
    length = len(ids) - 1 + visual_tokens
    if max_tokens is not None and length > max_tokens:
        raise TooManyTokens(
            f"the prompt has {length} tokens ({visual_tokens} visual), more than the limit of {max_tokens}; "
            "use fewer frames or a lower resolution"
        )
    pad_at = ids.index(pad_id)
    input_ids = torch.tensor(ids[:pad_at] + [pad_id] * visual_tokens + ids[pad_at + 1 :], dtype=torch.int64)
    n_context = int((input_ids == end_id).nonzero()[0, 0]) + 1
    return Prompt(
        input_ids=input_ids,
        n_context=n_context,
        n_query=length - n_context,
        video_grid_thw=video_grid(shape, spec),
        second_per_grid_ts=torch.tensor([spec.temporal_patch_size / video.sample_fps], dtype=torch.float32),
        mm_token_type_ids=((input_ids == pad_id) * VIDEO_TOKEN_TYPE).to(torch.int32),
        visual_tokens=visual_tokens,
    )


def _refuse_control_tokens(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> None:
    """Raise InvalidQuestion when a text holds one of the tokenizer's special added tokens (typed as text, the
    tokenizer would still read it as the control token)."""
    controls = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]
    for text in texts:
        for token in controls:
            if token in text:
                raise InvalidQuestion(f"the conversation must not contain the control token {token}")


def _token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {token} token; is it a Qwen2.5-VL tokenizer?")
    return token_id
