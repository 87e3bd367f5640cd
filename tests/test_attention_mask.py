"""General attention masks (issue 15 item 4): ``attn_mask`` (SDPA's: bool or additive float, broadcastable) runs on
the CPU twin only; on CUDA it raises NotImplementedError unless ``sdpa_fallback=True``."""

import math

import pytest
import torch

import tersor
from attention_reference import assert_twin_matches_emulation, attention_fp64, random_qkv, sage_emulate
from tersor import attention

L = tersor.ops.lib


def _masks(b, hq, lq, lk, seed=0):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(b, 1, lq, lk, generator=g) < 0.6
    keep[0, 0, 3] = False  # a row that sees nothing
    bias = torch.randn(1, hq, lq, lk, generator=g) * 2
    bias[..., 5, :7] = -math.inf  # -inf entries in a float mask
    return keep, bias


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_exact_mode_matches_fp64(causal, kind):
    b, hq, lq, lk = 2, 4, 100, 150
    q, k, v = random_qkv(b, hq, 2, lq, lk, 64, torch.float32)
    keep, bias = _masks(b, hq, lq, lk)
    mask = keep if kind == "bool" else bias
    out, lse = L.sage_attention_fwd(q, k, v, causal, 0.125, 0, "fp32", True, False, attn_mask=mask,
                                    window_left=60)
    ref, ref_lse = attention_fp64(q, k, v, causal, 0.125, attn_mask=mask, window=(60, -1))
    torch.testing.assert_close(out.double(), ref.nan_to_num(0.0), rtol=1e-5, atol=1e-5)
    fin = ref_lse.isfinite()
    assert torch.equal(lse.isfinite(), fin)
    torch.testing.assert_close(lse.double()[fin], ref_lse[fin], rtol=1e-6, atol=1e-6)
    assert not out.isnan().any()
    if kind == "bool":
        assert (out[0, :, 3] == 0).all() and lse[0, :, 3].eq(-math.inf).all()


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("mode", [(8, "fp8", True, False, torch.float16), (4, "fp16", True, True, torch.bfloat16)])
def test_quantized_twin_matches_emulation(kind, mode):
    bits, pv, sk, sq, dtype = mode
    b, hq, lq, lk = 2, 4, 130, 200
    q, k, v = random_qkv(b, hq, 2, lq, lk, 64, dtype, seed=1)
    keep, bias = _masks(b, hq, lq, lk, seed=1)
    mask = keep if kind == "bool" else bias
    kp = torch.ones(b, lk, dtype=torch.bool)
    kp[1, -20:] = False
    out, lse = L.sage_attention_fwd(q, k, v, True, 0.1, bits, pv, sk, sq, attn_mask=mask, key_padding_mask=kp)
    ref, ref_lse = sage_emulate(q, k, v, True, 0.1, bits, pv, sk, sq, attn_mask=mask, key_padding=kp)
    assert_twin_matches_emulation(out, lse, ref, ref_lse)


def test_sage_attention_broadcasts_like_sdpa():
    q, k, v = random_qkv(2, 2, 2, 40, 50, 64, torch.float32, seed=2)
    g = torch.Generator().manual_seed(3)
    for mask in [torch.rand(40, 50, generator=g) < 0.7, torch.randn(1, 50, generator=g),
                 torch.rand(2, 1, 1, 50, generator=g) < 0.8, torch.randn(2, 2, 40, 50, generator=g).half()]:
        out = attention.sage_attention(q, k, v, qk="none", pv="fp32", attn_mask=mask)
        ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                                               attn_mask=mask if mask.dtype == torch.bool
                                                               else mask.double())
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for bad, err in [(torch.ones(40, 50, dtype=torch.int32), TypeError), (torch.ones(40, 49), ValueError),
                     (torch.ones(3, 1, 40, 50), ValueError), (torch.ones(1, 1, 1, 40, 50), ValueError),
                     ("mask", TypeError)]:
        with pytest.raises(err, match="attn_mask"):
            attention.sage_attention(q.half(), k.half(), v.half(), attn_mask=bad)


def test_sdpa_fallback_folds_every_mask():
    # The CUDA fallback's mask folding (device-agnostic), checked on the CPU against fp64.
    from tersor.attention import _sdpa_masked

    b, hq, lq, lk = 2, 4, 70, 300
    q, k, v = random_qkv(b, hq, 2, lq, lk, 64, torch.float32, seed=4)
    keep, bias = _masks(b, hq, lq, lk, seed=4)
    kp = torch.ones(b, lk, dtype=torch.bool)
    kp[0, :30] = False
    bm = torch.ones(b, 1, 1, 3, dtype=torch.bool)
    bm[1, 0, 0, 1] = False
    for mask in (keep, bias):
        out = _sdpa_masked(q, k, v, True, 0.125, (100, -1), kp, mask, bm)
        ref, _ = attention_fp64(q, k, v, True, 0.125, window=(100, -1), key_padding=kp, attn_mask=mask, block_mask=bm)
        torch.testing.assert_close(out.double(), ref.nan_to_num(0.0), rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_cuda_raises_without_fallback_and_falls_back_with_it():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    q, k, v = (t.cuda() for t in random_qkv(1, 2, 2, 64, 64, 64, torch.float16))
    mask = torch.rand(64, 64, device="cuda") < 0.7
    with pytest.raises(NotImplementedError, match="sdpa_fallback"):
        attention.sage_attention(q, k, v, attn_mask=mask)
    with pytest.raises(NotImplementedError, match="CPU twin"):
        L.sage_attention_fwd(q, k, v, False, 0.125, 8, "fp16", True, False, attn_mask=mask[None, None])
    out = attention.sage_attention(q, k, v, attn_mask=mask, sdpa_fallback=True)
    ref, _ = attention_fp64(q.cpu(), k.cpu(), v.cpu(), attn_mask=mask.cpu())
    torch.testing.assert_close(out.cpu().double(), ref, rtol=2e-2, atol=2e-2)
