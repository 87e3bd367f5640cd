"""Issue 15: sage_attention_varlen (packed batches, FlashAttention's varlen API) on the CPU twin, against fp64
attention per sequence (tests/attention_reference.py) and against sage_attention on each sequence."""

from __future__ import annotations

import math

import pytest
import torch

from tersor.attention import sage_attention, sage_attention_varlen

from attention_reference import attention_fp64

pytestmark = pytest.mark.usefixtures("one_thread")


def packed(lens_q, lens_k, hq, hkv, d, gen, dtype=torch.bfloat16):
    q = torch.randn(sum(lens_q), hq, d, generator=gen).to(dtype)
    k = (torch.randn(sum(lens_k), hkv, d, generator=gen) + 2 * torch.randn(1, hkv, d, generator=gen)).to(dtype)
    v = torch.randn(sum(lens_k), hkv, d, generator=gen).to(dtype)
    cu = lambda lens: torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)  # noqa: E731
    return q, k, v, cu(lens_q), cu(lens_k)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_matches_fp64_per_sequence(causal):
    gen = torch.Generator().manual_seed(0)
    lens_q, lens_k = [37, 1, 130, 0, 64], [37, 50, 200, 9, 64]
    q, k, v, cq, ck = packed(lens_q, lens_k, 4, 2, 64, gen)
    out, lse = sage_attention_varlen(q, k, v, cq, ck, 130, 200, is_causal=causal, return_lse=True)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (4, q.shape[0])
    for b in range(len(lens_q)):
        sq, sk = slice(int(cq[b]), int(cq[b + 1])), slice(int(ck[b]), int(ck[b + 1]))
        if lens_q[b] == 0:
            continue
        ref, ref_lse = attention_fp64(q[sq].transpose(0, 1)[None], k[sk].transpose(0, 1)[None],
                                      v[sk].transpose(0, 1)[None], is_causal=causal)
        got = out[sq].transpose(0, 1)[None].double()
        err = (got - ref).abs().sum() / ref.abs().sum()
        assert err < 0.05, (b, err)
        visible = torch.isfinite(ref_lse[0])
        assert torch.equal(torch.isfinite(lse[:, sq]), visible)
        assert (lse[:, sq][visible].double() - ref_lse[0][visible]).abs().max() < 0.05


def test_varlen_is_sage_attention_on_each_sequence():
    # The numerics of a sequence are those of a sage_attention call on it alone (its own K mean, groups).
    gen = torch.Generator().manual_seed(1)
    lens = [70, 129, 5]
    q, k, v, cq, ck = packed(lens, lens, 2, 2, 128, gen, torch.float16)
    out = sage_attention_varlen(q, k, v, cq, ck, 129, 129, is_causal=True)
    for b in range(3):
        s = slice(int(cq[b]), int(cq[b + 1]))
        ref = sage_attention(q[s][None], k[s][None], v[s][None], is_causal=True, layout="bshd")[0]
        assert torch.equal(out[s], ref)


def test_varlen_sequence_without_keys_gives_zero_and_minus_inf():
    gen = torch.Generator().manual_seed(2)
    q, k, v, cq, ck = packed([3, 4], [0, 6], 2, 1, 64, gen)
    out, lse = sage_attention_varlen(q, k, v, cq, ck, 4, 6, return_lse=True)
    assert (out[:3] == 0).all() and (lse[:, :3] == -math.inf).all() and torch.isfinite(lse[:, 3:]).all()


def test_varlen_argument_errors():
    gen = torch.Generator().manual_seed(3)
    q, k, v, cq, ck = packed([4, 4], [4, 4], 2, 1, 64, gen)
    cases = [
        (dict(cu_seqlens_q=torch.tensor([0, 4, 7], dtype=torch.int32)), ValueError, "rise from 0 to 8"),
        (dict(cu_seqlens_q=torch.tensor([0, 5, 4, 8], dtype=torch.int32)), ValueError, "rise from 0"),
        (dict(cu_seqlens_k=torch.tensor([0, 8], dtype=torch.int32)), ValueError, "sequences"),
        (dict(cu_seqlens_q=cq.float()), TypeError, "int32 or int64"),
        (dict(max_seqlen_q=3), ValueError, "max_seqlen"),
        (dict(q=q[None]), ValueError, "packed 3-d"),
        (dict(window=(4, 0.5)), TypeError, "window"),
    ]
    for bad, err, msg in cases:
        args = dict(q=q, k=k, v=v, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=4, max_seqlen_k=4)
        args.update(bad)
        with pytest.raises(err, match=msg):
            sage_attention_varlen(**args)
