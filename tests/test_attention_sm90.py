"""The sm90a quantized-attention kernel (csrc/attention/sage_attn_sm90.cu).

CPU: _sage_emulate_sm90_attention replays the whole sm90a CUDA path lane by lane (prologue with keys padded to
128, tile-native relayout, bulk copies into poisoned stages, wgmma through the kernel's descriptors, the
softmax per 64-key half, the epilogue) and must match the CPU twin as closely as the sm8x replay does.
_sage_sm90_layout_check replays the kernel's addressing (the tile-native relayout, the bulk copy of a
tile block into a shared stage, the wgmma descriptors it builds, its Q register loads, accumulator maps and
P packing, its scale-group indices) against an independent model of the PTX rules, with integer data, and
counts mismatches; each injected fault must be caught. GPU (``@pytest.mark.cuda``, Hopper only): the kernel
against the CPU twin with the tolerance rule of tests/test_attention.py, and against the sm8x kernels forced
on the same device with TERSOR_SAGE_FORCE_SM8X=1.
"""

import pytest
import torch

from tersor import attention
from test_attention_emulate import _mismatch as _replay_mismatch  # the sm8x replay's bound, same numerics

L = torch.ops.tersor

CHECKS = ["k tile bijection", "v tile bijection", "QK elements", "PV elements", "Q scale groups",
          "K scale groups", "P fragment rows/tokens"]


@pytest.mark.parametrize("head_dim", [64, 128])
def test_layout_check_consistent(head_dim):
    bad = L._sage_sm90_layout_check(head_dim)
    assert len(bad) == len(CHECKS)
    assert bad == [0] * len(CHECKS), dict(zip(CHECKS, bad))


# fault -> the checks that must see it (the others may or may not).
FAULTS = {
    1: ["QK elements"],             # K descriptor with LBO and SBO swapped
    2: ["PV elements", "P fragment rows/tokens"],  # P packed from the wrong n-tile pair
    3: ["QK elements"],             # K descriptor advanced 32 bytes per k-step instead of 2 core matrices
    4: ["QK elements"],             # Q A-registers 1 and 2 swapped
    5: ["K scale groups"],          # second key half uses the first half's K scales
    6: ["PV elements"],             # V^T tile written channel-major (core-matrix order transposed)
}


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_layout_check_catches_faults(head_dim, fault):
    bad = dict(zip(CHECKS, L._sage_sm90_layout_check(head_dim, fault)))
    for name in FAULTS[fault]:
        assert bad[name] > 0, (fault, bad)


def test_layout_check_bad_input():
    with pytest.raises(ValueError, match="head_dim"):
        L._sage_sm90_layout_check(96)
    with pytest.raises(ValueError, match="fault"):
        L._sage_sm90_layout_check(64, 7)


REPLAY_SHAPES = [  # b, hq, hkv, lq, lk, d, causal
    (1, 2, 1, 200, 300, 64, True),     # GQA, Lq < Lk, key tail inside the second 64-half
    (1, 2, 2, 129, 130, 128, False),   # one row past a CTA, one key past a 128-tile
    (1, 2, 2, 300, 100, 64, True),     # Lq > Lk: fully masked rows, second consumer warpgroup idle
    (2, 2, 1, 64, 257, 128, True),
]


def _replay_inputs(shape, dtype, seed=0):
    b, hq, hkv, lq, lk, d, _ = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=g).to(dtype)
    k = (torch.randn(b, hkv, lk, d, generator=g) + 1.0).to(dtype)
    v = torch.randn(b, hkv, lk, d, generator=g).to(dtype)
    return q, k, v


@pytest.mark.parametrize("shape", REPLAY_SHAPES)
@pytest.mark.parametrize("dtype,smooth_k", [(torch.float16, True), (torch.bfloat16, False)])
def test_sm90_replay_matches_cpu_twin(shape, dtype, smooth_k):
    q, k, v = _replay_inputs(shape, dtype)
    causal = shape[-1]
    out, lse = L._sage_emulate_sm90_attention(q, k, v, causal, 0.1, smooth_k)
    ref, ref_lse = L.sage_attention_fwd(q, k, v, causal, 0.1, 8, "fp8", smooth_k, False)
    assert out.shape == ref.shape and out.dtype == dtype and lse.shape == ref_lse.shape
    problem = _replay_mismatch(out, lse, ref, ref_lse)
    assert problem is None, problem


def test_sm90_replay_is_not_the_twin():
    # The replay runs its own (kernel) code path: different keys change its output like the twin's, and a
    # wrong scale is visible (guards against a replay that silently returns the twin or zeros).
    q, k, v = _replay_inputs((1, 1, 1, 70, 90, 64, False), torch.float16)
    a, _ = L._sage_emulate_sm90_attention(q, k, v, False, 0.1, True)
    b, _ = L._sage_emulate_sm90_attention(q, k, v, False, 0.2, True)
    assert a.abs().max() > 0 and (a.float() - b.float()).abs().max() > 1e-2


def test_sm90_replay_bad_input():
    q, k, v = _replay_inputs((1, 2, 2, 10, 12, 64, False), torch.float16)
    with pytest.raises(TypeError):
        L._sage_emulate_sm90_attention(q.float(), k.float(), v.float(), False, 0.1, True)
    with pytest.raises(ValueError):
        L._sage_emulate_sm90_attention(q[..., :32], k[..., :32], v[..., :32], False, 0.1, True)
    out, lse = L._sage_emulate_sm90_attention(q[:, :, :0], k, v, False, 0.1, True)
    assert out.shape == (1, 2, 0, 64) and lse.shape == (1, 2, 0)


def test_cuda_path_names(monkeypatch):
    cpu = torch.device("cpu")
    assert attention.cuda_path_name(cpu, "int8", "fp8") == "cpu-twin"
    # The routing table of sage_cuda_glue.cpp, per compute capability (no GPU needed to check the table).
    cuda = torch.device("cuda", 0)
    expected = {
        (9, 0): {("int8", "fp8", False): "sm90a-wgmma", ("int8", "fp8", True): "sm8x-mma",
                 ("int8", "fp16", False): "sm8x-mma", ("int4", "fp8", False): "host-twin",
                 ("int8", "fp32", False): "host-twin"},
        (8, 9): {("int8", "fp8", False): "sm8x-mma", ("int4", "fp8", True): "sm8x-mma",
                 ("int4", "fp16", False): "sm8x-mma", ("none", "fp8", False): "host-twin"},
        (8, 0): {("int8", "fp8", False): "host-twin", ("int8", "fp16", True): "sm8x-mma",
                 ("int4", "fp16", False): "sm8x-mma"},
        (7, 5): {("int8", "fp16", False): "host-twin"},
    }
    for cc, table in expected.items():
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, cc=cc: cc)
        for (qk, pv, smooth_q), name in table.items():
            assert attention.cuda_path_name(cuda, qk, pv, smooth_q) == name, (cc, qk, pv, smooth_q)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setenv("TERSOR_SAGE_FORCE_SM8X", "1")
    assert attention.cuda_path_name(cuda, "int8", "fp8") == "sm8x-mma"


# ---- on a Hopper GPU ----------------------------------------------------------------------------------

def _hopper():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def _assert_close_to_twin(out, lse, cpu_out, cpu_lse):
    # The rule of tests/test_attention.py (ex2.approx, MMA summation order, rare e4m3 flips of one P entry).
    diff = (out.cpu().float() - cpu_out.float()).abs()
    peak = cpu_out.float().abs().max().item()
    eps = torch.finfo(cpu_out.dtype).eps
    assert diff.max().item() <= (2e-3 + eps) * peak, diff.max().item()
    assert diff.mean().item() <= 5e-6 * peak, diff.mean().item()
    assert torch.equal(lse.cpu().isinf(), cpu_lse.isinf())
    fin = cpu_lse.isfinite()
    torch.testing.assert_close(lse.cpu()[fin], cpu_lse[fin], rtol=0, atol=1e-3)


SHAPES = [  # b, hq, hkv, lq, lk, d, causal: tails of both tile sizes, GQA, Lq != Lk (bottom-right causal)
    (1, 2, 2, 128, 128, 128, False),
    (2, 4, 2, 1000, 1000, 128, True),
    (1, 4, 1, 300, 1100, 64, False),
    (1, 2, 2, 1100, 300, 64, True),   # fully masked rows
    (1, 2, 1, 77, 4097, 128, True),
    (1, 1, 1, 129, 65, 64, False),
]


@pytest.mark.cuda
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,smooth_k", [(torch.float16, True), (torch.bfloat16, False)])
@pytest.mark.parametrize("force_sm8x", [False, True])
def test_sm90_matches_cpu_twin(shape, dtype, smooth_k, force_sm8x, monkeypatch):
    if not _hopper():
        pytest.skip("the sm90a kernel needs a compute-capability 9.0 GPU")
    if force_sm8x:
        monkeypatch.setenv("TERSOR_SAGE_FORCE_SM8X", "1")
    b, hq, hkv, lq, lk, d, causal = shape
    q = torch.randn(b, hq, lq, d).to(dtype)
    k = (torch.randn(b, hkv, lk, d) + 1.0).to(dtype)
    v = torch.randn(b, hkv, lk, d).to(dtype)
    cpu_out, cpu_lse = L.sage_attention_fwd(q, k, v, causal, 0.1, 8, "fp8", smooth_k, False)
    out, lse = L.sage_attention_fwd(q.cuda(), k.cuda(), v.cuda(), causal, 0.1, 8, "fp8", smooth_k, False)
    assert out.is_cuda and out.dtype == dtype
    _assert_close_to_twin(out, lse, cpu_out, cpu_lse)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", REPLAY_SHAPES)
def test_sm90_kernel_matches_replay(shape):
    if not _hopper():
        pytest.skip("the sm90a kernel needs a compute-capability 9.0 GPU")
    q, k, v = _replay_inputs(shape, torch.float16, seed=3)
    causal = shape[-1]
    rep, rep_lse = L._sage_emulate_sm90_attention(q, k, v, causal, 0.1, True)
    out, lse = L.sage_attention_fwd(q.cuda(), k.cuda(), v.cuda(), causal, 0.1, 8, "fp8", True, False)
    # ex2.approx (<= 2 ulp) and the wgmma's internal fp8 summation are not replayed: the CUDA-vs-twin rule.
    _assert_close_to_twin(out, lse, rep, rep_lse)


@pytest.mark.cuda
def test_sm90_long_sequence_and_strided(monkeypatch):
    if not _hopper():
        pytest.skip("the sm90a kernel needs a compute-capability 9.0 GPU")
    b, h, n, d = 1, 2, 8192, 128
    q, k, v = (torch.randn(b, n, h, d, device="cuda").half().transpose(1, 2) for _ in range(3))  # bshd memory
    k = k + 1.0
    out, lse = L.sage_attention_fwd(q, k, v, True, d ** -0.5, 8, "fp8", True, False)
    monkeypatch.setenv("TERSOR_SAGE_FORCE_SM8X", "1")
    out8, lse8 = L.sage_attention_fwd(q, k, v, True, d ** -0.5, 8, "fp8", True, False)
    # Same numerics contract, different summation orders: both within the twin rule of each other.
    _assert_close_to_twin(out, lse, out8.cpu(), lse8.cpu())
    assert attention.cuda_path_name(q.device, "int8", "fp8") == "sm8x-mma"
    monkeypatch.delenv("TERSOR_SAGE_FORCE_SM8X")
    assert attention.cuda_path_name(q.device, "int8", "fp8") == "sm90a-wgmma"
