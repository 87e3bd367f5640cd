"""The codebook ops (E8P12 / AQLM decode and linear): CPU against independent references, the CPU replay of
the CUDA E8P GEMV's fragment code (tersor._C_testing), bad inputs, the CUDA routing table for every compute
capability, and (with a GPU) CUDA against CPU."""

import hashlib

import numpy as np
import pytest
import torch

from tersor import ops
from tersor.quant import quipsharp
from tersor.quant.e8p12 import e8p12_decode

cuda = pytest.mark.cuda
needs_testing_ext = pytest.mark.testing_ext


def _testing_lib():
    """torch.ops.tersor_testing with tersor's error types (tests marked testing_ext only)."""
    import tersor._testing

    return tersor._testing.lib

QUIPSHARP_PACKED_ABS_SHA256 = "efc2c03c60acd955dc812ff2bade9ec6cc31259807e48473506161f3a9a230ce"


def random_qidxs(m, n, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    cols = {2: n // 32, 3: 3 * n // 64, 4: n // 16}[bits]
    return torch.randint(-(2**63), 2**63 - 1, (m, cols), generator=g, dtype=torch.int64)


def reference_w_hat(qidxs, n, resid_scale=None):
    """W^ from the pure-PyTorch decoder (tersor.quant), with an optional residual-scale override."""
    if resid_scale is None:
        return quipsharp.decode_qidxs(qidxs, n)
    bits = quipsharp.qidxs_bits(qidxs, n)
    m = qidxs.shape[0]
    d1 = e8p12_decode(quipsharp.unpack_qidxs_e8p(qidxs[:, : n // 32])).reshape(m, n)
    if bits == 4:
        d2 = e8p12_decode(quipsharp.unpack_qidxs_e8p(qidxs[:, n // 32:])).reshape(m, n)
    else:
        d2 = quipsharp.E81B[quipsharp._unpack_e81b(qidxs[:, n // 32:])].reshape(m, n)
    return d1 + d2 / resid_scale


# ----------------------------------------------------------------------------------------------- E8P


@needs_testing_ext
def test_packed_abs_table_is_quipsharps():
    t = torch.ops.tersor_testing._e8p_packed_abs_table()
    assert t.dtype == torch.int32 and t.shape == (256,)
    assert hashlib.sha256(t.numpy().astype("<i4").tobytes()).hexdigest() == QUIPSHARP_PACKED_ABS_SHA256


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("m,n", [(16, 64), (32, 192), (48, 384), (16, 1024)])
def test_e8p_decode_bit_exact_vs_reference(bits, m, n):
    # Random words exercise every abs index, sign pattern and E81B code; n = 64 and 192 put a row
    # boundary inside a 32-word block of QuIP#'s tiling (the stage cursor's wrap-around).
    q = random_qidxs(m, n, bits, seed=bits * 1000 + n)
    got = ops.e8p_decode(q, n)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    assert torch.equal(got, reference_w_hat(q, n))


@pytest.mark.parametrize("bits", [3, 4])
def test_e8p_decode_resid_scale_override(bits):
    q = random_qidxs(32, 128, bits, seed=5)
    assert torch.equal(ops.e8p_decode(q, 128, resid_scale=2.5), reference_w_hat(q, 128, 2.5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_e8p_decode_rounds_once(dtype):
    q = random_qidxs(16, 128, 4, seed=9)
    assert torch.equal(ops.e8p_decode(q, 128, dtype=dtype), ops.e8p_decode(q, 128).to(dtype))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("batch", [1, 2, 3, 4, 5, 8, 13, 16, 17, 40])
def test_e8p_linear_vs_matmul(bits, batch):
    m, n = 48, 320  # n/32 = 10: rows of QuIP#'s tiling straddle the 32-word blocks
    q = random_qidxs(m, n, bits, seed=batch)
    x = torch.randn(batch, n, dtype=torch.float64).float()
    w = reference_w_hat(q, n).double()
    got = ops.e8p_linear(x, q, n)
    assert got.dtype == torch.float32 and got.shape == (batch, m)
    ref = x.double() @ w.t()
    # fp32 accumulation over n terms of size <= ~3.3 |x|: a few ulps of the row's absolute sum.
    bound = 4 * n * 2.0**-24 * (x.double().abs() @ w.abs().t())
    assert ((got.double() - ref).abs() <= bound + 1e-30).all()


def test_e8p_linear_leading_dims_and_dtypes():
    q = random_qidxs(32, 128, 2)
    x = torch.randn(2, 3, 128)
    ref = ops.e8p_linear(x.reshape(6, 128), q, 128).reshape(2, 3, 32)
    torch.testing.assert_close(ops.e8p_linear(x, q, 128), ref)
    for dt in (torch.float16, torch.bfloat16):
        xd = x.to(dt)
        torch.testing.assert_close(ops.e8p_linear(xd, q, 128), ops.e8p_linear(xd.float(), q, 128))
    assert ops.e8p_linear(torch.randn(0, 128), q, 128).shape == (0, 32)


@needs_testing_ext
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("m,n,batch", [(16, 64, 1), (32, 192, 3), (48, 640, 8), (64, 1024, 5)])
def test_cuda_gemv_replay_matches_reference(bits, m, n, batch):
    # The CUDA kernel's fragment mapping (A from the packed words through the fp16 bit trick, B from x,
    # C back to rows) and warp split, replayed on the CPU: any layout slip gives a wrong product.
    q = random_qidxs(m, n, bits, seed=m + n + bits)
    x = torch.randn(batch, n)
    got = torch.ops.tersor_testing._e8p_emulate_cuda_linear(x, q, n)
    w = reference_w_hat(q, n).double()
    ref = x.half().double() @ w.t()  # the kernel multiplies fp16 x
    bound = 4 * n * 2.0**-24 * (x.half().double().abs() @ w.abs().t())
    assert ((got.double() - ref).abs() <= bound + 1e-30).all()


@needs_testing_ext
def test_cuda_gemv_replay_rejects_big_batch():
    with pytest.raises(ValueError, match=r"x must be \[1\.\.8"):
        _testing_lib()._e8p_emulate_cuda_linear(torch.randn(9, 64), random_qidxs(16, 64, 2), 64)


@pytest.mark.parametrize(
    "qidxs,n,err,match",
    [
        (torch.zeros(16, 2, dtype=torch.int32), 64, TypeError, "must be int64"),
        (torch.zeros(16, 2, 1, dtype=torch.int64), 64, ValueError, "must be 2-d"),
        (torch.zeros(16, 3, dtype=torch.int64), 96, ValueError, "multiple of 64"),
        (torch.zeros(8, 2, dtype=torch.int64), 64, ValueError, "multiple of 16"),
        (torch.zeros(16, 5, dtype=torch.int64), 64, ValueError, "words per row"),
        (torch.zeros(16, 2, dtype=torch.int64), 0, ValueError, "multiple of 64"),
    ],
)
@pytest.mark.parametrize("which", ["decode", "linear"])
def test_e8p_bad_inputs(qidxs, n, err, match, which):
    with pytest.raises(err, match=match):
        if which == "decode":
            ops.e8p_decode(qidxs, n)
        else:
            ops.e8p_linear(torch.randn(1, max(n, 1)), qidxs, n)


def test_e8p_bad_x_and_scale():
    q = random_qidxs(16, 64, 4)
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., 64\]"):
        ops.e8p_linear(torch.randn(2, 32), q, 64)
    with pytest.raises(TypeError, match="x must be float32"):
        ops.e8p_linear(torch.ones(2, 64, dtype=torch.int32), q, 64)
    with pytest.raises(ValueError, match="resid_scale must be positive"):
        ops.e8p_decode(q, 64, resid_scale=-1.0)
    with pytest.raises(TypeError, match="dtype must be"):
        ops.e8p_decode(q, 64, dtype=torch.int32)


# ---------------------------------------------------------------------------------------------- AQLM


def aqlm_numpy_reference(codes, codebooks, scales):
    """Independent reference: loops in numpy over rows and groups, fp32 sums in codebook order."""
    c = codes.numpy().astype(np.int64)
    books = codebooks.float().numpy()
    s = scales.float().numpy().reshape(-1)
    nbits = int(np.log2(books.shape[1]))
    out, groups, nc = c.shape
    w = np.zeros((out, groups * 8), dtype=np.float32)
    for o in range(out):
        for j in range(groups):
            acc = np.zeros(8, dtype=np.float32)
            for k in range(nc):
                acc = acc + books[k, c[o, j, k] % (1 << nbits), 0, :]
            w[o, 8 * j: 8 * j + 8] = acc * np.float32(s[o])
    return torch.from_numpy(w)


def aqlm_random(out, inp, books, nbits, cb_dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ct = torch.int8 if nbits <= 8 else torch.int16
    codes = torch.randint(-(1 << (ct.itemsize * 8 - 1)), 1 << (ct.itemsize * 8 - 1), (out, inp // 8, books), generator=g).to(ct)
    codebooks = torch.randn(books, 1 << nbits, 1, 8, generator=g).to(cb_dtype)
    scales = (torch.rand(out, 1, 1, 1, generator=g) + 0.25).to(cb_dtype)
    return codes, codebooks, scales


@pytest.mark.parametrize("books,nbits", [(1, 16), (2, 8), (1, 8), (4, 8), (1, 12), (2, 5)])
@pytest.mark.parametrize("cb_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_aqlm_decode_vs_numpy(books, nbits, cb_dtype):
    # Codes span the whole storage range (int16 codes of a 12-bit codebook included): index = code mod 2^b.
    codes, cb, sc = aqlm_random(12, 64, books, nbits, cb_dtype, seed=books * 31 + nbits)
    ref = aqlm_numpy_reference(codes, cb, sc)
    assert torch.equal(ops.aqlm_decode(codes, cb, sc, torch.float32), ref)
    assert ops.aqlm_decode(codes, cb, sc).dtype == cb_dtype
    assert torch.equal(ops.aqlm_decode(codes, cb, sc), ref.to(cb_dtype))


@pytest.mark.parametrize("books,nbits", [(1, 16), (2, 8), (3, 8)])
@pytest.mark.parametrize("batch", [1, 3, 8, 16, 17])
@pytest.mark.parametrize("with_bias", [False, True])
def test_aqlm_linear_vs_matmul(books, nbits, batch, with_bias):
    codes, cb, sc = aqlm_random(40, 128, books, nbits, seed=batch)
    w = aqlm_numpy_reference(codes, cb, sc).double()
    x = torch.randn(batch, 128)
    bias = torch.randn(40) if with_bias else None
    got = ops.aqlm_linear(x, codes, cb, sc, bias)
    ref = x.double() @ w.t() + (bias.double() if with_bias else 0)
    bound = 8 * 128 * 2.0**-24 * (x.double().abs() @ w.abs().t() + (bias.double().abs() if with_bias else 0))
    assert got.dtype == torch.float32 and got.shape == (batch, 40)
    assert ((got.double() - ref).abs() <= bound + 1e-30).all()


def test_aqlm_linear_output_dtype():
    codes, cb, sc = aqlm_random(16, 64, 2, 8)
    for dt in (torch.float16, torch.bfloat16):
        x = torch.randn(2, 5, 64).to(dt)
        y = ops.aqlm_linear(x, codes, cb, sc)
        assert y.dtype == dt and y.shape == (2, 5, 16)
        torch.testing.assert_close(y, ops.aqlm_linear(x.float(), codes, cb, sc).to(dt))


def test_aqlm_bad_inputs():
    codes, cb, sc = aqlm_random(16, 64, 2, 8)
    with pytest.raises(TypeError, match="codes must be int8"):
        ops.aqlm_decode(codes.int(), cb, sc)
    with pytest.raises(TypeError, match="codebooks must be"):
        ops.aqlm_decode(codes, cb.to(torch.int16), sc)
    with pytest.raises(ValueError, match="out_group_size 1 and in_group_size 8"):
        ops.aqlm_decode(codes, cb.reshape(2, 256, 2, 4), sc)
    with pytest.raises(ValueError, match="codebook columns"):
        ops.aqlm_decode(codes[:, :, :1].contiguous(), cb, sc)
    with pytest.raises(TypeError, match="stored as int16"):
        ops.aqlm_decode(codes, torch.zeros(2, 1024, 1, 8, dtype=torch.float16), sc)
    with pytest.raises(ValueError, match="power of two"):
        ops.aqlm_decode(codes, cb[:, :200].contiguous(), sc)
    with pytest.raises(ValueError, match="scales must be"):
        ops.aqlm_decode(codes, cb, sc[:8])
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., 64\]"):
        ops.aqlm_linear(torch.randn(2, 32), codes, cb, sc)
    with pytest.raises(ValueError, match="bias must be"):
        ops.aqlm_linear(torch.randn(2, 64), codes, cb, sc, torch.randn(3))


def test_direct_torch_ops_call_states_the_error_kind():
    # Through the stable ABI a direct torch.ops call raises RuntimeError; its message starts with the Python
    # type the check means (tersor.ops.lib re-raises it as that type).
    with pytest.raises(RuntimeError) as e:
        torch.ops.tersor.e8p_decode(torch.zeros(16, 5, dtype=torch.int64), 64)
    assert str(e.value).startswith("ValueError: e8p_decode: Qidxs has 5 words per row")
    codes, cb, sc = aqlm_random(16, 64, 2, 8)
    with pytest.raises(RuntimeError) as e:
        torch.ops.tersor.aqlm_linear(torch.randn(2, 32), codes, cb, sc)
    assert str(e.value).startswith("ValueError: aqlm_linear: x must be [..., 64]")
    with pytest.raises(RuntimeError) as e:
        torch.ops.tersor.aqlm_decode(codes.int(), cb, sc)
    assert str(e.value).startswith("TypeError: aqlm_decode: codes must be int8")


# ------------------------------------------------------------------------------------- CUDA routing

ROUTE_CCS = [80, 86, 89, 90, 100, 120]


@pytest.mark.parametrize("cc", ROUTE_CCS)
def test_codebook_route_every_arch(cc):
    # The glue's one routing function, asked on the CPU: the fused GEMVs for <= 8 rows of x, decode + a
    # cuBLAS matmul beyond, the same on every architecture the kernels support.
    route = ops.codebook_cuda_path
    assert route("e8p_decode", cc) == "e8p_decode"
    assert route("aqlm_decode", cc) == "aqlm_decode"
    for rows in (1, 2, 5, 8):
        assert route("e8p_linear", cc, rows) == "e8p_gemv_mma"
        assert route("aqlm_linear", cc, rows, 2 * 256) == "aqlm_gemv_smem"  # 2x8: 16 KiB of fp32 codebooks
        assert route("aqlm_linear", cc, rows, 1024) == "aqlm_gemv_smem"
        assert route("aqlm_linear", cc, rows, 1025) == "aqlm_gemv_l2"
        assert route("aqlm_linear", cc, rows, 1 << 16) == "aqlm_gemv_l2"  # 1x16: 2 MiB, through L2
    for rows in (9, 16, 64, 4096):
        assert route("e8p_linear", cc, rows) == "e8p_decode+mm_fp32out"
        assert route("aqlm_linear", cc, rows, 2 * 256) == "aqlm_decode+linear"
        assert route("aqlm_linear", cc, rows, 1 << 16) == "aqlm_decode+linear"
    assert route("e8p_linear", cc, 0) == "empty"
    assert route("aqlm_linear", cc, 0, 512) == "empty"


@pytest.mark.parametrize("cc", [50, 61, 70, 75])
@pytest.mark.parametrize("op", ["e8p_decode", "e8p_linear", "aqlm_decode", "aqlm_linear"])
def test_codebook_route_pre_ampere_not_implemented(cc, op):
    # No codebook kernel exists below sm80 (mma.sync m16n8k16): NotImplementedError, never a host fallback.
    with pytest.raises(NotImplementedError, match=rf"{op}: no CUDA kernel for compute capability "
                                                  rf"{cc // 10}\.{cc % 10}.*8\.0 or newer"):
        ops.codebook_cuda_path(op, cc, 1, 512)
    with pytest.raises(RuntimeError, match=r"^NotImplementedError: "):
        torch.ops.tersor._codebook_route(op, cc, 1, 512)


def test_codebook_route_bad_arguments():
    with pytest.raises(ValueError, match="unknown op 'e8p_gemm'"):
        ops.codebook_cuda_path("e8p_gemm", 90)
    with pytest.raises(ValueError, match="rows must be >= 0"):
        ops.codebook_cuda_path("e8p_linear", 90, -1)
    with pytest.raises(ValueError, match="cc must be"):
        ops.codebook_cuda_path("e8p_linear", 9)


@cuda
def test_cuda_route_of_this_device():
    dev = torch.device("cuda")
    major, minor = torch.cuda.get_device_capability(dev)
    assert ops.codebook_cuda_path("e8p_linear", dev, 1) == ops.codebook_cuda_path("e8p_linear", 10 * major + minor, 1)


# ---------------------------------------------------------------------------------------------- CUDA


@cuda
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_e8p_decode_bit_exact(bits, dtype):
    q = random_qidxs(64, 320, bits, seed=bits)
    assert torch.equal(ops.e8p_decode(q.cuda(), 320, dtype=dtype).cpu(), ops.e8p_decode(q, 320, dtype=dtype))


@cuda
@needs_testing_ext
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("m,n,batch", [(16, 64, 1), (48, 640, 3), (256, 1024, 8), (128, 4096, 1)])
def test_cuda_e8p_linear_vs_replay(bits, m, n, batch):
    q = random_qidxs(m, n, bits, seed=n + batch)
    x = torch.randn(batch, n)
    got = ops.e8p_linear(x.cuda(), q.cuda(), n).cpu()
    replay = torch.ops.tersor_testing._e8p_emulate_cuda_linear(x, q, n)
    w = reference_w_hat(q, n).double()
    bound = 4 * n * 2.0**-24 * (x.half().double().abs() @ w.abs().t())
    assert ((got.double() - replay.double()).abs() <= 2 * bound + 1e-30).all()


@cuda
@pytest.mark.parametrize("bits", [2, 4])
def test_cuda_e8p_linear_large_batch(bits):
    q = random_qidxs(64, 256, bits)
    x = torch.randn(33, 256)
    got = ops.e8p_linear(x.cuda(), q.cuda(), 256).cpu()
    ref = x.half().float() @ ops.e8p_decode(q, 256, dtype=torch.float16).float().t()
    torch.testing.assert_close(got, ref, rtol=2e-3, atol=2e-3)


@cuda
@pytest.mark.parametrize("books,nbits", [(1, 16), (2, 8), (1, 12)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_aqlm_decode_bit_exact(books, nbits, dtype):
    codes, cb, sc = aqlm_random(64, 128, books, nbits, seed=nbits)
    got = ops.aqlm_decode(codes.cuda(), cb.cuda(), sc.cuda(), dtype).cpu()
    assert torch.equal(got, ops.aqlm_decode(codes, cb, sc, dtype))


@cuda
@pytest.mark.parametrize("books,nbits", [(1, 16), (2, 8)])
@pytest.mark.parametrize("batch", [1, 4, 8, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_aqlm_linear_vs_cpu(books, nbits, batch, dtype):
    codes, cb, sc = aqlm_random(96, 512, books, nbits, seed=batch)
    x, bias = torch.randn(batch, 512).to(dtype), torch.randn(96).to(dtype)
    got = ops.aqlm_linear(x.cuda(), codes.cuda(), cb.cuda(), sc.cuda(), bias.cuda()).cpu()
    ref = ops.aqlm_linear(x.float(), codes, cb, sc, bias.float())
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(got.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())
