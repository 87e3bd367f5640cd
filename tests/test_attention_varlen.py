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


def _block_diagonal(cq, ck, causal, window=None):
    """bool [total_q, total_k]: row i of sequence s sees key j iff j is in sequence s and passes the per-sequence
    rule (bottom-right causal, window), built independently of the kernels' KeyMask."""
    from attention_reference import key_mask

    tq, tk = int(cq[-1]), int(ck[-1])
    m = torch.zeros(tq, tk, dtype=torch.bool)
    for s in range(len(cq) - 1):
        q0, q1, k0, k1 = int(cq[s]), int(cq[s + 1]), int(ck[s]), int(ck[s + 1])
        if q1 > q0 and k1 > k0:
            m[q0:q1, k0:k1] = key_mask(q1 - q0, k1 - k0, causal, window)
    return m


@pytest.mark.parametrize("causal,window", [(True, None), (False, None), (True, (20, -1)), (False, (5, 30))])
@pytest.mark.parametrize("mode", [("int8", "fp8", torch.float16), ("int4", "fp16", torch.bfloat16),
                                  ("none", "fp32", torch.float32)])
def test_varlen_is_one_packed_call_with_a_block_diagonal_mask(causal, window, mode):
    # One op call: the numerics of sage_attention on the packed tensors as one sequence, each row seeing its own
    # sequence's keys. Against the twin with that mask given as attn_mask: bit for bit (the tiles the fused call
    # skips are all -inf under the mask, which leaves the online softmax unchanged).
    qk, pv, dtype = mode
    gen = torch.Generator().manual_seed(1)
    lens_q, lens_k = [70, 129, 5, 0, 64], [70, 200, 9, 3, 64]
    q, k, v, cq, ck = packed(lens_q, lens_k, 4, 2, 128, gen, dtype)
    out, lse = sage_attention_varlen(q, k, v, cq, ck, 129, 200, is_causal=causal, window=window, qk=qk, pv=pv,
                                     return_lse=True)
    mask = _block_diagonal(cq, ck, causal, window)
    ref, ref_lse = sage_attention(q[None], k[None], v[None], layout="bshd", qk=qk, pv=pv, attn_mask=mask,
                                  return_lse=True)
    assert torch.equal(out, ref[0])
    assert torch.equal(lse, ref_lse[0])


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


def test_varlen_op_checks_offsets_and_shapes():
    from tersor import ops

    gen = torch.Generator().manual_seed(5)
    q, k, v, cq, ck = packed([4, 4], [4, 4], 2, 1, 64, gen)
    args = (True, 0.125, 8, "fp8", True, False)
    cases = [
        ((q, k, v, torch.tensor([0, 4, 7]), ck), ValueError, "rise from 0 to 8"),
        ((q, k, v, torch.tensor([0, 5, 4, 8]), torch.tensor([0, 4, 4, 8])), ValueError, "must not decrease"),
        ((q, k, v, cq, torch.tensor([0, 8])), ValueError, "sequences"),
        ((q, k, v, cq.float(), ck), TypeError, "int32 or int64"),
        ((q, k, v, cq[None], ck), ValueError, r"\[n_seq \+ 1\]"),
        ((q[None], k, v, cq, ck), ValueError, "packed 3-d"),
        ((q, k.float(), v, cq, ck), TypeError, "same dtype"),
    ]
    for (a, err, msg) in cases:
        with pytest.raises(err, match=msg):
            ops.sage_attention_varlen_fwd(*a, *args)


@pytest.mark.testing_ext
@pytest.mark.parametrize("causal,window", [(True, None), (False, (30, 10))])
def test_varlen_replays_match_the_twin(causal, window):
    # The kernels' lane-by-lane replays on the packed views with the varlen offsets, against the twin's varlen op.
    from attention_reference import replay_mismatch
    from conftest import load_testing_ops
    from tersor import ops

    T = load_testing_ops()
    gen = torch.Generator().manual_seed(6)
    lens_q, lens_k = [70, 129, 0, 64], [90, 200, 3, 64]
    left, right = window if window else (-1, -1)
    for d, dtype in [(64, torch.float16), (128, torch.bfloat16)]:
        q, k, v, cq, ck = packed(lens_q, lens_k, 2, 1, d, gen, dtype)
        ref, ref_lse = ops.sage_attention_varlen_fwd(q, k, v, cq, ck, causal, 0.1, 8, "fp8", True, False,
                                                     window_left=left, window_right=right)
        q4, k4, v4 = (t.transpose(0, 1)[None] for t in (q, k, v))
        cu = dict(cu_seqlens_q=cq.long(), cu_seqlens_k=ck.long(), window_left=left, window_right=right)
        for out, lse in [T._sage_emulate_cuda_attention(q4, k4, v4, causal, 0.1, "fp8", True, **cu),
                         T._sage_emulate_sm90_attention(q4, k4, v4, causal, 0.1, True, **cu)]:
            problem = replay_mismatch(out[0].transpose(0, 1), lse[0], ref, ref_lse)
            assert problem is None, problem


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_cuda_matches_the_twin(causal):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from tersor import attention, ops

    qk, pv = attention.pick_modes(torch.device("cuda"))
    gen = torch.Generator().manual_seed(7)
    q, k, v, cq, ck = packed([70, 129, 0, 64, 300], [90, 200, 3, 64, 300], 4, 2, 128, gen, torch.float16)
    args = (causal, 0.1, {"int8": 8, "int4": 4}[qk], pv, True, qk == "int4")
    ref, ref_lse = ops.sage_attention_varlen_fwd(q, k, v, cq, ck, *args)
    out, lse = ops.sage_attention_varlen_fwd(q.cuda(), k.cuda(), v.cuda(), cq.cuda(), ck.cuda(), *args)
    diff = (out.cpu().float() - ref.float()).abs()
    assert diff.max().item() <= (2e-3 + torch.finfo(torch.half).eps) * ref.float().abs().max().item()
    assert torch.equal(lse.cpu().isinf(), ref_lse.isinf())
