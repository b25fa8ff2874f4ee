"""The model runner end to end (issue 3): QwenVLRank + generate on the tiny Qwen2.5-VL, against transformers.

References are independent of the runner: transformers' own forward and `generate` (attention "sdpa", a fresh
instance) on the same prepared inputs, and the monolithic vision tower. The distributed cases run on W = 2, 3, 4
real gloo processes, one spawn per W doing every case (spawning dominates the cost).

Tolerance: LOGIT_TOL = 1e-4 on float32 logits of magnitude ~1. Exact strategies only reorder float32 sums
(chunked kernels, log-sum-exp merges, GEMMs of other shapes); ~1e-6 is observed. The bound is 50x below the
smallest top-2 logit margin seen on this input (5e-3), so greedy tokens must agree, and far below the effect of
a changed attention pattern (Star, which passes nothing, moves the logits by more: checked below).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, GenerationConfig, Qwen2_5_VLForConditionalGeneration

from apbv.attention import get_strategy
from apbv.attention.config import AttentionConfig
from apbv.comm import Comm
from apbv.inputs import (
    PreparedInputs,
    ProcessorSpec,
    VideoShard,
    prepare_inputs,
    shard_frames,
    temporal_shards,
    video_shard,
)
from apbv.metrics import NullRecorder
from apbv.model.generate import generate
from apbv.model.qwen2_5_vl import QwenVLRank
from apbv.model.sampling import Sampler, SamplingParams
from apbv.synthetic import make_sample
from apbv.video import SampledVideo

from .distributed import run_ranks

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

FRAMES = 12  # 6 temporal patches: every W in 1..4 gets at least one
NEW_TOKENS = 8
SAMPLE_FPS = 0.25
LOGIT_TOL = 1e-4
VISION_TOL = 1e-5  # float32 vision tower on fewer frames per call: only GEMM shapes differ
RANK_TIMEOUT_S = 150.0

GREEDY = SamplingParams(max_new_tokens=NEW_TOKENS)
SAMPLED = SamplingParams(max_new_tokens=NEW_TOKENS, do_sample=True, temperature=0.9, top_p=0.8, seed=3)
NUCLEUS_OF_ONE = SamplingParams(max_new_tokens=NEW_TOKENS, do_sample=True, temperature=1.0, top_p=1e-6, seed=5)


def _config(strategy: str, **kw) -> AttentionConfig:
    """Small alignment so that the 112-token context gets a real anchor (8) and real host blocks."""
    return AttentionConfig(strategy, **{"anchor_ratio": 1 / 16, "passing_ratio": 1 / 32, "align": 8, **kw})


EXACT = {"ring": _config("ring"), "apbv_full": _config("apbv", passing_ratio=1.0)}  # full passing: I8
APPROXIMATE = {"apbv": _config("apbv"), "apb": _config("apb"), "star": _config("star")}


@dataclass(frozen=True)
class Run:
    """What one rank saw of one generate call: the yielded tokens, and the logits it sampled from (tail only)."""

    tokens: list[int]
    logits: torch.Tensor | None  # (steps, vocab)


def _load(model_dir: str) -> QwenVLRank:
    return QwenVLRank(Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir))


def _shard(frames: np.ndarray, spec: ProcessorSpec, comm: Comm) -> VideoShard:
    """This rank's temporal patches, patchified from its own frames (as every engine rank does)."""
    patches = temporal_shards(frames.shape[0], comm.world_size, spec)
    return video_shard(shard_frames(frames, patches[comm.rank], spec), patches, spec)


def _generate(model: QwenVLRank, prepared, shard, config, comm, sampling) -> Run:
    """Run generate with a recorder on the logits the tail rank samples from."""
    seen: list[torch.Tensor] = []
    logits = model.logits
    model.logits = lambda hidden: seen.append(logits(hidden)) or seen[-1]
    try:
        embeds = model.encode_video(shard.pixels, shard.grid_thw, shard.tokens_per_rank, comm, NullRecorder())
        tokens = list(generate(model, prepared, embeds, get_strategy(config), comm, NullRecorder(), sampling))
    finally:
        del model.logits
    return Run(tokens, torch.stack(seen) if seen else None)


def _rank_cases(rank: int, world: int, model_dir: str, prepared: PreparedInputs, frames: np.ndarray) -> dict:
    model, spec, comm = _load(model_dir), ProcessorSpec.from_pretrained(model_dir), Comm()
    shard = _shard(frames, spec, comm)
    vision = model.encode_video(shard.pixels, shard.grid_thw, shard.tokens_per_rank, comm, NullRecorder())
    runs = {name: _generate(model, prepared, shard, cfg, comm, GREEDY) for name, cfg in {**EXACT, **APPROXIMATE}.items()}
    for name, sampling in {"sampled": SAMPLED, "sampled_again": SAMPLED, "nucleus_of_one": NUCLEUS_OF_ONE}.items():
        runs[name] = _generate(model, prepared, shard, EXACT["ring"], comm, sampling)
    return {"vision": vision, "runs": runs}


# ---- fixtures -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return make_sample(0, FRAMES, (112, 112), "color").frames


@pytest.fixture(scope="module")
def prepared(tiny_dir, frames) -> PreparedInputs:
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    # A long video read at a low rate: its M-RoPE time span (6 patches x 8 s x 2 positions/s) outlasts the text
    # after it, so the decode positions must follow the prompt's last position, not its largest one.
    video = SampledVideo(frames, sample_fps=SAMPLE_FPS, source_fps=8.0, duration_s=FRAMES / SAMPLE_FPS)
    question = "What color was the shape shown in the video? Answer with one word."
    return prepare_inputs(tokenizer, video, question, ProcessorSpec.from_pretrained(tiny_dir))


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """transformers' own model, a fresh instance with SDPA attention everywhere."""
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def single(tiny_dir, prepared, frames) -> Run:
    """W = 1 dense (the FlashAttention baseline) through the runner, in this process."""
    model, comm = _load(str(tiny_dir)), Comm.single()
    shard = _shard(frames, ProcessorSpec.from_pretrained(tiny_dir), comm)
    return _generate(model, prepared, shard, _config("dense"), comm, GREEDY)


@pytest.fixture(scope="module", params=[2, 3, 4], ids=lambda w: f"W{w}")
def ranks(request, tiny_dir, prepared, frames) -> list[dict]:
    return run_ranks(request.param, _rank_cases, str(tiny_dir), prepared, frames, timeout=RANK_TIMEOUT_S)


def _teacher_forced(reference, prepared: PreparedInputs, tokens: list[int]) -> torch.Tensor:
    """transformers' logits at the last prompt position and after each fed token: (len(tokens), vocab)."""
    kwargs = prepared.model_kwargs()
    ids = torch.cat([prepared.input_ids, torch.tensor(tokens[:-1], dtype=torch.long)])
    kwargs["input_ids"] = ids[None]
    kwargs["mm_token_type_ids"] = torch.cat(
        [prepared.mm_token_type_ids, torch.zeros(len(tokens) - 1, dtype=prepared.mm_token_type_ids.dtype)]
    )[None]
    with torch.no_grad():
        logits = reference(**kwargs).logits[0, prepared.input_ids.numel() - 1 :]
    reference.model.rope_deltas = None  # transformers caches the delta of the last call
    return logits


def _tail(ranks: list[dict], name: str) -> Run:
    """The rank that sampled (the only one that computed logits)."""
    tails = [r["runs"][name] for r in ranks if r["runs"][name].logits is not None]
    assert len(tails) == 1, f"{name}: {len(tails)} ranks computed logits"
    return tails[0]


# ---- W = 1 against transformers -----------------------------------------------------------------------------


def test_dense_logits_equal_transformers_forward(single, reference, prepared):
    with torch.no_grad():
        expected = reference(**prepared.model_kwargs()).logits[0, -1]
    reference.model.rope_deltas = None
    assert torch.allclose(single.logits[0], expected, atol=LOGIT_TOL, rtol=0)


def test_dense_greedy_tokens_equal_transformers_generate(single, reference, prepared):
    with torch.no_grad():
        out = reference.generate(**prepared.model_kwargs(), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)  # fmt: skip
    reference.model.rope_deltas = None
    assert single.tokens == out[0, prepared.input_ids.numel() :].tolist()


def test_dense_decode_logits_equal_teacher_forced_forward(single, reference, prepared):
    assert torch.allclose(single.logits, _teacher_forced(reference, prepared, single.tokens), atol=LOGIT_TOL, rtol=0)


# ---- W = 2, 3, 4 gloo ranks ---------------------------------------------------------------------------------


def test_frame_parallel_vision_equals_monolithic_encoder(ranks, reference, prepared):
    with torch.no_grad():
        out = reference.model.visual(prepared.pixel_values_videos, grid_thw=prepared.video_grid_thw)
    expected = out.pooler_output if hasattr(out, "pooler_output") else out
    for r in ranks:
        assert r["vision"].shape == expected.shape
        assert torch.allclose(r["vision"], expected, atol=VISION_TOL, rtol=0)


@pytest.mark.parametrize("name", sorted(EXACT))
def test_exact_strategies_match_dense(ranks, single, name):
    tail = _tail(ranks, name)
    assert all(r["runs"][name].tokens == single.tokens for r in ranks)
    assert torch.allclose(tail.logits[0], single.logits[0], atol=LOGIT_TOL, rtol=0)


@pytest.mark.parametrize("name", sorted(EXACT))
def test_distributed_decode_equals_single_rank_decode(ranks, single, reference, prepared, name):
    """Every step's logits (prefill, then decode over the sharded cache) equal W = 1 dense decode and
    transformers' forward fed the same tokens."""
    tail = _tail(ranks, name)
    assert tail.logits.shape == single.logits.shape == (NEW_TOKENS, single.logits.shape[1])
    assert torch.allclose(tail.logits, single.logits, atol=LOGIT_TOL, rtol=0)
    assert torch.allclose(tail.logits, _teacher_forced(reference, prepared, tail.tokens), atol=LOGIT_TOL, rtol=0)


@pytest.mark.parametrize("name", sorted(APPROXIMATE))
def test_approximate_strategies_run_in_lock_step(ranks, name):
    streams = [r["runs"][name].tokens for r in ranks]
    assert len(streams[0]) == NEW_TOKENS and all(s == streams[0] for s in streams)
    assert torch.isfinite(_tail(ranks, name).logits).all()


def test_tolerance_tells_star_from_dense(ranks, single):
    """Star passes nothing between blocks. On 2 ranks its one host block follows the anchor, so it is exact (I6);
    on more, later blocks miss earlier ones and the logits must miss dense by far more than LOGIT_TOL (else the
    exactness checks above could not fail)."""
    error = (_tail(ranks, "star").logits[0] - single.logits[0]).abs().max()
    assert error < LOGIT_TOL if len(ranks) == 2 else error > 10 * LOGIT_TOL


# ---- sampling ---------------------------------------------------------------------------------------------


def test_sampling_is_seeded_and_identical_on_every_rank(ranks, single):
    first = [r["runs"]["sampled"].tokens for r in ranks]
    again = [r["runs"]["sampled_again"].tokens for r in ranks]
    assert all(s == first[0] for s in first + again)
    assert first[0] != single.tokens  # temperature 0.9 on near-flat logits leaves the greedy path


def test_nucleus_of_one_token_is_greedy(ranks, single):
    assert all(r["runs"]["nucleus_of_one"].tokens == single.tokens for r in ranks)


def _draws(params: SamplingParams, logits: torch.Tensor, n: int = 2000) -> np.ndarray:
    """One token from each of n samplers seeded 0..n-1: the frequencies of each token."""
    prompt = torch.zeros(1, dtype=torch.long)
    draws = [Sampler(replace(params, seed=i), prompt)(logits) for i in range(n)]
    return np.bincount(draws, minlength=logits.numel()) / n


def test_sampler_follows_the_distribution():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    params = SamplingParams(do_sample=True)
    assert np.allclose(_draws(params, logits), [0.5, 0.3, 0.15, 0.05], atol=0.04)  # 4 sigma of 2000 draws
    # top-p 0.7 keeps {0, 1} (0.5 < 0.7 <= 0.8), renormalised to 5/8, 3/8; top-k 1 keeps the best only
    assert np.allclose(_draws(replace(params, top_p=0.7), logits), [0.625, 0.375, 0, 0], atol=0.04)
    assert np.array_equal(_draws(replace(params, top_k=1), logits, 50), [1, 0, 0, 0])


def test_answers_are_constrained_to_the_checkpoints_closed_set():
    """A checkpoint with an answer set (the embedded model): each token continues one of the allowed answers, however
    the logits lean (here towards token 11, in no answer)."""
    sampler = Sampler(SamplingParams(answers=((5, 9), (6, 7, 9))), torch.zeros(3, dtype=torch.long))
    logits = torch.zeros(12)
    logits[11], logits[6], logits[8] = 10.0, 1.0, 5.0
    assert [sampler(logits) for _ in range(3)] == [6, 7, 9]


def test_checkpoint_generation_config_with_request_overrides():
    config = GenerationConfig(do_sample=True, temperature=0.1, top_p=0.001, top_k=1, repetition_penalty=1.05)
    from_checkpoint = SamplingParams.resolve(config, (7,), max_new_tokens=5)
    assert (from_checkpoint.do_sample, from_checkpoint.temperature, from_checkpoint.top_p) == (True, 0.1, 0.001)
    assert (from_checkpoint.top_k, from_checkpoint.repetition_penalty, from_checkpoint.stop_ids) == (1, 1.05, (7,))
    greedy = SamplingParams.resolve(config, (7,), 5, temperature=0.0, repetition_penalty=1.0)
    assert not greedy.do_sample and greedy.repetition_penalty == 1.0
    plain = SamplingParams.resolve(GenerationConfig(), (), 5)
    assert (plain.do_sample, plain.top_p, plain.repetition_penalty) == (False, 1.0, 1.0)


def test_repetition_penalty_gives_transformers_generate_tokens(reference, prepared, frames, tiny_dir):
    """Greedy with a repetition penalty: the engine's dense decode gives exactly transformers' generate tokens."""
    params = SamplingParams(max_new_tokens=NEW_TOKENS, repetition_penalty=1.5)
    model, comm = _load(str(tiny_dir)), Comm.single()
    shard = _shard(frames, ProcessorSpec.from_pretrained(tiny_dir), comm)
    ours = _generate(model, prepared, shard, _config("dense"), comm, params).tokens
    with torch.inference_mode():
        theirs = reference.generate(**prepared.model_kwargs(), max_new_tokens=NEW_TOKENS, do_sample=False,
                                    repetition_penalty=1.5, eos_token_id=None, min_new_tokens=NEW_TOKENS)  # fmt: skip
    assert ours == theirs[0, prepared.input_ids.numel() :].tolist()
