"""The official pipeline, run in the second test environment (torch + torchvision + qwen-vl-utils): what
qwen-vl-utils' `process_vision_info`, transformers' Qwen2.5-VL processor and `generate` give for one video question.

    APBV_OFFICIAL_PYTHON tests/official_pipeline.py CASES.json OUT.npz

CASES.json: a list of {"name", "model", "video", "question", "video_options" (the message's video entry:
nframes / fps / min_pixels / max_pixels), "max_new_tokens", "answers" (token ids of a closed answer set, optional:
generate's prefix_allowed_tokens_fn)}. OUT.npz holds per case NAME: NAME/frames (the
resized frames qwen-vl-utils returns, float), NAME/indices, NAME/input_ids, NAME/mm_token_type_ids,
NAME/video_grid_thw, NAME/second_per_grid_ts, NAME/pixel_values_videos, NAME/positions (the model's get_rope_index)
and NAME/tokens (generate's new tokens, greedy by the checkpoint's generation config). This file imports nothing
of the project: it is the independent side of tests/test_conformance.py.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
from qwen_vl_utils import process_vision_info
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, Qwen2VLImageProcessor
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor


def run_case(case: dict, models: dict) -> dict[str, np.ndarray]:
    if case["model"] not in models:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(case["model"], dtype=torch.float32).eval()
        model.set_attn_implementation({"text_config": "sdpa", "vision_config": "sdpa"})
        tokenizer = AutoTokenizer.from_pretrained(case["model"])
        processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
                                        video_processor=Qwen2VLVideoProcessor.from_pretrained(case["model"]),
                                        chat_template=tokenizer.chat_template)  # fmt: skip
        models[case["model"]] = model, processor
    model, processor = models[case["model"]]
    video = {"type": "video", "video": case["video"], **case["video_options"]}
    messages = [{"role": "user", "content": [video, {"type": "text", "text": case["question"]}]}]
    # transformers 5 takes the sampled rate from the video's metadata (VideoMetadata.sampled_fps)
    _, videos, video_kwargs = process_vision_info(messages, return_video_kwargs=True, return_video_metadata=True)
    frames, metadata = videos[0]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], videos=[frames], video_metadata=[metadata], return_tensors="pt", **video_kwargs)
    positions, _ = model.model.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"], video_grid_thw=inputs["video_grid_thw"],
        second_per_grid_ts=inputs["second_per_grid_ts"], attention_mask=inputs["attention_mask"],
    )  # fmt: skip
    constraint = {}
    if case.get("answers"):  # the checkpoint's closed answer set, as generate's own prefix constraint
        prompt = inputs["input_ids"].shape[1]

        def allowed(batch: int, ids: torch.Tensor) -> list[int]:
            done = ids[prompt:].tolist()
            return sorted({a[len(done)] for a in case["answers"] if a[: len(done)] == done and len(a) > len(done)})

        constraint = {"prefix_allowed_tokens_fn": allowed}
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=case["max_new_tokens"], **constraint)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    stops = model.generation_config.eos_token_id
    stops = set(stops if isinstance(stops, list) else [stops])
    tokens = new[: next((i for i, t in enumerate(new) if t in stops), len(new))]
    return {
        "frames": frames.permute(0, 2, 3, 1).numpy(),
        "indices": np.asarray(metadata["frames_indices"]),
        "input_ids": inputs["input_ids"][0].numpy(),
        "mm_token_type_ids": inputs["mm_token_type_ids"][0].numpy(),
        "video_grid_thw": inputs["video_grid_thw"].numpy(),
        "second_per_grid_ts": inputs["second_per_grid_ts"].numpy(),
        "pixel_values_videos": inputs["pixel_values_videos"].numpy(),
        "positions": positions[:, 0].numpy(),
        "tokens": np.asarray(tokens, dtype=np.int64),
    }


def main() -> None:
    cases, out = json.loads(open(sys.argv[1]).read()), sys.argv[2]
    models: dict = {}
    arrays = {f"{case['name']}/{key}": value for case in cases for key, value in run_case(case, models).items()}
    np.savez(out, **arrays)


if __name__ == "__main__":
    main()
