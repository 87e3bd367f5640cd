"""Lane-by-lane CPU replay of the sm80/sm89 quantized-attention CUDA path (_sage_emulate_cuda_attention,
csrc/attention/sage_cuda_emulate.cpp; INT8 and INT4 Q K^T, with or without Q smoothing): it matches the CPU twin with the same numerics, it catches deliberately
wrong fragment mappings (so the agreement is not vacuous), bad input, and (on a GPU) the kernel against it."""

import pytest
import torch

import tersor
from attention_reference import replay_mismatch as _mismatch
from conftest import load_testing_ops

L = tersor.ops.lib  # the shipped ops (sage_attention_fwd)
T = load_testing_ops()  # torch.ops.tersor_testing: the replays

SHAPES = [  # b, hq, hkv, lq, lk, d, causal  (those of tests/test_attention.py's CUDA test)
    (2, 4, 2, 100, 77, 64, False),
    (1, 2, 1, 130, 200, 128, True),   # Lq < Lk causal (bottom-right), tails in both
    (1, 2, 2, 200, 150, 64, True),    # Lq > Lk causal: 50 fully masked rows, a CTA with fewer tiles
    (1, 3, 3, 64, 64, 64, True),
    (1, 4, 1, 1, 300, 128, False),    # decode-like, MQA
    (1, 2, 2, 300, 1100, 64, False),  # many key tiles: both shared-memory stages reused
    (2, 4, 2, 1000, 1000, 128, True),
]

KERNEL_MODES = [  # pv, smooth_k, dtype: the configurations the CUDA glue routes to the sm8x kernels
    ("fp8", True, torch.float16),
    ("fp8", False, torch.bfloat16),
    ("fp16", True, torch.float16),
    ("fp16", True, torch.bfloat16),
]


def _inputs(shape, dtype, seed=0):
    b, hq, hkv, lq, lk, d, _ = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=g).to(dtype)
    k = (torch.randn(b, hkv, lk, d, generator=g) + 1.0).to(dtype)
    v = torch.randn(b, hkv, lk, d, generator=g).to(dtype)
    return q, k, v


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", KERNEL_MODES)
def test_replay_matches_cpu_twin(shape, mode):
    pv, sk, dtype = mode
    causal = shape[-1]
    q, k, v = _inputs(shape, dtype)
    out, lse = T._sage_emulate_cuda_attention(q, k, v, causal, 0.1, pv, sk)
    ref, ref_lse = L.sage_attention_fwd(q, k, v, causal, 0.1, 8, pv, sk, False)
    assert out.dtype == dtype and out.shape == ref.shape and lse.dtype == torch.float32
    problem = _mismatch(out, lse, ref, ref_lse)
    assert problem is None, problem
    b, hq, hkv, lq, lk, d, _ = shape
    if causal and lq > lk:
        assert (out[:, :, : lq - lk] == 0).all() and lse[:, :, : lq - lk].eq(float("-inf")).all()


def test_replay_lse_includes_smoothing_correction():
    # A large K bias: without smoothing the INT8 scores lose it to quantization; with it, the prologue's
    # q . k_mean correction (warp-reduced fp32 dot products) must restore the true LSE.
    shape = (1, 2, 2, 96, 130, 64, False)
    q, k, v = _inputs(shape, torch.float16, seed=3)
    k = (k.float() + 4.0).half()
    out, lse = T._sage_emulate_cuda_attention(q, k, v, False, 0.125, "fp16", True)
    ref_lse = torch.logsumexp(q.double() @ k.double().transpose(-1, -2) * 0.125, dim=-1)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=0, atol=0.05)


# fault: 1 swaps Q A-fragment registers 1 and 2 (rows g + 8 <-> k + 16), 2 stores FP8 V^T in natural token
# order, 3 swaps the n-tiles of P's A-fragment registers, 4 reads K scale group t ^ 1.
FAULTS = [(1, "fp8"), (1, "fp16"), (2, "fp8"), (3, "fp8"), (3, "fp16"), (4, "fp8"), (4, "fp16")]


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1]])
def test_replay_catches_wrong_fragment_mapping(fault, shape):
    f, pv = fault
    dtype = torch.float16
    causal = shape[-1]
    q, k, v = _inputs(shape, dtype, seed=1)
    ref, ref_lse = L.sage_attention_fwd(q, k, v, causal, 0.1, 8, pv, True, False)
    good = T._sage_emulate_cuda_attention(q, k, v, causal, 0.1, pv, True, 0)
    assert _mismatch(*good, ref, ref_lse) is None
    out, lse = T._sage_emulate_cuda_attention(q, k, v, causal, 0.1, pv, True, f)
    assert _mismatch(out, lse, ref, ref_lse) is not None
    diff = (out.float() - ref.float()).abs().max().item()
    assert diff > 0.1 * ref.float().abs().max().item()


def test_replay_fault_2_is_fp8_only():
    # The 16-bit V^T copy has no permutation, so fault 2 must change nothing there.
    shape = SHAPES[0]
    q, k, v = _inputs(shape, torch.bfloat16)
    a = T._sage_emulate_cuda_attention(q, k, v, False, 0.1, "fp16", True, 0)
    b = T._sage_emulate_cuda_attention(q, k, v, False, 0.1, "fp16", True, 2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_replay_bad_input():
    q, k, v = _inputs((1, 2, 2, 40, 50, 64, False), torch.float16)
    with pytest.raises(ValueError, match="fp8"):
        T._sage_emulate_cuda_attention(q, k, v, False, 0.1, "fp32", True)
    with pytest.raises(ValueError, match="pv must be"):
        T._sage_emulate_cuda_attention(q, k, v, False, 0.1, "int8", True)
    with pytest.raises(ValueError, match="fault"):
        T._sage_emulate_cuda_attention(q, k, v, False, 0.1, "fp8", True, 8)
    with pytest.raises(ValueError, match="qk_bits"):
        T._sage_emulate_cuda_attention(q, k, v, False, 0.1, "fp8", True, 0, 2)
    with pytest.raises(ValueError, match="qk_bits"):
        T._sage_emulate_cuda_attention(q, k, v, False, 0.1, "fp8", True, 0, 0)
    with pytest.raises(TypeError):
        T._sage_emulate_cuda_attention(q.float(), k.float(), v.float(), False, 0.1, "fp8", True)
    with pytest.raises(ValueError, match="head_dim"):
        T._sage_emulate_cuda_attention(q[..., :32], k[..., :32], v[..., :32], False, 0.1, "fp8", True)
    with pytest.raises(ValueError, match="multiple"):
        T._sage_emulate_cuda_attention(q, k[:, :1].expand(1, 3, 50, 64), v[:, :1].expand(1, 3, 50, 64), False,
                                       0.1, "fp8", True)
    out, lse = T._sage_emulate_cuda_attention(q[:, :, :0], k, v, False, 0.1, "fp8", True)
    assert out.shape == (1, 2, 0, 64) and lse.shape == (1, 2, 0)


# INT4 Q K^T (mma.m16n8k64.s4, packed nibbles) and Q smoothing (per-32-row-block mean, q_mean . K' bias):
# qk_bits, smooth_q, pv, dtype.
INT4_SMOOTH_MODES = [
    (4, True, "fp8", torch.float16),
    (4, False, "fp16", torch.bfloat16),
    (4, True, "fp16", torch.bfloat16),
    (8, True, "fp8", torch.float16),
]


def _offset_q(q):
    # A per-channel Q offset (what Q smoothing removes), so the smoothing bias carries real weight.
    return (q.float() + torch.linspace(-2.0, 2.0, q.shape[-1])).to(q.dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", INT4_SMOOTH_MODES)
def test_replay_int4_and_smooth_q_match_cpu_twin(shape, mode):
    bits, sq, pv, dtype = mode
    causal = shape[-1]
    q, k, v = _inputs(shape, dtype, seed=2)
    q = _offset_q(q)
    out, lse = T._sage_emulate_cuda_attention(q, k, v, causal, 0.1, pv, True, 0, bits, sq)
    ref, ref_lse = L.sage_attention_fwd(q, k, v, causal, 0.1, bits, pv, True, sq)
    assert out.dtype == dtype and out.shape == ref.shape
    problem = _mismatch(out, lse, ref, ref_lse)
    assert problem is None, problem


# fault 5 packs INT4 K with the even channel in the high nibble; 6 adds the smoothing bias of the other key
# of the lane's column pair. Each must move the output far (and only in the mode it concerns).
INT4_FAULTS = [(5, 4, False, "fp16"), (5, 4, True, "fp8"), (6, 4, True, "fp8"), (6, 8, True, "fp16")]


@pytest.mark.parametrize("fault", INT4_FAULTS)
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1]])
def test_replay_catches_wrong_int4_and_bias_mapping(fault, shape):
    f, bits, sq, pv = fault
    causal = shape[-1]
    q, k, v = _inputs(shape, torch.float16, seed=1)
    q = _offset_q(q)
    ref, ref_lse = L.sage_attention_fwd(q, k, v, causal, 0.1, bits, pv, True, sq)
    good = T._sage_emulate_cuda_attention(q, k, v, causal, 0.1, pv, True, 0, bits, sq)
    assert _mismatch(*good, ref, ref_lse) is None
    out, lse = T._sage_emulate_cuda_attention(q, k, v, causal, 0.1, pv, True, f, bits, sq)
    assert _mismatch(out, lse, ref, ref_lse) is not None
    assert (out.float() - ref.float()).abs().max().item() > 0.1 * ref.float().abs().max().item()


def test_replay_int4_faults_are_mode_specific():
    # Fault 5 touches only INT4 packing, fault 6 only the smoothing bias.
    shape = SHAPES[0]
    q, k, v = _inputs(shape, torch.float16, seed=4)
    q = _offset_q(q)
    for f, bits, sq in [(5, 8, True), (6, 4, False)]:
        a = T._sage_emulate_cuda_attention(q, k, v, False, 0.1, "fp16", True, 0, bits, sq)
        b = T._sage_emulate_cuda_attention(q, k, v, False, 0.1, "fp16", True, f, bits, sq)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.cuda
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", INT4_SMOOTH_MODES)
def test_cuda_int4_smooth_q_kernel_matches_replay(shape, mode):
    bits, sq, pv, dtype = mode
    cc = torch.cuda.get_device_capability()
    if pv == "fp8" and cc < (8, 9):
        pytest.skip("FP8 P.V needs sm89+")
    if bits == 4 and cc >= (9, 0):
        pytest.skip("no INT4 tensor cores on this device (the call is a NotImplementedError, tests/test_attention.py)")
    causal = shape[-1]
    q, k, v = _inputs(shape, dtype, seed=2)
    q = _offset_q(q)
    rep, rep_lse = T._sage_emulate_cuda_attention(q, k, v, causal, 0.1, pv, True, 0, bits, sq)
    out, lse = L.sage_attention_fwd(q.cuda(), k.cuda(), v.cuda(), causal, 0.1, bits, pv, True, sq, "sm8x")
    problem = _mismatch(out.cpu(), lse.cpu(), rep, rep_lse, mean_bound=5e-6, min_same=0.0)
    assert problem is None, problem


@pytest.mark.cuda
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", KERNEL_MODES)
def test_cuda_kernel_matches_replay(shape, mode):
    # The replay runs the kernels' own arithmetic, so the kernel must agree with it as closely as with the
    # twin (ex2.approx's <= 2 ulp and MMA-internal rounding are the only extra differences). kernel="sm8x":
    # the mma.sync kernels these replays model, also on compute capability 9.0.
    pv, sk, dtype = mode
    if pv == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 P.V needs sm89+")
    causal = shape[-1]
    q, k, v = _inputs(shape, dtype)
    rep, rep_lse = T._sage_emulate_cuda_attention(q, k, v, causal, 0.1, pv, sk)
    out, lse = L.sage_attention_fwd(q.cuda(), k.cuda(), v.cuda(), causal, 0.1, 8, pv, sk, False, "sm8x")
    # The bit-identical share is not required here (ex2.approx moves some outputs by an ulp); the mean
    # bound is that of the kernel-vs-twin test.
    problem = _mismatch(out.cpu(), lse.cpu(), rep, rep_lse, mean_bound=5e-6, min_same=0.0)
    assert problem is None, problem
