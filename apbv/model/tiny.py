"""The project's own tiny Qwen2.5-VL: a real transformers model and tokenizer, built offline and deterministic.

The tokenizer is a byte-level BPE trained with the `tokenizers` library on a small built-in corpus (the
synthetic task's questions and answers plus common English), with Qwen2's pre-tokenizer regex, the Qwen2.5-VL
special tokens appended after the learned vocabulary (as in the real one) and the Qwen2.5-VL chat template.
`build_tiny_model(out_dir)` saves a checkpoint that `Qwen2_5_VLForConditionalGeneration.from_pretrained` and
`AutoTokenizer.from_pretrained` load offline. `python -m apbv.model.tiny --out DIR` does the same from a shell.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import torch
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)

from apbv import synthetic
from apbv.inputs import (
    CHAT_TEMPLATE,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    ProcessorSpec,
)
from apbv.video import IMAGE_MAX_PIXELS, IMAGE_MIN_PIXELS

IM_START, IM_END, ENDOFTEXT, IMAGE_PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|image_pad|>"
# Qwen2.5-VL's added tokens, in their order in the real vocabulary (151643 ... 151664).
SPECIAL_TOKENS = (
    ENDOFTEXT, IM_START, IM_END, "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", VISION_START, VISION_END, "<|vision_pad|>", IMAGE_PAD, VIDEO_PAD,
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)  # fmt: skip

# Qwen2's pre-tokenizer split (from its tokenizer.json), applied before the byte-level mapping.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

BPE_VOCAB_SIZE = 1024  # learned vocabulary (256 byte symbols + merges); special tokens come on top

_ENGLISH = """
the of and to in is it you that he was for on are with as his they be at one have this from or had by hot
word but what some we can out other were all there when up use your how said an each she which do their time
if will way about many then them write would like so these her long make thing see him two has look more day
could go come did number sound no most people my over know water than call first who may down side been now
find any new work part take get place made live where after back little only round man year came show every
good me give our under name very through just form sentence great think say help low line differ turn cause
much mean before move right boy old too same tell does set three want air well also play small end put home
read hand port large spell add even land here must big high such follow act why ask men change went light kind
off need house picture try us again animal point mother world near build self earth father head stand own page
should country found answer school grow study still learn plant cover food four between state keep eye never
last let thought city cross farm hard start might story saw far sea draw left late run while press close night
real life few north open seem together next white children begin got walk example ease paper group always music
those both mark often letter until mile river car feet care second book carry took science eat room friend began
idea fish mountain stop once base hear horse cut sure watch color face wood main enough plain girl usual young
ready above ever red list though feel talk bird soon body dog family direct pose leave song measure door product
black short numeral class wind question happen complete ship area half rock order fire south problem piece told
knew pass since top whole king space heard best hour better true during hundred five remember step early hold
west ground interest reach fast verb sing listen six table travel less morning ten simple several vowel toward war
lay against pattern slow center love person money serve appear road map rain rule govern pull cold notice voice
unit power town fine certain fly fall lead cry dark machine note wait plan figure star box noun field rest correct
able pound done beauty drive stood contain front teach week final gave green oh quick develop ocean warm free
minute strong special mind behind clear tail produce fact street inch multiply nothing course stay wheel full force
blue object decide surface deep moon island foot system busy test record boat common gold possible plane stead dry
wonder laugh thousand ago ran check game shape equate miss brought heat snow tire bring yes distant fill east paint
language among video frame frames scene camera clip shown appears appeared seconds minutes person people holding
what who where when why how which yes no the a an is are was were zero one two three four five six seven eight nine
"""
# The chat template's own words, so that its system turn tokenizes to 14 tokens as with the real vocabulary.
_TEMPLATE_TEXT = "system\nYou are a helpful assistant.\nuser\nassistant\n"


def _corpus() -> list[str]:
    """Training text: the chat template's words and the synthetic questions and answers (repeated, so that their
    words become single tokens), common English, digits and punctuation."""
    task_lines = [q.format(color=c, shape=s, a=c, b=s) for q in synthetic.QUESTIONS.values()
                  for c in synthetic.COLORS for s in synthetic.SHAPES]  # fmt: skip
    answers = " ".join([*synthetic.COLORS, *synthetic.SHAPES, *synthetic.WORDS, *synthetic.DIGITS])
    symbols = "0123456789 .,:;?!'\"()[]-+*/=%$#@&"
    return [_TEMPLATE_TEXT] * 20 + task_lines * 4 + [answers] * 20 + _ENGLISH.split("\n") + [symbols]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh byte-level BPE tokenizer with Qwen2.5-VL's special tokens and chat template (deterministic)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json()),
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        chat_template=CHAT_TEMPLATE,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )


@functools.cache
def _trained_tokenizer_json() -> str:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok.to_str()


def _mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies over (t, h, w) in Qwen2.5-VL's proportions (16, 24, 24 of 64)."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def tiny_config(**overrides) -> Qwen2_5_VLConfig:
    """A small Qwen2.5-VL config; `text_config={...}` / `vision_config={...}` update the sub-configs, other
    keywords the top level. mrope_section follows head_dim and the vision output size the text hidden size."""
    tokenizer = build_tokenizer()
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "bos_token_id": ids[ENDOFTEXT],
        "eos_token_id": ids[IM_END],
        "pad_token_id": ids[ENDOFTEXT],
        "tie_word_embeddings": False,
        **overrides.pop("text_config", {}),
    }
    head_dim = text.get("head_dim", text["hidden_size"] // text["num_attention_heads"])
    text.setdefault("rope_parameters", {
        "rope_type": "default", "rope_theta": 1e6, "mrope_section": _mrope_section(head_dim)
    })
    vision = {
        "depth": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_heads": 4,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "window_size": 56,  # 2x2 merged patches per window, so 112x112 frames have 4 windows
        "fullatt_block_indexes": [1],  # block 0 windowed, block 1 full
        "tokens_per_second": 2,
        "out_hidden_size": text["hidden_size"],
        **overrides.pop("vision_config", {}),
    }
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
        **overrides,
    )


def build_tiny_model(out_dir: str | Path, seed: int = 0, **overrides) -> Path:
    """Create a seeded random Qwen2_5_VLForConditionalGeneration and save config, safetensors weights, tokenizer
    (with chat template) and preprocessor config to out_dir. Returns out_dir."""
    config = tiny_config(**overrides)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config).eval()
    return save_checkpoint(model, out_dir)


def save_checkpoint(model: Qwen2_5_VLForConditionalGeneration, out_dir: str | Path) -> Path:
    """Save a tiny model with the tiny tokenizer (stop ids in its generation config) and the real checkpoints'
    per-image preprocessor bounds to out_dir. Returns out_dir."""
    out = Path(out_dir)
    tokenizer = build_tokenizer()
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids(t) for t in (IM_END, ENDOFTEXT)]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    ProcessorSpec(min_pixels=IMAGE_MIN_PIXELS, max_pixels=IMAGE_MAX_PIXELS).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the tiny Qwen2.5-VL checkpoint offline.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build_tiny_model(args.out, args.seed))


if __name__ == "__main__":
    main()
