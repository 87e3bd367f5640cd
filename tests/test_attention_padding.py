"""Key padding masks (issue 15 item 4): ``key_padding_mask`` bool ``[B, Lk]`` (True = a real key) in the CPU twin
(exact and quantized modes), both CUDA kernels (their lane-by-lane replays here; the kernels against the twin on
a GPU) and ``sage_attention``: against fp64, the independent emulation, and per-sequence calls on the unpadded
keys."""

import pytest
import torch

import tersor
from attention_reference import assert_twin_matches_emulation, attention_fp64, random_qkv, replay_mismatch, sage_emulate
from conftest import load_testing_ops
from tersor import attention

L = tersor.ops.lib


def _padding(b, lk, kind, seed=0):
    """bool [b, lk]: right padding, left padding (generation), random holes, and one entry with no key."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, lk + 1, (b,), generator=g)
    pos = torch.arange(lk)[None, :]
    if kind == "right":
        return pos < lens[:, None]
    if kind == "left":
        return pos >= lk - lens[:, None]
    m = torch.rand(b, lk, generator=g) < 0.7
    if kind == "empty":
        m[0] = False
    return m


CASES = [  # b, lq, lk, causal, padding kind
    (3, 100, 100, True, "left"),
    (3, 150, 230, False, "right"),
    (2, 64, 300, True, "holes"),
    (2, 130, 130, False, "empty"),
]


@pytest.mark.parametrize("case", CASES)
def test_exact_mode_matches_fp64(case):
    b, lq, lk, causal, kind = case
    q, k, v = random_qkv(b, 4, 2, lq, lk, 64, torch.float32)
    kp = _padding(b, lk, kind)
    out, lse = L.sage_attention_fwd(q, k, v, causal, 0.125, 0, "fp32", True, False, key_padding_mask=kp)
    ref, ref_lse = attention_fp64(q, k, v, causal, 0.125, key_padding=kp)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(lse.isinf(), ref_lse.isinf())
    fin = ref_lse.isfinite()
    torch.testing.assert_close(lse.double()[fin], ref_lse[fin], rtol=1e-6, atol=1e-6)
    assert not out.isnan().any()
    if kind == "empty":
        assert (out[0] == 0).all() and lse[0].eq(float("-inf")).all()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", [(8, "fp8", True, False, torch.float16), (8, "fp16", True, False, torch.bfloat16),
                                  (4, "fp8", True, True, torch.float16)])
def test_quantized_twin_matches_emulation(case, mode):
    b, lq, lk, causal, kind = case
    bits, pv, sk, sq, dtype = mode
    q, k, v = random_qkv(b, 4, 2, lq, lk, 64, dtype, seed=1)
    kp = _padding(b, lk, kind, seed=1)
    out, lse = L.sage_attention_fwd(q, k, v, causal, 0.1, bits, pv, sk, sq, key_padding_mask=kp)
    ref, ref_lse = sage_emulate(q, k, v, causal, 0.1, bits, pv, sk, sq, key_padding=kp)
    max_diff = assert_twin_matches_emulation(out, lse, ref, ref_lse)
    full, _ = L.sage_attention_fwd(q, k, v, causal, 0.1, bits, pv, sk, sq)
    assert (full.float() - out.float()).abs().max().item() > 20 * max_diff + 1e-3


def test_left_padding_equals_the_unpadded_sequence():
    # Generation-style left padding, causal: each batch entry's real rows give what the unpadded sequence gives
    # in the exact mode (in quantized modes the padded keys move K's mean and scales, so only close).
    b, l = 3, 90
    q, k, v = random_qkv(b, 4, 2, l, l, 64, torch.float32, seed=2)
    kp = _padding(b, l, "left", seed=2)
    out = attention.sage_attention(q, k, v, is_causal=True, qk="none", pv="fp32", key_padding_mask=kp)
    for i in range(b):
        n = int(kp[i].sum())
        one = attention.sage_attention(q[i:i + 1, :, l - n:], k[i:i + 1, :, l - n:], v[i:i + 1, :, l - n:],
                                       is_causal=True, qk="none", pv="fp32")
        torch.testing.assert_close(out[i:i + 1, :, l - n:], one, rtol=1e-6, atol=1e-6)


@pytest.mark.testing_ext
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", [("fp8", torch.float16, 8), ("fp16", torch.bfloat16, 8), ("fp8", torch.float16, 4)])
def test_sm8x_replay_matches_twin(case, mode):
    T = load_testing_ops()
    b, lq, lk, causal, kind = case
    pv, dtype, bits = mode
    q, k, v = random_qkv(b, 2, 1, lq, lk, 64, dtype, seed=3)
    kp = _padding(b, lk, kind, seed=3)
    out, lse = T._sage_emulate_cuda_attention(q, k, v, causal, 0.1, pv, True, 0, bits, bits == 4,
                                              key_padding_mask=kp)
    ref, ref_lse = L.sage_attention_fwd(q, k, v, causal, 0.1, bits, pv, True, bits == 4, key_padding_mask=kp)
    problem = replay_mismatch(out, lse, ref, ref_lse)
    assert problem is None, problem


@pytest.mark.testing_ext
@pytest.mark.parametrize("case", CASES)
def test_sm90_replay_matches_twin(case):
    T = load_testing_ops()
    b, lq, lk, causal, kind = case
    q, k, v = random_qkv(b, 2, 1, lq, lk, 128, torch.bfloat16, seed=4)
    kp = _padding(b, lk, kind, seed=4)
    out, lse = T._sage_emulate_sm90_attention(q, k, v, causal, 0.1, True, key_padding_mask=kp, window_left=70)
    ref, ref_lse = L.sage_attention_fwd(q, k, v, causal, 0.1, 8, "fp8", True, False, key_padding_mask=kp,
                                        window_left=70)
    problem = replay_mismatch(out, lse, ref, ref_lse)
    assert problem is None, problem


def test_argument_errors():
    q, k, v = random_qkv(2, 2, 2, 10, 12, 64, torch.float16)
    kp = torch.ones(2, 12, dtype=torch.bool)
    for bad, err in [(kp.int(), TypeError), (kp[:, :11], ValueError), (kp[None], ValueError), (kp[:1], ValueError),
                     ([[True] * 12] * 2, TypeError)]:
        with pytest.raises(err, match="key_padding_mask"):
            attention.sage_attention(q, k, v, key_padding_mask=bad)
    # bshd: the mask is still [B, Lk]
    out = attention.sage_attention(*(t.transpose(1, 2) for t in (q, k, v)), layout="bshd", key_padding_mask=kp)
    assert torch.equal(out.transpose(1, 2), attention.sage_attention(q, k, v, key_padding_mask=kp))
    # an all-true mask is no mask, bit for bit
    assert torch.equal(attention.sage_attention(q, k, v, key_padding_mask=kp), attention.sage_attention(q, k, v))


@pytest.mark.cuda
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kernel,pv", [("sm8x", "fp16"), ("auto", "fp8")])
def test_cuda_matches_twin(case, kernel, pv):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    try:
        attention.cuda_path_name(torch.device("cuda"), "int8", pv, False, kernel)
    except NotImplementedError:
        pytest.skip(f"no INT8 + {pv} kernel on this device")
    b, lq, lk, causal, kind = case
    q, k, v = random_qkv(b, 4, 2, lq, lk, 128, torch.float16, seed=5)
    kp = _padding(b, lk, kind, seed=5)
    args = (causal, 0.1, 8, pv, True, False)
    cpu_out, cpu_lse = L.sage_attention_fwd(q, k, v, *args, key_padding_mask=kp)
    out, lse = L.sage_attention_fwd(q.cuda(), k.cuda(), v.cuda(), *args, kernel, key_padding_mask=kp.cuda())
    diff = (out.cpu().float() - cpu_out.float()).abs()
    assert diff.max().item() <= (2e-3 + torch.finfo(torch.half).eps) * cpu_out.float().abs().max().item()
    assert torch.equal(lse.cpu().isinf(), cpu_lse.isinf())
