"""Sliding-window attention (issue 15 item 4): ``window=(left, right)``, FlashAttention's convention, bottom-right
aligned like ``is_causal``, in the CPU twin (exact and quantized modes), the sm80/sm89 and sm90a kernels (their
lane-by-lane replays here; the kernels themselves against the twin on a GPU), ``sage_attention`` and
``sage_attention_varlen``. The visibility rule and the tile range a CTA walks are checked against brute force."""

import itertools

import pytest
import torch

import tersor
from attention_reference import assert_twin_matches_emulation, attention_fp64, key_mask, random_qkv, replay_mismatch, sage_emulate
from conftest import load_testing_ops
from tersor import attention

L = tersor.ops.lib

# (lq, lk, causal, window): Lq < Lk, Lq == Lk, Lq > Lk (rows before the sequence), one-sided and two-sided
# windows, windows narrower than a 64-key tile and wider than several, a window that starts mid-tile.
CASES = [
    (130, 300, True, (70, -1)),
    (200, 200, True, (63, 0)),
    (200, 200, False, (20, 40)),
    (90, 300, False, (-1, 10)),
    (250, 120, True, (30, -1)),   # Lq > Lk: 130 rows see nothing
    (64, 500, False, (0, 0)),     # one key per row
    (300, 1100, True, (128, -1)),  # many tiles skipped per CTA
]


@pytest.mark.testing_ext
def test_visible_keys_match_brute_force():
    T = load_testing_ops()
    for lq, lk in [(1, 1), (5, 9), (9, 5), (17, 17), (3, 40)]:
        for causal, left, right in itertools.product([False, True], [-1, 0, 1, 4, 50], [-1, 0, 2, 50]):
            m = key_mask(lq, lk, causal, (left, right))
            for i in range(lq):
                lo, hi = T._sage_index("visible_keys", [i, lq, lk, int(causal), left, right])
                keys = m[i].nonzero().flatten().tolist()
                if keys:
                    assert (lo, hi) == (keys[0], keys[-1] + 1), (lq, lk, causal, left, right, i)
                else:
                    assert hi <= lo, (lq, lk, causal, left, right, i, lo, hi)


@pytest.mark.testing_ext
def test_visible_tiles_are_tight():
    # The tiles a CTA of rows r0..r_last walks: every visible key of every row lies in them, and the first and
    # last tile each hold one (so the kernels skip exactly the tiles with nothing to see).
    T = load_testing_ops()
    for lq, lk, tk in [(300, 700, 64), (700, 300, 128), (128, 128, 64)]:
        for causal, left, right in itertools.product([False, True], [-1, 0, 63, 64, 200], [-1, 0, 70]):
            m = key_mask(lq, lk, causal, (left, right))
            for r0 in range(0, lq, 128):
                r_last = min(r0 + 127, lq - 1)
                first, end = T._sage_index("visible_tiles", [r0, r_last, lq, lk, int(causal), left, right, tk])
                keys = m[r0:r_last + 1].any(0).nonzero().flatten()
                if len(keys) == 0:
                    assert end <= first
                else:
                    assert (first, end) == (int(keys[0]) // tk, int(keys[-1]) // tk + 1), (lq, lk, causal, left, right, r0)


@pytest.mark.parametrize("case", CASES)
def test_exact_mode_matches_fp64(case):
    lq, lk, causal, window = case
    q, k, v = random_qkv(1, 4, 2, lq, lk, 64, torch.float32)
    out, lse = L.sage_attention_fwd(q, k, v, causal, 0.125, 0, "fp32", True, False,
                                    window_left=window[0], window_right=window[1])
    ref, ref_lse = attention_fp64(q, k, v, causal, 0.125, window=window)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(lse.isinf(), ref_lse.isinf())
    fin = ref_lse.isfinite()
    torch.testing.assert_close(lse.double()[fin], ref_lse[fin], rtol=1e-6, atol=1e-6)
    dead = ~key_mask(lq, lk, causal, window).any(1)
    assert (out[:, :, dead] == 0).all() and lse[:, :, dead].eq(float("-inf")).all()
    assert not out.isnan().any()


MODES = [  # qk_bits, pv, smooth_k, smooth_q, dtype
    (8, "fp8", True, False, torch.float16),
    (8, "fp16", True, False, torch.bfloat16),
    (4, "fp8", True, True, torch.float16),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", MODES)
def test_quantized_twin_matches_emulation(case, mode):
    lq, lk, causal, window = case
    bits, pv, sk, sq, dtype = mode
    q, k, v = random_qkv(1, 4, 2, lq, lk, 64, dtype, seed=1)
    out, lse = L.sage_attention_fwd(q, k, v, causal, 0.1, bits, pv, sk, sq,
                                    window_left=window[0], window_right=window[1])
    ref, ref_lse = sage_emulate(q, k, v, causal, 0.1, bits, pv, sk, sq, window=window)
    max_diff = assert_twin_matches_emulation(out, lse, ref, ref_lse)
    # and the window mattered: without it the result is far from this one
    full, _ = L.sage_attention_fwd(q, k, v, causal, 0.1, bits, pv, sk, sq)
    assert (full.float() - out.float()).abs().max().item() > 20 * max_diff + 1e-3


def test_window_composes_with_block_mask():
    lq, lk = 300, 400
    q, k, v = random_qkv(1, 2, 2, lq, lk, 64, torch.float16, seed=2)
    mask = torch.ones(1, 1, 3, 4, dtype=torch.bool)
    mask[0, 0, 1, 2] = mask[0, 0, 2, 0] = False
    out, lse = L.sage_attention_fwd(q, k, v, True, 0.1, 8, "fp8", True, False, block_mask=mask,
                                    window_left=150, window_right=-1)
    ref, ref_lse = sage_emulate(q, k, v, True, 0.1, 8, "fp8", True, False, block_mask=mask, window=(150, -1))
    diff = (out.float() - ref.half().float()).abs()
    assert diff.max().item() <= (2e-3 + torch.finfo(torch.half).eps) * ref.abs().max().item()
    assert torch.equal(lse.isinf(), ref_lse.isinf())


@pytest.mark.testing_ext
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", [("fp8", True, torch.float16, 8), ("fp16", True, torch.bfloat16, 8),
                                  ("fp8", True, torch.float16, 4)])
def test_sm8x_replay_matches_twin(case, mode):
    T = load_testing_ops()
    lq, lk, causal, window = case
    pv, sk, dtype, bits = mode
    q, k, v = random_qkv(1, 2, 1, lq, lk, 64, dtype, seed=3)
    out, lse = T._sage_emulate_cuda_attention(q, k, v, causal, 0.1, pv, sk, 0, bits, bits == 4,
                                              window_left=window[0], window_right=window[1])
    ref, ref_lse = L.sage_attention_fwd(q, k, v, causal, 0.1, bits, pv, sk, bits == 4,
                                        window_left=window[0], window_right=window[1])
    problem = replay_mismatch(out, lse, ref, ref_lse)
    assert problem is None, problem


@pytest.mark.testing_ext
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sm90_replay_matches_twin(case, dtype):
    T = load_testing_ops()
    lq, lk, causal, window = case
    q, k, v = random_qkv(1, 2, 1, lq, lk, 128 if dtype == torch.bfloat16 else 64, dtype, seed=4)
    out, lse = T._sage_emulate_sm90_attention(q, k, v, causal, 0.1, True,
                                              window_left=window[0], window_right=window[1])
    ref, ref_lse = L.sage_attention_fwd(q, k, v, causal, 0.1, 8, "fp8", True, False,
                                        window_left=window[0], window_right=window[1])
    problem = replay_mismatch(out, lse, ref, ref_lse)
    assert problem is None, problem


def test_sage_attention_window_argument():
    q, k, v = random_qkv(2, 4, 2, 100, 160, 80, torch.float16, seed=5)  # D 80: padded to 128
    out = attention.sage_attention(q, k, v, is_causal=True, window=(31, 0))
    ref, _ = attention_fp64(q, k, v, True, window=(31, 0))
    rel = ((out.double() - ref).abs().sum() / ref.abs().sum()).item()
    assert rel < 0.08, rel
    bshd = attention.sage_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True, window=(31, 0),
                                    layout="bshd")
    assert torch.equal(bshd.transpose(1, 2), out)
    # a window that covers every key is no window at all, bit for bit
    assert torch.equal(attention.sage_attention(q, k, v, window=(500, 500)), attention.sage_attention(q, k, v))
    # negative sides mean unbounded, as FlashAttention's -1
    assert torch.equal(attention.sage_attention(q, k, v, is_causal=True, window=(-5, -1)),
                       attention.sage_attention(q, k, v, is_causal=True))
    for bad in [5, (1,), (1, 2, 3), (1.0, 2), (True, 0), "(1, 2)"]:
        with pytest.raises(TypeError, match="window"):
            attention.sage_attention(q, k, v, window=bad)


def test_varlen_window_is_per_sequence():
    g = torch.Generator().manual_seed(6)
    lens_q, lens_k = [70, 1, 130], [90, 200, 130]
    cq = torch.tensor([0] + list(itertools.accumulate(lens_q)), dtype=torch.int32)
    ck = torch.tensor([0] + list(itertools.accumulate(lens_k)), dtype=torch.int32)
    q = torch.randn(sum(lens_q), 4, 64, generator=g).half()
    k = torch.randn(sum(lens_k), 2, 64, generator=g).half()
    v = torch.randn(sum(lens_k), 2, 64, generator=g).half()
    out = attention.sage_attention_varlen(q, k, v, cq, ck, max(lens_q), max(lens_k), is_causal=True,
                                          window=(40, 0))
    for b in range(3):  # each sequence against fp64 with the window inside the sequence (bottom-right)
        sq, sk = slice(int(cq[b]), int(cq[b + 1])), slice(int(ck[b]), int(ck[b + 1]))
        ref, _ = attention_fp64(*(t.transpose(0, 1)[None] for t in (q[sq], k[sk], v[sk])), True, window=(40, 0))
        got = out[sq].transpose(0, 1)[None].double()
        assert ((got - ref).abs().sum() / ref.abs().sum()).item() < 0.05, b


@pytest.mark.cuda
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kernel,pv", [("sm8x", "fp16"), ("auto", "fp8")])  # auto + fp8: sm90a's wgmma kernel on H100
def test_cuda_matches_twin(case, kernel, pv):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    lq, lk, causal, window = case
    q, k, v = random_qkv(1, 4, 2, lq, lk, 128, torch.float16, seed=7)
    try:
        attention.cuda_path_name(torch.device("cuda"), "int8", pv, False, kernel)
    except NotImplementedError:
        pytest.skip(f"no INT8 + {pv} kernel on this device")
    args = (causal, 0.1, 8, pv, True, False)
    kw = dict(window_left=window[0], window_right=window[1])
    cpu_out, cpu_lse = L.sage_attention_fwd(q, k, v, *args, **kw)
    out, lse = L.sage_attention_fwd(q.cuda(), k.cuda(), v.cuda(), *args, kernel, **kw)
    diff = (out.cpu().float() - cpu_out.float()).abs()
    peak = cpu_out.float().abs().max().item()
    assert diff.max().item() <= (2e-3 + torch.finfo(torch.half).eps) * peak
    assert torch.equal(lse.cpu().isinf(), cpu_lse.isinf())
