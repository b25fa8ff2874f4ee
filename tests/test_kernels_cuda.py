"""CUDA kernels (run by the lead on a GPU machine; skipped elsewhere): every backend that accepts a call must
return the right output and a natural-log lse, including native GQA; attend() must pick a working one."""

from __future__ import annotations

import pytest
import torch

from apbv.attention import kernels
from apbv.attention.kernels import attend

from .reference import causal_mask, masked_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
BF16_TOL = 2e-2  # bf16 inputs and outputs: ~3 significant digits


def _qkv(hq, hkv, sq, sk, d=128):
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = ((hq, sq), (hkv, sk), (hkv, sk))
    return (torch.randn(h, s, d, generator=g, device="cuda", dtype=torch.bfloat16) for h, s in shapes)


@pytest.mark.parametrize("heads", [(16, 2), (4, 4)])
@pytest.mark.parametrize("causal", [False, True])
def test_each_backend_is_correct_when_it_runs(heads, causal):
    q, k, v = _qkv(*heads, 200, 200)
    mask = causal_mask(200, 200) if causal else torch.ones(1, 200, 200, dtype=torch.bool)
    ref_out, ref_lse = masked_attention(q.cpu(), k.cpu(), v.cpu(), mask)
    ran = []
    for name, fn in kernels._backends(q):
        try:
            out, lse = fn(q, k, v, causal, 128 ** -0.5)
        except RuntimeError:
            continue
        ran.append(name)
        torch.testing.assert_close(out.double().cpu(), ref_out, atol=BF16_TOL, rtol=BF16_TOL, msg=name)
        lse = lse.reshape(heads[0], -1)[:, :200].double().cpu()
        torch.testing.assert_close(lse, ref_lse, atol=BF16_TOL, rtol=BF16_TOL, msg=name)
    assert ran, "no CUDA attention backend ran"
    print("backends that ran:", ran)


@pytest.mark.parametrize("sq,sk", [(300, 300), (37, 500), (500, 37), (1, 4000), (0, 5), (5, 0)])
def test_attend_on_cuda(sq, sk):
    q, k, v = _qkv(16, 2, sq, sk)
    out, lse = attend(q, k, v, True)
    ref_out, ref_lse = masked_attention(q.cpu(), k.cpu(), v.cpu(), causal_mask(sq, sk))
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    torch.testing.assert_close(out.double().cpu(), ref_out, atol=BF16_TOL, rtol=BF16_TOL)
    torch.testing.assert_close(lse.double().cpu(), ref_lse, atol=BF16_TOL, rtol=BF16_TOL)
