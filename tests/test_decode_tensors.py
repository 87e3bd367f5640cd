"""sage_decode's plain-tensor form (issue 15 item 2): sage_decode(q, k, v, cache_seqlens) over an unpaged
[B, Lk, Hkv, D] cache, against fp64 attention per sequence (bottom-right causal over the used tokens)."""

import math

import pytest
import torch

from attention_reference import attention_fp64, key_mask
from tersor.attention import sage_decode


def _case(b, lq, hq, hkv, lk, d, dtype, lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, lq, hq, d, generator=g).to(dtype)
    k = (torch.randn(b, lk, hkv, d, generator=g) + 1.5).to(dtype)
    v = torch.randn(b, lk, hkv, d, generator=g).to(dtype)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    for i, n in enumerate(lens):  # the unused tail of the cache holds garbage: it must never be read
        k[i, n:] = float("nan")
        v[i, n:] = float("inf")
    return q, k, v, seqlens


@pytest.mark.parametrize("lq,window", [(1, None), (4, None), (3, (50, -1))])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_matches_fp64_per_sequence(lq, window, dtype):
    lens = [300, 0, 2, 129]
    q, k, v, sl = _case(4, lq, 8, 2, 320, 128, dtype, lens)
    out, lse = sage_decode(q, k, v, sl, window=window, return_lse=True)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (4, 8, lq)
    assert torch.isfinite(out).all()
    for i, n in enumerate(lens):
        if n == 0:
            assert (out[i] == 0).all() and lse[i].eq(-math.inf).all()
            continue
        qi, ki, vi = q[i].transpose(0, 1)[None], k[i, :n].transpose(0, 1)[None], v[i, :n].transpose(0, 1)[None]
        ref, ref_lse = attention_fp64(qi, ki, vi, is_causal=True, window=window)
        got = out[i].transpose(0, 1)[None].double()
        seen = key_mask(lq, n, True, window).any(1)  # rows with a key (2 keys, 4 queries: the first 2 see none)
        if seen.any():
            err = ((got - ref)[..., seen, :].abs().sum() / ref[..., seen, :].abs().sum()).item()
            assert err < 0.06, (i, err)
            assert (lse[i][:, seen].double() - ref_lse[0][:, seen]).abs().max() < 0.05
        assert (got[..., ~seen, :] == 0).all() and lse[i][:, ~seen].eq(-math.inf).all()


def test_equals_the_varlen_call_it_makes():
    # The plain form is one sage_attention_varlen call over the used tokens, bit for bit.
    from tersor.attention import sage_attention_varlen

    lens = [70, 5, 200]
    q, k, v, sl = _case(3, 2, 4, 4, 256, 64, torch.float16, lens, seed=1)
    out = sage_decode(q, k, v, sl)
    kp = torch.cat([k[i, :n] for i, n in enumerate(lens)])
    vp = torch.cat([v[i, :n] for i, n in enumerate(lens)])
    cu_k = torch.tensor([0, 70, 75, 275], dtype=torch.int32)
    cu_q = torch.tensor([0, 2, 4, 6], dtype=torch.int32)
    ref = sage_attention_varlen(q.reshape(6, 4, 64), kp, vp, cu_q, cu_k, 2, 200, is_causal=True)
    assert torch.equal(out.reshape(6, 4, 64), ref)


def test_argument_errors():
    q, k, v, sl = _case(2, 1, 4, 2, 64, 64, torch.float16, [10, 64])
    cases = [
        (dict(cache_seqlens=torch.tensor([10, 65], dtype=torch.int32)), ValueError, r"in \[0, 64\]"),
        (dict(cache_seqlens=torch.tensor([10.0, 5.0])), TypeError, "int32 or int64"),
        (dict(cache_seqlens=torch.tensor([10], dtype=torch.int32)), ValueError, "batch"),
        (dict(k=k.float()), TypeError, "float16 or bfloat16"),
        (dict(v=v[:, :32]), ValueError, "one shape"),
        (dict(q=q[..., :32]), ValueError, "k / v must be"),
        (dict(q=torch.randn(2, 1, 3, 64).half()), ValueError, "multiple of heads_kv"),
        (dict(cache_seqlens=None), TypeError, "cache_seqlens"),
    ]
    for bad, err, msg in cases:
        args = dict(q=q, k=k, v=v, cache_seqlens=sl)
        args.update(bad)
        with pytest.raises(err, match=msg):
            sage_decode(args["q"], args["k"], args["v"], args["cache_seqlens"])
    with pytest.raises(ValueError, match="num_workers"):
        sage_decode(q, k, v, sl, num_workers=4)
