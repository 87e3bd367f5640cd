"""hadamard_transform: CPU kernel vs independent float64 references, errors, and CUDA vs CPU."""

import math

import pytest
import torch

import tersor
from conftest import load_script
from reference import fwht, hadamard, sylvester

gen = load_script("gen_hadamard_tables")
K_MATS = {k: gen.build(k) for k in gen.KS}
POW2 = [1 << i for i in range(16)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def test_reference_fwht_is_sylvester():
    for n in [1, 2, 4, 8, 64, 256]:
        x = torch.randn(3, n, dtype=torch.float64)
        torch.testing.assert_close(fwht(x), x @ sylvester(n).T, rtol=0, atol=1e-12)


def test_k_list_matches_header():
    assert tersor.ops.HADAMARD_K_SIZES == tuple(gen.KS)


@pytest.mark.parametrize("n", POW2)
def test_pow2_exact_on_integers(n):
    # Integer inputs with scale=1: every partial sum is an exact fp32 integer (|sum| <= 4 * 32768 < 2^24),
    # so the kernel must equal the explicit transform bit for bit.
    x = torch.randint(-4, 5, (3, n)).float()
    y = tersor.hadamard_transform(x, scale=1.0)
    ref = fwht(x) if n > 2048 else x.double() @ sylvester(n).T
    assert torch.equal(y.double(), ref)


@pytest.mark.parametrize("k", sorted(K_MATS))
@pytest.mark.parametrize("log_m", [0, 1, 3])
def test_k_exact_on_integers(k, log_m):
    n = k << log_m
    x = torch.randint(-4, 5, (2, n)).float()
    for transpose in (False, True):
        y = tersor.hadamard_transform(x, scale=1.0, transpose=transpose)
        assert torch.equal(y.double(), hadamard(x, K_MATS[k], transpose)), (k, log_m, transpose)


@pytest.mark.parametrize("k", sorted(K_MATS))
def test_k_orthonormal(k):
    n = k * 4
    eye = torch.eye(n)
    h = tersor.hadamard_transform(eye).T  # column j = H e_j, so h is H / sqrt(n)
    assert torch.allclose(h.abs(), torch.full_like(h, 1 / math.sqrt(n)), rtol=1e-6, atol=0)
    torch.testing.assert_close(h @ h.T, torch.eye(n), rtol=0, atol=1e-5)
    # ... and it is the Kronecker product the docs promise.
    expect = torch.kron(torch.from_numpy(K_MATS[k]).double(), sylvester(4)) / math.sqrt(n)
    torch.testing.assert_close(h.double(), expect, rtol=0, atol=1e-6)


@pytest.mark.parametrize("n", [11008, 28672, 172 << 15, 12 << 15, 32768])
def test_large_sizes(n):
    k, _ = tersor.ops.hadamard_factor(n)
    x = torch.randn(2, n)
    y = tersor.hadamard_transform(x)
    ref = hadamard(x, K_MATS.get(k), False) / math.sqrt(n)
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=2e-5 * math.log2(n))


@pytest.mark.parametrize("k", [1, 172])
def test_inverse_roundtrip(k):
    n = k * 256
    x = torch.randn(4, n)
    y = tersor.hadamard_transform(tersor.hadamard_transform(x), transpose=True)
    torch.testing.assert_close(y, x, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [256, 4096, 20 * 64])
def test_low_precision_within_twice_torch_error(dtype, n):
    # FlashAttention rule: our error vs the float64 truth of the *rounded* input is at most twice
    # that of PyTorch's own matmul in the same dtype (plus a small absolute slack).
    k, _ = tersor.ops.hadamard_factor(n)
    x = torch.randn(16, n).to(dtype)
    truth = hadamard(x, K_MATS.get(k)) / math.sqrt(n)
    h_explicit = (hadamard(torch.eye(n), K_MATS.get(k)) / math.sqrt(n)).T  # x @ h_explicit = H x
    torch_err = (x.float() @ h_explicit.float()).to(dtype).double().sub(truth).abs().max().item()
    ours_err = tersor.hadamard_transform(x).double().sub(truth).abs().max().item()
    assert ours_err <= 2 * torch_err + 1e-3, (ours_err, torch_err)


def test_shapes_strides_and_dtypes():
    x = torch.randn(2, 3, 5, 64)
    y = tersor.hadamard_transform(x)
    assert y.shape == x.shape and y.is_contiguous()
    torch.testing.assert_close(y.double(), fwht(x) / 8, rtol=0, atol=1e-6)
    xt = torch.randn(64, 10).T  # non-contiguous, last dim 64
    torch.testing.assert_close(tersor.hadamard_transform(xt).double(), fwht(xt) / 8, rtol=0, atol=1e-6)
    xs = torch.randn(4, 128)[:, ::2]  # strided last dim
    torch.testing.assert_close(tersor.hadamard_transform(xs).double(), fwht(xs) / 8, rtol=0, atol=1e-6)
    v = torch.randn(32)
    torch.testing.assert_close(tersor.hadamard_transform(v, scale=2.0).double(), fwht(v) * 2, rtol=0, atol=1e-5)
    for dt in DTYPES:
        assert tersor.hadamard_transform(torch.randn(3, 16).to(dt)).dtype == dt
    empty = torch.empty(0, 16)
    assert tersor.hadamard_transform(empty).shape == (0, 16)


@pytest.mark.parametrize("n", [0, 3, 6, 7, 24 + 1, 1 << 16, 12 << 16, 44, 172 * 3])
def test_unsupported_sizes_raise(n):
    with pytest.raises(ValueError, match="supported sizes"):
        tersor.hadamard_transform(torch.randn(2, n))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="at least one dimension"):
        tersor.hadamard_transform(torch.tensor(1.0))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        tersor.hadamard_transform(torch.ones(2, 8, dtype=torch.int32))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        tersor.hadamard_transform(torch.ones(2, 8, dtype=torch.float64))
    for bad in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="finite"):
            tersor.hadamard_transform(torch.ones(2, 8), scale=bad)


def test_python_size_twin_agrees_with_cpp():
    ns = set(range(0, 4100))
    for k in (1,) + tersor.ops.HADAMARD_K_SIZES:
        for lg in range(18):
            for d in (-1, 0, 1):
                ns.add((k << lg) + d)
    for n in sorted(ns):
        try:
            tersor.ops.hadamard_factor(n)
            cpp_ok = True
        except ValueError:
            cpp_ok = False
        assert tersor.ops._hadamard_size_ok(n) == cpp_ok, n


@pytest.mark.parametrize("k", [1, 12])
@pytest.mark.parametrize("transpose", [False, True])
def test_backward_is_transposed_transform(k, transpose):
    n = k * 16
    x = torch.randn(3, n, requires_grad=True)
    w = torch.randn(3, n)
    (tersor.hadamard_transform(x, scale=0.5, transpose=transpose) * w).sum().backward()
    m = hadamard(torch.eye(n), K_MATS.get(k), transpose) * 0.5  # row i = transform of e_i, so y = x @ m
    torch.testing.assert_close(x.grad.double(), w.double() @ m.T, rtol=0, atol=1e-5)


def test_does_not_mutate_input():
    x = torch.randn(4, 172 * 8)
    before = x.clone()
    tersor.hadamard_transform(x)
    assert torch.equal(x, before)


# ------------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)

CUDA_SIZES = POW2 + [k << lg for k in sorted(K_MATS) for lg in (0, 2, 6)] + [11008, 28672, 172 << 15]


@pytest.mark.cuda
@pytest.mark.parametrize("n", CUDA_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu(n, dtype):
    rows = 37 if n <= 32768 else 3  # not a multiple of any rows-per-block
    x = torch.randn(rows, n).to(dtype)
    for transpose in (False, True):
        y_cpu = tersor.hadamard_transform(x, transpose=transpose)
        y_gpu = tersor.hadamard_transform(x.cuda(), transpose=transpose).cpu()
        if dtype == torch.float32:
            torch.testing.assert_close(y_gpu, y_cpu, rtol=1e-5, atol=1e-5 * math.log2(max(n, 2)))
        else:
            # Both round one fp32 result per element; summation order differs, so allow one ulp.
            torch.testing.assert_close(y_gpu.float(), y_cpu.float(), rtol=2 ** -7 if dtype == torch.bfloat16 else 2 ** -10, atol=1e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("n", [256, 4096, 32768, 11008])
def test_cuda_exact_on_integers(n):
    x = torch.randint(-4, 5, (5, n)).float()
    assert torch.equal(tersor.hadamard_transform(x.cuda(), scale=1.0).cpu(), tersor.hadamard_transform(x, scale=1.0))


@pytest.mark.cuda
def test_cuda_misaligned_view_and_poisoned_output():
    base = torch.randn(5 * 256 + 1, device="cuda")
    x = base[1:].view(5, 256)  # storage offset 1: not 16-byte aligned
    torch.testing.assert_close(tersor.hadamard_transform(x).cpu(), tersor.hadamard_transform(x.cpu()), rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_cuda_graph_capture():
    x = torch.randn(64, 11008, device="cuda", dtype=torch.float16)
    tersor.hadamard_transform(x)  # warm up outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = tersor.hadamard_transform(x)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(y.cpu().float(), tersor.hadamard_transform(x.cpu()).float(), rtol=2 ** -10, atol=1e-3)


@pytest.mark.cuda
def test_cuda_bad_size_raises():
    with pytest.raises(ValueError, match="supported sizes"):
        tersor.hadamard_transform(torch.randn(2, 7, device="cuda"))
