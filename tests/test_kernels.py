"""attend() against an independent float64 masked softmax, and the properties of merge_partials."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch

from apbv.attention.kernels import attend, merge_partials

from .reference import causal_mask, masked_attention

# float64 inputs: the CPU path is exact up to float64 rounding -> 1e-10; float32: ~1e-7 per op -> 1e-5.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _qkv(hq, hkv, sq, sk, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, s, d, generator=g, dtype=dtype) for n, s in ((hq, sq), (hkv, sk), (hkv, sk)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("heads", [(4, 1), (2, 2)])
@pytest.mark.parametrize("sq,sk", [(7, 7), (5, 13), (13, 5), (1, 9), (6, 0), (0, 4), (0, 0)])
@pytest.mark.parametrize("causal", [False, True])
def test_attend_matches_masked_softmax(dtype, heads, sq, sk, causal):
    q, k, v = _qkv(*heads, sq, sk, 8, dtype)
    mask = causal_mask(sq, sk) if causal else torch.ones(1, sq, sk, dtype=torch.bool)
    out, lse = attend(q, k, v, causal)
    ref_out, ref_lse = masked_attention(q, k, v, mask)
    assert out.dtype == dtype and out.shape == (heads[0], sq, 8) and lse.shape == (heads[0], sq)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(out.double(), ref_out, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(lse.double(), ref_lse, atol=TOL[dtype], rtol=TOL[dtype])
    blind = ref_lse == -math.inf  # rows with no visible key: out 0, lse -inf
    assert torch.all(lse[blind] == -math.inf) and torch.all(out[blind] == 0)


def test_attend_scale_and_bf16():
    q, k, v = _qkv(4, 2, 6, 10, 16, torch.float32, seed=1)
    out, lse = attend(q, k, v, True, scale=0.3)
    ref_out, ref_lse = masked_attention(q, k, v, causal_mask(6, 10), scale=0.3)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    out16, lse16 = attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), True)
    assert out16.dtype == torch.bfloat16 and lse16.dtype == torch.float32
    ref_out, _ = masked_attention(q, k, v, causal_mask(6, 10))
    torch.testing.assert_close(out16.double(), ref_out, atol=3e-2, rtol=3e-2)  # bf16 has ~3 significant digits


def _partials(splits, seed=2):
    """Partials of 5 query rows over the consecutive key chunks `splits` of one random key set, and the whole."""
    q, k, v = _qkv(2, 2, 5, sum(splits), 8, torch.float64, seed)
    bounds = torch.tensor([0, *splits]).cumsum(0).tolist()
    parts = [attend(q, k[:, a:b], v[:, a:b], False) for a, b in zip(bounds, bounds[1:])]
    return parts, attend(q, k, v, False)


def test_merge_equals_full_attention_and_is_associative():
    parts, (full_out, full_lse) = _partials([3, 4, 1, 6])
    out, lse = merge_partials(parts)
    torch.testing.assert_close(out, full_out, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, full_lse, atol=1e-12, rtol=1e-12)
    left = merge_partials([merge_partials(parts[:2]), merge_partials(parts[2:])])
    reordered = merge_partials([parts[3], parts[1], parts[0], parts[2]])
    for other in (left, reordered):
        torch.testing.assert_close(other[0], out, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(other[1], lse, atol=1e-12, rtol=1e-12)


def test_merge_identity_and_blind_rows():
    parts, _ = _partials([4, 3])
    o, l = parts[0]
    identity = (torch.zeros_like(o), torch.full_like(l, -math.inf))
    for seq in ([identity, parts[0]], [parts[0], identity], [parts[0]]):
        out, lse = merge_partials(seq)
        assert torch.equal(out, o) and torch.equal(lse, l)  # exact, not approximate
    out, lse = merge_partials([identity, identity, identity])
    assert torch.all(out == 0) and torch.all(lse == -math.inf) and not torch.isnan(out).any()
    # rows blind in one partial and seen in the other, in the same tensors
    mixed_l = l.clone()
    mixed_l[:, ::2] = -math.inf
    mixed_o = torch.where(torch.isinf(mixed_l)[..., None], 0.0, o)
    out, lse = merge_partials([(mixed_o, mixed_l), parts[1]])
    assert not torch.isnan(out).any()
    assert torch.equal(out[:, ::2], parts[1][0][:, ::2]) and torch.equal(lse[:, ::2], parts[1][1][:, ::2])


def test_merge_rejects_nothing_and_returns_fp32():
    with pytest.raises(ValueError):
        merge_partials([])
    parts, _ = _partials([2, 2])
    out, lse = merge_partials([(o.float(), l.float()) for o, l in parts])
    assert out.dtype == torch.float32 and lse.dtype == torch.float32


@pytest.mark.parametrize("causal", [False, True])
def test_math_path_in_chunks_and_fallback(monkeypatch, causal):
    """The plain-math path (used for dtypes/devices without a fused kernel) and the fall-through on refusal."""
    from apbv.attention import kernels

    def refuses(*args):
        raise RuntimeError("no kernel for this input")

    monkeypatch.setattr(kernels, "_MATH_ELEMENTS", 4 * 9 * 3)  # 3 query rows per step
    monkeypatch.setattr(kernels, "_backends", lambda q: [("refuses", refuses)])
    monkeypatch.setattr(kernels, "_refused", OrderedDict())
    q, k, v = _qkv(4, 2, 9, 9, 8, torch.float64, seed=5)
    out, lse = attend(q, k, v, causal)
    ref_out, ref_lse = masked_attention(q, k, v, causal_mask(9, 9) if causal else torch.ones(1, 9, 9, dtype=torch.bool))
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse, ref_lse, atol=1e-10, rtol=1e-10)
    assert kernels._refused  # remembered per call shape: not tried again
    assert all(key[0] == "refuses" and key[2][0] == 4 and key[3][0] == 2 for key in kernels._refused)


def test_out_of_memory_is_raised_not_taken_for_a_refusal(monkeypatch):
    """A kernel that runs out of memory exists: the error reaches the caller (the worker exits with its OOM
    code) instead of falling through to the plain-math path and marking the kernel unusable."""
    from apbv.attention import kernels

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(kernels, "_backends", lambda q: [("oom", out_of_memory)])
    monkeypatch.setattr(kernels, "_refused", OrderedDict())
    q, k, v = _qkv(4, 2, 9, 9, 8, torch.float32, seed=1)
    with pytest.raises(torch.OutOfMemoryError):
        attend(q, k, v, causal=True)
    assert not kernels._refused


def test_refusal_memory_stays_bounded_through_a_long_decode(monkeypatch):
    """CPU flash refuses a value head size other than the query's; decode asks with a new key length every step.
    The refusals stay remembered up to REFUSED_MAX (least recent dropped), the answers exact throughout."""
    from apbv.attention import kernels

    monkeypatch.setattr(kernels, "_refused", OrderedDict())
    monkeypatch.setattr(kernels, "REFUSED_MAX", 16)
    gen = torch.Generator().manual_seed(3)
    for sk in range(1, 41):  # one decode step per key length
        q = torch.randn(4, 1, 8, dtype=torch.float64, generator=gen)
        k = torch.randn(2, sk, 8, dtype=torch.float64, generator=gen)
        v = torch.randn(2, sk, 16, dtype=torch.float64, generator=gen)
        out, lse = attend(q, k, v, causal=False)  # the new token sees every key
        ref_out, ref_lse = masked_attention(q, k, v, torch.ones(1, 1, sk, dtype=torch.bool))
        torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(lse, ref_lse, atol=1e-10, rtol=1e-10)
    assert len(kernels._refused) == 16
    assert [key[3][1] for key in kernels._refused] == list(range(25, 41))  # the most recent key lengths
