"""Decode speed: milliseconds per generated token, ours vs transformers' `generate`, same model, GPU and context.

    python -m apbv.bench.decode --arch qwen2.5-vl-3b --contexts 1024 16384 131072 [--new-tokens 32]
        [--world-sizes 1 2] [--out bench/results/DIR/decode.json]

Ours decodes over the engine's sharded KV cache holding N random keys and values per layer (decode time does not
depend on their values; `DecodeStep`: CUDA graphs around attention, flash kernels, and with W ranks the cross-rank
merge of every layer; W > 1 on one GPU runs the ranks in turn, projected); transformers' `generate` runs as users
call it, on an N-token text prompt. Both greedy; ms per token = (time of new_tokens tokens - time of 1 token) /
(new_tokens - 1), so prefill and set-up cancel.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from apbv.comm import Comm
from apbv.metrics import NullRecorder
from apbv.model.cache import ShardedKVCache
from apbv.model.qwen2_5_vl import QwenVLRank
from apbv.run_record import environment, write_json
from apbv.thread_comm import ThreadWorld

from .architectures import ARCHITECTURES, model_dtype, random_model


def _random_kv(text_config, rows: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    heads, dim = text_config.num_key_value_heads, text_config.hidden_size // text_config.num_attention_heads
    return torch.randn(heads, rows, dim, device=device, dtype=dtype)


def ours_ms_per_token(rank_model: QwenVLRank, context: int, new_tokens: int, world_size: int, repeats: int) -> float:
    """Greedy decode over an N-token cache sharded over `world_size` ranks (the last rank appends new tokens)."""
    text = rank_model.config.text_config
    shares = [context // world_size + (r < context % world_size) for r in range(world_size)]

    def tokens(count: int) -> float:
        def rank_fn(rank: int, comm: Comm) -> float:
            is_tail = rank == world_size - 1
            cache = ShardedKVCache(rank_model.num_layers, reserve=count if is_tail else 0)
            for layer in range(rank_model.num_layers):
                kv = _random_kv(text, shares[rank], rank_model.device, rank_model.dtype)
                cache.store(layer, kv, kv)
            token, quiet = 0, NullRecorder()
            _sync(rank_model.device)
            start = time.perf_counter()
            for step in range(count):
                hidden = rank_model.decode_step(token, context + step, comm, quiet, cache, is_tail)
                chosen = int(torch.argmax(rank_model.logits(hidden))) if is_tail else -1
                token = int(comm.all_reduce_max(torch.tensor([chosen], device=comm.device), quiet)[0])
            _sync(rank_model.device)
            return time.perf_counter() - start

        if world_size == 1:
            return rank_fn(0, Comm.single(rank_model.device))
        with ThreadWorld(world_size, rank_model.device) as world:
            world.run(rank_fn)
            return max(world.busy)

    return _per_token(tokens, new_tokens, repeats)


def transformers_ms_per_token(model, context: int, new_tokens: int, repeats: int) -> float:
    """transformers' greedy `generate` as users call it, on a text prompt of N random tokens (its prefill cancels
    out of the per-token time)."""
    device = next(model.parameters()).device
    model.set_attn_implementation({"text_config": "sdpa", "vision_config": "sdpa"})
    ids = torch.randint(0, 1000, (1, context), device=device, generator=torch.Generator(device).manual_seed(0))

    def tokens(count: int) -> float:
        _sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=count,
                           min_new_tokens=count, do_sample=False, eos_token_id=None, pad_token_id=0)  # fmt: skip
        _sync(device)
        return time.perf_counter() - start

    return _per_token(tokens, new_tokens, repeats)


def _per_token(run, new_tokens: int, repeats: int) -> float:
    run(2)  # warm-up: kernels, CUDA graphs
    many = statistics.median(run(new_tokens) for _ in range(repeats))
    one = statistics.median(run(1) for _ in range(repeats))
    return 1e3 * (many - one) / (new_tokens - 1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=ARCHITECTURES, default="qwen2.5-vl-3b")
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 16384, 131072])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--world-sizes", type=int, nargs="+", default=[1])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-transformers", action="store_true", help="ours only")
    p.add_argument("--out", help="JSON file of the rows")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    model = random_model(args.arch, device, model_dtype(device))
    rank_model = QwenVLRank(model)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows = []
    for context in args.contexts:
        theirs = None if args.no_transformers else transformers_ms_per_token(model, context, args.new_tokens, args.repeats)
        rank_model = QwenVLRank(model)  # transformers' generate switched the attention back to SDPA
        for w in args.world_sizes:
            ours = ours_ms_per_token(rank_model, context, args.new_tokens, w, args.repeats)
            row = {"context_tokens": context, "new_tokens": args.new_tokens, "world_size": w,
                   "ours_ms_per_token": ours, "transformers_ms_per_token": theirs, "device": device_name,
                   "timing": "measured" if w == 1 else "projected (sequential ranks, no communication)"}  # fmt: skip
            rows.append(row)
            print(f"{args.arch} context {context} W={w}: ours {ours:.2f} ms/token, transformers "
                  f"{'-' if theirs is None else f'{theirs:.2f}'} ms/token ({row['timing']})", flush=True)
    if args.out:
        write_json(args.out, vars(args) | environment(device), rows)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
