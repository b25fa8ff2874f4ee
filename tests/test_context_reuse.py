"""Follow-up questions continue the conversation's K/V (`apbv.engine.context_cache`, `QwenVLRank.extend`).

Model level, against an independent reference: transformers' own forward (SDPA, a fresh instance) teacher-forced
on the follow-up's whole prompt. Our runner prefills the first turn, keeps its cache, and prefills only the
follow-up's new tokens over it: the logits of every step equal the reference within LOGIT_TOL (1e-4 on float32
logits of magnitude ~1: only the order of float32 sums differs, ~1e-6 is observed, as in test_model.py), dense on
one rank and ring on two and three gloo processes. Engine level, on the real pool (embedded model, 2 CPU ranks):
which requests continue a cached conversation, that they skip reading and encoding the video, and that their
answers equal a full prefill's.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from apbv.attention import get_strategy
from apbv.attention.config import AttentionConfig
from apbv.comm import Comm
from apbv.engine.api import Request, Result
from apbv.engine.context_cache import ContextCache, ContextKey
from apbv.engine.pool import EnginePool
from apbv.engine.video_cache import VideoKey
from apbv.inputs import PreparedInputs, ProcessorSpec, build_prompt, patchify
from apbv.metrics import NullRecorder
from apbv.model.cache import ShardedKVCache
from apbv.model.generate import KVContext, generate
from apbv.model.qwen2_5_vl import QwenVLRank
from apbv.model.sampling import SamplingParams
from apbv.synthetic import make_sample
from apbv.video import SampledVideo
from tests.test_model import _shard
from ui.examples import load_examples

from .distributed import run_ranks

LOGIT_TOL = 1e-4
FIRST, FOLLOW_UP = "What color was the shape shown in the video?", "And which shape was it? Answer with one word."
GREEDY = SamplingParams(max_new_tokens=6)
WAIT_S = 120.0


def _turns(model: QwenVLRank, tokenizer, spec: ProcessorSpec, video: SampledVideo, frames: np.ndarray,
           strategy: str, comm: Comm) -> dict:  # fmt: skip
    """The first turn prefilled, then the follow-up continued over its cache (through ContextCache, as the engine
    does): tokens, the follow-up's logits per step, how many prompt tokens it reused."""
    config = AttentionConfig(strategy, align=8)
    shard = _shard(frames, spec, comm)
    embeds = model.encode_video(shard.pixels, shard.grid_thw, shard.tokens_per_rank, comm, NullRecorder())
    first = build_prompt(tokenizer, video, FIRST, spec)
    run = generate(model, first, embeds, get_strategy(config), comm, NullRecorder(), GREEDY)
    tokens, context = _drain(run)
    key = ContextKey(VideoKey("video", (0,), ((0, 0),), spec), config, comm.world_size)
    contexts = ContextCache(1 << 30)
    contexts.put("first", key, context)
    answer = tokenizer.decode(tokens, skip_special_tokens=True)
    follow_up = build_prompt(tokenizer, video, FOLLOW_UP, spec, history=((FIRST, answer),))
    _, continued, shared = contexts.take(key, follow_up.input_ids.tolist(), at_least=follow_up.n_context)
    continued.reused = shared
    seen: list[torch.Tensor] = []
    logits = model.logits
    model.logits = lambda hidden: seen.append(logits(hidden)) or seen[-1]
    try:
        run = generate(model, follow_up, None, get_strategy(config), comm, NullRecorder(), GREEDY, context=continued)
        follow_tokens, after = _drain(run)
    finally:
        del model.logits
    return {"answer": answer, "tokens": follow_tokens, "logits": torch.stack(seen) if seen else None,
            "shared": shared, "first_len": first.input_ids.numel(), "cached": after.token_ids,
            "follow_up_ids": follow_up.input_ids.tolist()}  # fmt: skip


def _drain(run) -> tuple[list[int], KVContext]:
    tokens = []
    while True:
        try:
            tokens.append(next(run))
        except StopIteration as done:
            return tokens, done.value


def _rank_turns(rank: int, world: int, model_dir: str, video: SampledVideo) -> dict:
    model = QwenVLRank(Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir))
    tokenizer, spec = AutoTokenizer.from_pretrained(model_dir), ProcessorSpec.from_pretrained(model_dir)
    return _turns(model, tokenizer, spec, video, video.frames, "ring", Comm())


@pytest.fixture(scope="module")
def video() -> SampledVideo:
    frames = make_sample(0, 12, (112, 112), "color").frames
    return SampledVideo(frames, sample_fps=2.0, source_fps=8.0, duration_s=6.0)


def _reference_logits(tiny_dir, video: SampledVideo, turns: dict) -> torch.Tensor:
    """transformers' forward on the follow-up's prompt and the tokens fed after it: logits per step."""
    tokenizer, spec = AutoTokenizer.from_pretrained(tiny_dir), ProcessorSpec.from_pretrained(tiny_dir)
    prompt = build_prompt(tokenizer, video, FOLLOW_UP, spec, history=((FIRST, turns["answer"]),))
    prepared = PreparedInputs(**vars(prompt), pixel_values_videos=patchify(video.frames, spec)[0])
    reference = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir, attn_implementation="sdpa").eval()
    fed = torch.tensor(turns["tokens"][:-1], dtype=torch.long)
    kwargs = prepared.model_kwargs()
    kwargs["input_ids"] = torch.cat([prepared.input_ids, fed])[None]
    kwargs["mm_token_type_ids"] = torch.cat([prepared.mm_token_type_ids, torch.zeros(len(fed), dtype=torch.int32)])[None]
    with torch.no_grad():
        return reference(**kwargs).logits[0, prepared.input_ids.numel() - 1 :]


def test_follow_up_over_the_cache_equals_a_full_forward_on_one_rank(tiny_dir, video):
    model = QwenVLRank(Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir))
    tokenizer, spec = AutoTokenizer.from_pretrained(tiny_dir), ProcessorSpec.from_pretrained(tiny_dir)
    turns = _turns(model, tokenizer, spec, video, video.frames, "dense", Comm.single())
    assert turns["shared"] > turns["first_len"] // 2  # the video and the first question at least
    assert torch.allclose(turns["logits"], _reference_logits(tiny_dir, video, turns), atol=LOGIT_TOL, rtol=0)
    assert turns["cached"] == turns["follow_up_ids"] + turns["tokens"][:-1]  # what a next turn can continue


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
def test_follow_up_over_the_sharded_cache_equals_a_full_forward(tiny_dir, video, world_size):
    ranks = run_ranks(world_size, _rank_turns, str(tiny_dir), video, timeout=150.0)
    assert len({tuple(r["tokens"]) for r in ranks}) == 1  # lock-step
    tails = [r for r in ranks if r["logits"] is not None]
    assert len(tails) == 1
    assert torch.allclose(tails[0]["logits"], _reference_logits(tiny_dir, video, tails[0]), atol=LOGIT_TOL, rtol=0)


def test_the_longest_shared_conversation_is_taken_out_of_the_cache(tiny_dir):
    spec = ProcessorSpec.from_pretrained(tiny_dir)
    key = ContextKey(VideoKey("a", (0,), ((0, 0),), spec), AttentionConfig("ring"), 2)
    other = ContextKey(VideoKey("b", (0,), ((0, 0),), spec), AttentionConfig("ring"), 2)
    contexts = ContextCache(1 << 20)
    for name, ids in (("short", [1, 2, 3, 9]), ("long", [1, 2, 3, 4, 5, 6])):
        contexts.put(name, key, KVContext(_cache_of(len(ids)), ids))
    assert contexts.take(other, [1, 2, 3, 4, 5, 7], at_least=2) == ("", None, 0)  # another video
    assert contexts.take(key, [1, 2, 8], at_least=3) == ("", None, 0)  # shares too little
    name, context, shared = contexts.take(key, [1, 2, 3, 4, 5, 7], at_least=2)
    assert (name, context.token_ids, shared) == ("long", [1, 2, 3, 4, 5, 6], 5) and len(contexts) == 1
    name, context, shared = contexts.take(key, [1, 2, 3, 9], at_least=2)
    assert (name, shared) == ("short", 3)  # the last token always runs


def test_every_rank_of_a_group_evicts_alike(tiny_dir):
    """Shares of different sizes (the tail holds the answer rows) are accounted alike, so the ranks keep the
    same entries; single-rank entries (rank 0's alone) never evict a group's."""
    spec = ProcessorSpec.from_pretrained(tiny_dir)
    pair = ContextKey(VideoKey("a", (0,), ((0, 0),), spec), AttentionConfig("ring"), 2)
    alone = ContextKey(VideoKey("a", (0,), ((0, 0),), spec), AttentionConfig("dense"), 1)
    budget = 2 * 8 * _cache_of(1).bytes_per_row // 2  # two 8-token conversations, accounted over 2 ranks
    ranks = [ContextCache(budget), ContextCache(budget)]
    for i in range(3):
        ids = [10 * i + t for t in range(8)]
        for rank, contexts in enumerate(ranks):
            contexts.put(f"req-{i}", pair, KVContext(_cache_of(2 + 4 * rank), ids))  # unequal shares
    ranks[0].put("req-3", alone, KVContext(_cache_of(8), list(range(100, 108))))
    for contexts in ranks:
        assert contexts.take(pair, [0, 1, 2, 3, 4], at_least=1) == ("", None, 0)  # the oldest left on both
        assert [contexts.take(pair, [10 * i, 10 * i + 1], at_least=1)[0] for i in (1, 2)] == ["req-1", "req-2"]
    assert ranks[0].take(alone, [100, 101], at_least=1)[0] == "req-3"


def _cache_of(n: int) -> ShardedKVCache:
    """A two-layer cache of n rows (positions 0..n-1)."""
    cache = ShardedKVCache(num_layers=2, reserve=0)
    for layer in range(2):
        cache.store(layer, torch.zeros(1, n, 4), torch.zeros(1, n, 4))
    cache.add_rows(torch.arange(n))
    return cache


def _answer(pool, request: Request) -> Result:
    return pool.submit(request).result(timeout=WAIT_S)


@pytest.mark.multiprocess
@pytest.mark.parametrize("strategy, world_size", [("dense", 1), ("ring", 2)])
def test_exact_follow_ups_skip_the_video_and_answer_as_a_full_prefill(pool, strategy, world_size):
    example = load_examples()[0]
    ask = Request(example.video, example.question, strategy=strategy, world_size=world_size, num_frames=8,
                  max_new_tokens=4)  # fmt: skip
    first = _answer(pool, ask)
    follow_up = Request(example.video, "And which shape was it?", strategy=strategy, world_size=world_size,
                        num_frames=8, max_new_tokens=4, history=((example.question, first.answer),))  # fmt: skip
    continued = _answer(pool, follow_up)
    summary = continued.summary()
    assert summary["context_reused_tokens"] >= first.n_context + first.n_query  # the whole first turn
    assert summary["vision_s"] == 0 and continued.token_ids == _answer(pool, _fresh(follow_up)).token_ids
    another = _answer(pool, Request(example.video, "What moved?", strategy=strategy, world_size=world_size,
                                    num_frames=8, max_new_tokens=4))  # fmt: skip
    assert another.n_context <= another.summary()["context_reused_tokens"] < another.n_context + another.n_query


def _fresh(request: Request) -> Request:
    return replace(request, reuse_context=False)


@pytest.mark.multiprocess
def test_approximate_follow_ups_prefill_afresh_unless_asked(pool):
    example, other = load_examples()[:2]
    ask = Request(example.video, example.question, strategy="apbv", world_size=2, num_frames=8, max_new_tokens=4)
    first = _answer(pool, ask)
    follow_up = Request(example.video, "And which shape?", strategy="apbv", world_size=2, num_frames=8,
                        max_new_tokens=4, history=((example.question, first.answer),))  # fmt: skip
    assert _answer(pool, follow_up).summary()["context_reused_tokens"] == 0  # APB-V's default: a full prefill
    opted = replace(follow_up, question="And its colour?", reuse_context=True)
    _answer(pool, replace(opted, question="Once more?"))  # fills the cache (nothing to continue yet)
    assert _answer(pool, opted).summary()["context_reused_tokens"] >= first.n_context
    elsewhere = replace(opted, video_path=other.video)
    assert _answer(pool, elsewhere).summary()["context_reused_tokens"] == 0  # another video


@pytest.mark.multiprocess
def test_a_stopped_follow_up_keeps_the_conversation_it_got_to(tiny_dir, monkeypatch):
    """Stopped after its first token, a follow-up's K/V (the prompt and that token) stay in the cache: the next
    question, whose history holds the stopped turn, continues all of it instead of prefilling the video again.
    The seeded random model never stops on its own, so the stop comes while it decodes; its one rank keeps to one
    core, so that the client's cancel reaches it while it decodes whatever the scheduler does."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    example = load_examples()[0]

    def request(question: str, history: tuple = (), tokens: int = 4) -> Request:
        return Request(example.video, question, strategy="dense", world_size=1, num_frames=8, max_new_tokens=tokens,
                       history=history)  # fmt: skip

    with EnginePool(model=str(tiny_dir), world_size=1, device="cpu") as pool:
        first = _answer(pool, request("Name the needle's colour."))
        history = (("Name the needle's colour.", first.answer),)
        stopped = pool.submit(request("Describe it at length.", history, tokens=400))
        events, text = stopped.events(timeout=WAIT_S), ""
        for event in events:
            if event.kind == "token":
                text = event.data["text"]
                pool.cancel(stopped.request_id)
                break
        assert [e.kind for e in events][-1] == "cancelled"
        after = _answer(pool, request("And its shape?", history + (("Describe it at length.", text),)))
    # the first turn went into the stopped one, whose whole prompt this one continues
    assert after.summary()["context_reused_tokens"] > first.n_context + first.n_query
