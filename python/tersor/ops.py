"""Typed wrappers and fake (meta) kernels for every ``torch.ops.tersor`` operator.

Contract (docs/ops.md): each op's schema lives in csrc/ops.cpp; CPU and CUDA kernels register next to
their sources; the fake kernel below makes the op traceable by ``torch.compile(fullgraph=True)`` and
capturable in CUDA graphs. A fake must compute exactly the output metadata (shape, dtype, strides,
device) of the real kernels and reject the same bad inputs.
"""

from __future__ import annotations

import math
import operator
from typing import Optional

import torch

from ._errors import CheckedOps

#: ``torch.ops.tersor`` whose C++ checks raise the Python error type they name (ValueError, TypeError,
#: NotImplementedError; see tersor._errors). Every wrapper below calls its op through it.
lib = CheckedOps(torch.ops.tersor)
_lib = lib


def build_info() -> dict:
    """Facts about the compiled extension: ``version``, ``cuda`` (``"0"``/``"1"``), ``cuda_archs``."""
    return dict(item.split("=", 1) for item in _lib._build_info().split(";"))


# ---------------------------------------------------------------------------------------------------
# hadamard

HADAMARD_K_SIZES: tuple[int, ...] = tuple(_lib._hadamard_k_sizes())
HADAMARD_MAX_POW2 = 1 << 15


def hadamard_factor(n: int) -> tuple[int, int]:
    """``(K, log2 m)`` with ``n = K * m`` (``K == 1`` for powers of two); ``ValueError`` if unsupported."""
    k, log_n = _lib._hadamard_factor(n)
    return int(k), int(log_n)


def _hadamard_size_ok(n: int) -> bool:
    # Pure-Python twin of factor_size (hadamard_plan.h) for the fake kernel, which must not call
    # other operators; tests/test_hadamard.py checks that both agree on every n up to 2**17.
    for k in (1,) + HADAMARD_K_SIZES:
        if n >= k and n % k == 0:
            m = n // k
            if m & (m - 1) == 0 and m <= HADAMARD_MAX_POW2:
                return True
    return False


def hadamard_transform(x: torch.Tensor, scale: Optional[float] = None, transpose: bool = False) -> torch.Tensor:
    """Walsh-Hadamard transform over the last dimension: ``y = scale * x @ H.T``.

    ``n = x.shape[-1]`` must be ``2^k`` (``n <= 32768``, Sylvester/natural order) or ``K * 2^k`` with ``K`` in
    ``HADAMARD_K_SIZES`` and ``2^k <= 32768``, where ``H = H_K (x) H_{2^k}`` (the sub-row transform is
    applied to ``x.view(..., K, 2^k)`` along its last axis, then the K x K matrix mixes the sub-rows).
    ``scale`` defaults to ``1/sqrt(n)``, making the transform orthonormal. ``transpose=True`` applies
    ``H.T`` instead of ``H`` (identical for powers of two; for ``K > 1`` it inverts the orthonormal
    transform). Accepts float32/float16/bfloat16, any leading shape and strides; computes in fp32 and
    returns a contiguous tensor of ``x``'s dtype.
    """
    return _lib.hadamard_transform(x, scale, transpose)


@torch.library.register_fake("tersor::hadamard_transform")
def _hadamard_transform_fake(x, scale=None, transpose=False):
    torch._check(x.dim() >= 1, lambda: "hadamard_transform: expected a tensor with at least one dimension")
    torch._check(
        x.dtype in (torch.float32, torch.float16, torch.bfloat16),
        lambda: f"hadamard_transform: expected float32, float16 or bfloat16, got {x.dtype}",
    )
    n = x.shape[-1]
    if isinstance(n, int):  # a symbolic size is checked by the real kernel
        if not _hadamard_size_ok(n):
            raise ValueError(
                f"hadamard_transform: unsupported size n={n} of the last dimension; supported sizes are "
                f"n = 2^k (1 <= n <= {HADAMARD_MAX_POW2}) or n = K * 2^k with 2^k <= {HADAMARD_MAX_POW2} and K in "
                "{" + ", ".join(map(str, HADAMARD_K_SIZES)) + "}"
            )
    if scale is not None:
        torch._check(math.isfinite(scale), lambda: f"hadamard_transform: scale must be finite, got {scale}")
    return x.new_empty(x.shape)


def _hadamard_backward(ctx, grad):
    # y = scale * H x is linear, so dL/dx = scale * H^T dL/dy: the same op with transpose flipped.
    return _lib.hadamard_transform(grad, ctx.scale, not ctx.transpose), None, None


def _hadamard_setup_context(ctx, inputs, output):
    _, scale, transpose = inputs
    ctx.scale = scale
    ctx.transpose = transpose


torch.library.register_autograd(
    "tersor::hadamard_transform", _hadamard_backward, setup_context=_hadamard_setup_context
)


# ---------------------------------------------------------------------------------------------------
# codec (the user-facing API is tersor.codec; these are the fakes of its two tensor ops)

_CODEC_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2)


def _codec_check_fake(stream, table, header, dtype, shape, op):
    torch._check(stream.dtype == torch.uint8 and stream.dim() == 1, lambda: f"{op}: stream must be 1-d uint8")
    torch._check(table.dtype == torch.int32 and table.shape == (4096,), lambda: f"{op}: bad decode table")
    torch._check(dtype in _CODEC_DTYPES, lambda: f"{op}: unsupported dtype {dtype}")
    torch._check(len(header) >= 13 and len(shape) == header[12], lambda: f"{op}: shape does not match the stream")


@torch.library.register_fake("tersor::codec_decode")
def _codec_decode_fake(stream, table, header, dtype, shape, verify=True):
    _codec_check_fake(stream, table, header, dtype, shape, "codec_decode")
    return stream.new_empty(shape, dtype=dtype)


@torch.library.register_fake("tersor::codec_linear")
def _codec_linear_fake(x, stream, table, header, dtype, shape, bias=None):
    _codec_check_fake(stream, table, header, dtype, shape, "codec_linear")
    torch._check(len(shape) == 2, lambda: "codec_linear: the compressed weight must be 2-d")
    torch._check(x.dtype == dtype, lambda: f"codec_linear: x is {x.dtype}, the weight is {dtype}")
    torch._check(x.dim() >= 1 and x.shape[-1] == shape[1], lambda: "codec_linear: feature size mismatch")
    return x.new_empty((*x.shape[:-1], shape[0]))


# ---------------------------------------------------------------------------------------------------
# codebook: QuIP# E8P12 and AQLM (user-facing: tersor.quant, tersor.nn.E8PLinear / AQLMLinear)

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _e8p_bits_fake(qidxs, in_features, op):
    torch._check(qidxs.dtype == torch.int64 and qidxs.dim() == 2, lambda: f"{op}: Qidxs must be 2-d int64")
    n = in_features
    torch._check(n > 0 and n % 64 == 0, lambda: f"{op}: in_features must be a positive multiple of 64, got {n}")
    torch._check(qidxs.shape[0] % 16 == 0, lambda: f"{op}: out_features must be a multiple of 16")
    w = qidxs.shape[1]
    torch._check(w in (n // 32, 3 * n // 64, n // 16), lambda: f"{op}: Qidxs width {w} does not fit in_features {n}")


def _int64_arg(v, name: str, op: str) -> int:
    """An int argument of an op schema: TypeError unless an integer, ValueError outside int64 (which the
    dispatcher would report as a bare RuntimeError)."""
    try:
        v = operator.index(v)
    except TypeError:
        raise TypeError(f"{op}: {name} must be an int, got {type(v).__name__}") from None
    if not -(2**63) <= v < 2**63:
        raise ValueError(f"{op}: {name} = {v} is outside int64")
    return v


def e8p_decode(qidxs: torch.Tensor, in_features: int, resid_scale: Optional[float] = None,
               dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``W^ [m, n]``: the E8P12 codebook values of QuIP#-layout ``Qidxs`` (2, 3 or 4 bits, by its width),
    ``D1 + D2 / resid_scale`` in fp32 rounded once to ``dtype`` (default float32); bit-identical on CPU
    and CUDA."""
    return _lib.e8p_decode(qidxs, _int64_arg(in_features, "in_features", "e8p_decode"), resid_scale, dtype)


def e8p_linear(x: torch.Tensor, qidxs: torch.Tensor, in_features: int,
               resid_scale: Optional[float] = None) -> torch.Tensor:
    """``x @ W^.T`` in float32 for ``x [..., n]`` (fp32 accumulation; the CUDA kernel multiplies x rounded
    to fp16 on the tensor cores, as QuIP# does)."""
    return _lib.e8p_linear(x, qidxs, _int64_arg(in_features, "in_features", "e8p_linear"), resid_scale)


@torch.library.register_fake("tersor::e8p_decode")
def _e8p_decode_fake(qidxs, in_features, resid_scale=None, dtype=None):
    _e8p_bits_fake(qidxs, in_features, "e8p_decode")
    dt = torch.float32 if dtype is None else dtype
    torch._check(dt in _FLOATS, lambda: f"e8p_decode: dtype must be float32, float16 or bfloat16, got {dt}")
    return qidxs.new_empty((qidxs.shape[0], in_features), dtype=dt)


@torch.library.register_fake("tersor::e8p_linear")
def _e8p_linear_fake(x, qidxs, in_features, resid_scale=None):
    _e8p_bits_fake(qidxs, in_features, "e8p_linear")
    torch._check(x.dtype in _FLOATS, lambda: f"e8p_linear: x must be float32, float16 or bfloat16, got {x.dtype}")
    torch._check(x.dim() >= 1 and x.shape[-1] == in_features, lambda: "e8p_linear: x's last dim must be in_features")
    return x.new_empty((*x.shape[:-1], qidxs.shape[0]), dtype=torch.float32)


def aqlm_decode(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The AQLM weight ``[out, in]`` (out_group 1, in_group 8): ``scales * sum_c codebooks[c][code_c mod 2^b]``
    in fp32, rounded once to ``dtype`` (default: the codebooks' dtype); bit-identical on CPU and CUDA."""
    return _lib.aqlm_decode(codes, codebooks, scales, dtype)


def aqlm_linear(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ W.T + bias`` in ``x``'s dtype with fp32 accumulation, W the AQLM weight (see :func:`aqlm_decode`)."""
    return _lib.aqlm_linear(x, codes, codebooks, scales, bias)


def _aqlm_check_fake(codes, codebooks, scales, op):
    torch._check(codes.dtype in (torch.int8, torch.int16) and codes.dim() == 3, lambda: f"{op}: bad codes")
    torch._check(codebooks.dtype in _FLOATS and codebooks.dim() == 4, lambda: f"{op}: bad codebooks")
    torch._check(codebooks.shape[2] == 1 and codebooks.shape[3] == 8, lambda: f"{op}: group size must be 1x8")
    torch._check(codes.shape[2] == codebooks.shape[0], lambda: f"{op}: codebook count mismatch")
    torch._check(scales.numel() == codes.shape[0], lambda: f"{op}: scales must be [out, 1, 1, 1]")


@torch.library.register_fake("tersor::aqlm_decode")
def _aqlm_decode_fake(codes, codebooks, scales, dtype=None):
    _aqlm_check_fake(codes, codebooks, scales, "aqlm_decode")
    dt = codebooks.dtype if dtype is None else dtype
    torch._check(dt in _FLOATS, lambda: f"aqlm_decode: dtype must be float32, float16 or bfloat16, got {dt}")
    return codes.new_empty((codes.shape[0], codes.shape[1] * 8), dtype=dt)


@torch.library.register_fake("tersor::aqlm_linear")
def _aqlm_linear_fake(x, codes, codebooks, scales, bias=None):
    _aqlm_check_fake(codes, codebooks, scales, "aqlm_linear")
    torch._check(x.dtype in _FLOATS, lambda: f"aqlm_linear: x must be float32, float16 or bfloat16, got {x.dtype}")
    torch._check(x.dim() >= 1 and x.shape[-1] == codes.shape[1] * 8, lambda: "aqlm_linear: x's last dim must be in_features")
    return x.new_empty((*x.shape[:-1], codes.shape[0]))


# Backward of the two codebook GEMMs (issue 18: fine-tuning the continuous parameters of compressed layers).
# The codes are integers and stay fixed; every gradient is formed from the decoded weight with the existing
# decode ops (tersor::e8p_decode / tersor::aqlm_decode, CPU and CUDA), so the forward keeps its fused kernels
# and the backward costs one decode plus two dense matmuls. They are the gradients of the exact math
# (on CUDA, e8p_linear's fp16 rounding of x is passed straight through).


def _e8p_linear_setup_context(ctx, inputs, output):
    x, qidxs, in_features, resid_scale = inputs
    ctx.save_for_backward(qidxs)
    ctx.in_features, ctx.resid_scale, ctx.x_dtype = in_features, resid_scale, x.dtype


def _e8p_linear_backward(ctx, grad):
    # z = x @ W^.T, W^ [m, n] fixed: dz/dx = grad @ W^
    (qidxs,) = ctx.saved_tensors
    gx = None
    if ctx.needs_input_grad[0]:
        w = _lib.e8p_decode(qidxs, ctx.in_features, ctx.resid_scale, None)
        gx = (grad.float() @ w).to(ctx.x_dtype)
    return gx, None, None, None


torch.library.register_autograd("tersor::e8p_linear", _e8p_linear_backward, setup_context=_e8p_linear_setup_context)


def _aqlm_linear_setup_context(ctx, inputs, output):
    x, codes, codebooks, scales, bias = inputs
    ctx.save_for_backward(x, codes, codebooks, scales)
    ctx.bias_dtype = None if bias is None else bias.dtype


def aqlm_grad_codebooks(codes: torch.Tensor, grad_w: torch.Tensor, entries: int) -> torch.Tensor:
    """``dL/dcodebooks`` [C, entries, 1, 8] (fp32) of ``W[o, 8j:8j+8] = sum_c codebooks[c][codes[o, j, c]]`` for
    ``dL/dW`` = ``grad_w`` [out, in] (the scales already applied): for each codebook, the sum of the gradient
    of every group that uses an entry (a scatter-add over the codes, taken mod ``entries`` as AQLM does)."""
    out, groups, ncb = codes.shape
    g = grad_w.float().reshape(out * groups, 8)
    res = torch.zeros(ncb, entries, 8, dtype=torch.float32, device=grad_w.device)
    for c in range(ncb):
        idx = codes[:, :, c].reshape(-1).to(torch.int64) & (entries - 1)
        res[c].index_add_(0, idx, g)
    return res.reshape(ncb, entries, 1, 8)


def _aqlm_linear_backward(ctx, grad):
    # y = x W^T + b with W = scales[o] * U[o], U[o, 8j:8j+8] = sum_c codebooks[c][codes[o, j, c]]
    x, codes, codebooks, scales = ctx.saved_tensors
    # (needs_input_grad has no entry for a bias passed as None)
    need_x, _, need_cb, need_s, need_b = (tuple(ctx.needs_input_grad) + (False,))[:5]
    out, n = codes.shape[0], codes.shape[1] * 8
    g = grad.float().reshape(-1, out)
    gx = gcb = gs = gb = None
    # one decode: U with unit scales, then W = U * scales. Bit-identical to aqlm_decode(..., scales): the
    # kernels compute each weight as (fp32 codebook sum) * (fp32 scale), one rounding (csrc/codebook/aqlm_cpu.cpp)
    u = _lib.aqlm_decode(codes, codebooks, torch.ones_like(scales), torch.float32) if need_x or need_s else None
    if need_x:
        w = u * scales.float().reshape(out, 1)
        gx = (g @ w).reshape(x.shape).to(x.dtype)
    if need_cb or need_s:
        gw = g.t() @ x.float().reshape(-1, n)  # dL/dW [out, in]
        if need_s:
            gs = (gw * u).sum(1).reshape(scales.shape).to(scales.dtype)
        if need_cb:
            gcb = aqlm_grad_codebooks(codes, gw * scales.float().reshape(out, 1), codebooks.shape[1])
            gcb = gcb.to(codebooks.dtype)
    if need_b and ctx.bias_dtype is not None:
        gb = g.sum(0).to(ctx.bias_dtype)
    return (gx, None, gcb, gs, gb)[:len(ctx.needs_input_grad)]


torch.library.register_autograd("tersor::aqlm_linear", _aqlm_linear_backward, setup_context=_aqlm_linear_setup_context)


def codebook_cuda_path(op: str, device_or_cc, rows: int = 1, codebook_entries: int = 0) -> str:
    """The CUDA kernel path ``op`` (``"e8p_decode"``, ``"e8p_linear"``, ``"aqlm_decode"``, ``"aqlm_linear"``)
    takes for ``rows`` rows of x (AQLM: ``codebook_entries`` = num_codebooks * 2^nbits) on a CUDA device or a
    compute capability ``10 * major + minor``: the glue's own routing function (``_codebook_route``), e.g.
    ``"e8p_gemv_mma"`` or ``"aqlm_decode+linear"``. NotImplementedError where that architecture has no
    codebook kernel (compute capability < 8.0)."""
    if isinstance(device_or_cc, int):
        cc = device_or_cc
    else:
        major, minor = torch.cuda.get_device_capability(torch.device(device_or_cc))
        cc = 10 * major + minor
    return _lib._codebook_route(op, cc, rows, codebook_entries)


# ---------------------------------------------------------------------------------------------------
# 2:4 semi-structured sparsity (format v1, docs/formats.md; user API: tersor.sparse, tersor.nn.SparseLinear)

_SPARSE24_DTYPES = (torch.float16, torch.bfloat16)
#: float32 2:4 weights are CPU-only (the sparse tensor-core MMA takes 16-bit operands for 2:4).
_SPARSE24_CPU_DTYPES = _SPARSE24_DTYPES + (torch.float32,)


def _sparse24_dtypes(device: torch.device) -> tuple:
    return _SPARSE24_CPU_DTYPES if device.type == "cpu" else _SPARSE24_DTYPES


def sparse24_compress(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packs a dense 2:4 weight ``[M, K]`` (float16/bfloat16; float32 on the CPU only, ``M % 16 == 0``, ``K % 64 == 0``, at most 2
    non-zeros in every 4 consecutive entries along K) into format v1 ``(values [M/16, K/32, 256],
    meta [M/16, K/64, 32] int32)``. A weight that is not 2:4 raises ``ValueError`` naming the first bad
    chunk. CPU and CUDA give identical bytes; the CUDA kernel synchronizes to report a bad weight."""
    return _lib.sparse24_compress(weight)


def sparse24_decompress(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """The dense weight ``[M, K]`` of a format v1 pair (zeros at pruned positions); bit-exact on CPU and CUDA
    (float32 values: CPU only)."""
    return _lib.sparse24_decompress(values, meta)


#: Values of sparse24_linear's ``path`` argument: "auto" (the routing rule) or one forced CUDA kernel.
SPARSE24_PATHS = ("auto", "gemv", "gemm", "sm90")
#: Most rows of x the ``mma.sp`` GEMV takes (Sparse24GemvTraits::kMaxBatch), so ``path="gemv"`` beyond is a ValueError.
SPARSE24_GEMV_MAX_ROWS = 16


def sparse24_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                    bias: Optional[torch.Tensor] = None, path: str = "auto") -> torch.Tensor:
    """``x @ W.T + bias`` for a format v1 2:4 weight ``W [M, K]``, ``x [..., K]`` of W's dtype; fp32
    accumulation, rounded once. float32 weights run on the CPU only (no operand rounding: the product of
    ``F.linear`` with the dense pruned weight, up to fp32 summation order). CUDA: the ``mma.sp`` GEMV for at most 16 rows of x, the tiled
    ``cp.async`` ``mma.sp`` GEMM beyond, on compute capability 9.0 (sm90a build) the ``wgmma.sp`` GEMM from
    128 rows (:func:`sparse24_route` says which). ``path`` (one of ``SPARSE24_PATHS``) forces one CUDA
    kernel: ``"gemv"`` for more than 16 rows is a ``ValueError`` (on every device), a kernel the GPU cannot run
    a ``NotImplementedError`` naming the paths it can. The CPU checks ``path`` and computes the same product.
    (It is not called ``kernel``: inductor's fallback lowering of custom ops reserves that keyword.)"""
    return _lib.sparse24_linear(x, values, meta, bias, path)


def sparse24_route(cc: int, rows: int, path: str = "auto", has_sm90_cubin: Optional[bool] = None) -> str:
    """The CUDA kernel (``"gemv"``, ``"gemm"`` or ``"sm90"``) :func:`sparse24_linear` runs for ``rows`` rows of x
    and ``path`` on a GPU of compute capability ``cc`` (``10 * major + minor``), from the C++ routing table
    itself (csrc/sparse/sparse24_route.h). ``has_sm90_cubin`` defaults to this build's. Raises what the op
    would raise there (``ValueError``, ``NotImplementedError``)."""
    return _lib._sparse24_route(cc, rows, path, has_sm90_cubin)


def _sparse24_shape_fake(values, meta, op):
    torch._check(values.dtype in _sparse24_dtypes(values.device),
                 lambda: f"{op}: values must be float16 or bfloat16 (float32 on the CPU), got {values.dtype}")
    torch._check(meta.dtype == torch.int32, lambda: f"{op}: meta must be int32, got {meta.dtype}")
    torch._check(values.dim() == 3 and values.shape[2] == 256, lambda: f"{op}: values must be [M/16, K/32, 256]")
    torch._check(meta.dim() == 3 and meta.shape[2] == 32, lambda: f"{op}: meta must be [M/16, K/64, 32]")
    torch._check(values.shape[0] > 0 and values.shape[1] > 0 and values.shape[1] % 2 == 0,
                 lambda: f"{op}: values must hold whole 16-row blocks and K % 64 == 0")
    torch._check(meta.shape[0] == values.shape[0] and meta.shape[1] * 2 == values.shape[1],
                 lambda: f"{op}: meta shape does not match values shape")
    return values.shape[0] * 16, values.shape[1] * 32


@torch.library.register_fake("tersor::sparse24_compress")
def _sparse24_compress_fake(weight):
    torch._check(weight.dtype in _sparse24_dtypes(weight.device),
                 lambda: f"sparse24_compress: weight must be float16 or bfloat16 (float32 on the CPU), got {weight.dtype}")
    torch._check(weight.dim() == 2, lambda: "sparse24_compress: weight must be 2-d")
    m, k = weight.shape
    torch._check(m > 0 and m % 16 == 0 and k > 0 and k % 64 == 0,
                 lambda: "sparse24_compress: weight [M, K] needs M % 16 == 0 and K % 64 == 0")
    return (weight.new_empty((m // 16, k // 32, 256)),
            weight.new_empty((m // 16, k // 64, 32), dtype=torch.int32))


@torch.library.register_fake("tersor::sparse24_decompress")
def _sparse24_decompress_fake(values, meta):
    m, k = _sparse24_shape_fake(values, meta, "sparse24_decompress")
    return values.new_empty((m, k))


def _sparse24_linear_fake_impl(x, values, meta, bias, op):
    m, k = _sparse24_shape_fake(values, meta, op)
    torch._check(x.dtype == values.dtype, lambda: f"{op}: x must have the weight's dtype {values.dtype}, got {x.dtype}")
    torch._check(x.dim() >= 1 and x.shape[-1] == k, lambda: f"{op}: x's last dim must be in_features = {k}")
    if bias is not None:
        torch._check(bias.dtype == values.dtype, lambda: f"{op}: bias must have the weight's dtype")
        torch._check(bias.dim() == 1 and bias.shape[0] == m, lambda: f"{op}: bias must be [out_features = {m}]")
    return x.new_empty((*x.shape[:-1], m))


@torch.library.register_fake("tersor::sparse24_linear")
def _sparse24_linear_fake(x, values, meta, bias=None, path="auto"):
    op = "sparse24_linear"
    y = _sparse24_linear_fake_impl(x, values, meta, bias, op)
    torch._check_value(path in SPARSE24_PATHS, lambda: f"{op}: path must be auto, gemv, gemm or sm90, got '{path}'")
    if path == "gemv":
        rows = x.numel() // x.shape[-1]
        torch._check_value(rows <= SPARSE24_GEMV_MAX_ROWS, lambda: f"{op}: path='gemv' takes at most "
                           f"{SPARSE24_GEMV_MAX_ROWS} rows of x, got {rows}")
    return y


# ---------------------------------------------------------------------------------------------------
# block-sparse: BSR weights (user-facing: tersor.sparse.to_bsr / BSRWeight / bsr_linear)

_BSR_BLOCKSIZES = (16, 32, 64)


def _bsr_split_items(schedule_numel, mb):
    # Twin of bsr_split_items_from_numel (csrc/sparse/bsr_format.h): -1 when the length fits no schedule.
    rest = schedule_numel - (4 * mb + mb + 1)
    return -1 if rest < 0 or rest % 4 else rest // 4


@torch.library.register_fake("tersor::bsr_linear")
def _bsr_linear_fake(x, crow_indices, col_indices, values, schedule, in_features, bias=None):
    op = "bsr_linear"
    torch._check_type(x.dtype in _FLOATS, lambda: f"{op}: x must be float32, float16 or bfloat16, got {x.dtype}")
    torch._check_type(values.dtype == x.dtype, lambda: f"{op}: values ({values.dtype}) must have x's dtype ({x.dtype})")
    for t in (crow_indices, col_indices, schedule):
        torch._check_type(t.dtype == torch.int32, lambda: f"{op}: index tensors must be int32, got {t.dtype}")
        torch._check_value(t.dim() == 1, lambda: f"{op}: index tensors must be 1-d")
    torch._check_value(values.dim() == 3 and values.shape[1] == values.shape[2],
                       lambda: f"{op}: values must be [nnz_blocks, bs, bs]")
    bs = values.shape[1]
    torch._check_value(bs in _BSR_BLOCKSIZES, lambda: f"{op}: blocksize must be 16, 32 or 64, got {bs}")
    torch._check_value(col_indices.shape[0] == values.shape[0], lambda: f"{op}: col_indices / values mismatch")
    torch._check_value(crow_indices.shape[0] >= 2, lambda: f"{op}: crow_indices needs at least 2 entries")
    mb = crow_indices.shape[0] - 1
    torch._check_value(in_features > 0 and in_features % bs == 0,
                       lambda: f"{op}: in_features must be a positive multiple of the blocksize")
    torch._check_value(_bsr_split_items(schedule.shape[0], mb) >= 0, lambda: f"{op}: schedule length fits no schedule")
    torch._check_value(x.dim() >= 1 and x.shape[-1] == in_features, lambda: f"{op}: x must be [..., {in_features}]")
    if bias is not None:
        torch._check_type(bias.dtype == x.dtype, lambda: f"{op}: bias must have x's dtype")
        torch._check_value(bias.dim() == 1 and bias.shape[0] == mb * bs, lambda: f"{op}: bias must be [{mb * bs}]")
    return x.new_empty((*x.shape[:-1], mb * bs))


# ---------------------------------------------------------------------------------------------------
# attention (SageAttention2-style quantized attention; user API: tersor.attention.sage_attention)

SAGE_HEAD_DIMS = (64, 128, 256)
SAGE_PV_MODES = ("fp8", "fp16", "fp32")
#: Values of ``sage_attention_fwd``'s ``kernel`` argument (the schema's ``cuda_kernel``): ``"auto"`` (the sm90a
#: wgmma kernel where it applies, else the mma.sync kernels), ``"sm8x"`` (the mma.sync kernels only), ``"sm90"``
#: (the sm90a wgmma kernel only).
SAGE_KERNELS = ("auto", "sm8x", "sm90")
#: Block-mask granularity of ``sage_attention_fwd`` (csrc/attention/sage_format.h ``kSparseBlockQ/K``): 128
#: query rows (one CTA of every kernel) by 128 keys (two sm8x tiles, one sm90a stage).
SAGE_BLOCK_Q = 128
SAGE_BLOCK_K = 128


def sage_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool, scale: float,
                       qk_bits: int, pv: str, smooth_k: bool, smooth_q: bool,
                       kernel: str = "auto", block_mask: Optional[torch.Tensor] = None,
                       window_left: int = -1, window_right: int = -1,
                       key_padding_mask: Optional[torch.Tensor] = None,
                       attn_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantized attention on ``bhsd`` tensors; returns ``(out, lse)``.

    ``q [B, Hq, Lq, D]``, ``k``/``v [B, Hkv, Lk, D]`` with ``Hq % Hkv == 0`` and ``D`` in ``SAGE_HEAD_DIMS``,
    float16/bfloat16 (float32 too in the exact mode). ``out`` has q's dtype, ``lse`` is float32
    ``[B, Hq, Lq]`` (natural log of the softmax denominator of ``scale * q.k``; ``-inf`` for a fully masked
    row, whose output is 0). ``is_causal`` is bottom-right aligned: key ``j`` is visible to query ``i`` iff
    ``j <= i + Lk - Lq`` (FlashAttention / KV-cache convention; SDPA is top-left, the same when Lq == Lk).
    ``qk_bits``: 8 or 4 (symmetric per-fragment-group INT8/INT4 Q and K), 0 (fp32 scores). ``pv``: "fp8"
    (e4m3 P and per-channel e4m3 V, two-level accumulation), "fp16" (P and V in the inputs' 16-bit dtype)
    or "fp32". ``smooth_k``/``smooth_q``: subtract K's token mean / each 32-row block's Q mean before
    quantizing (exactly compensated). ``qk_bits=0, pv="fp32"`` computes in fp64 (the exact reference mode).

    ``kernel`` (``SAGE_KERNELS``; the op schema calls it ``cuda_kernel``, as inductor reserves ``kernel``)
    chooses the CUDA kernel; the CPU (the twin of every kernel's numerics) checks it and ignores it. On
    CUDA a mode without a kernel on the device raises ``NotImplementedError`` naming the modes the device
    supports (:func:`sage_route`): ``qk_bits=0`` and ``pv="fp32"`` never have one (CPU only), INT4 has none
    on compute capability 9.0+, FP8 P.V none before 8.9. There is no CPU fallback. Most callers want :func:`tersor.attention.sage_attention`.

    ``block_mask``: optional bool ``[B, Hq or 1, ceil(Lq / SAGE_BLOCK_Q), ceil(Lk / SAGE_BLOCK_K)]``; where
    false, the query block sees none of the key block's keys, and the kernels skip its tiles entirely.

    ``window_left``/``window_right``: FlashAttention's sliding window (query ``i``, at key position
    ``p = i + Lk - Lq``, sees keys ``p - window_left .. p + window_right``; a negative side is unbounded);
    composes with ``is_causal`` and ``block_mask`` (a key must pass all). The kernels walk only the key
    tiles the window reaches.

    ``key_padding_mask``: optional bool ``[B, Lk]``; a false key is padding, hidden from every query of its batch
    entry (transformers' ``attention_mask`` convention, the opposite of ``nn.MultiheadAttention``'s). Composes
    with all of the above; a row left with no key gives 0 and LSE ``-inf``.

    ``attn_mask``: any other mask, CPU only (``NotImplementedError`` on CUDA): bool (False hides the key) or
    float (added to the scores), 4-d ``[B or 1, Hq or 1, Lq, Lk]``.
    """
    return _lib.sage_attention_fwd(q, k, v, is_causal, scale, qk_bits, pv, smooth_k, smooth_q, kernel, block_mask,
                                   window_left, window_right, key_padding_mask, attn_mask)


def sage_attention_varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                              cu_seqlens_k: torch.Tensor, is_causal: bool, scale: float, qk_bits: int, pv: str,
                              smooth_k: bool, smooth_q: bool, kernel: str = "auto", window_left: int = -1,
                              window_right: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Varlen (packed) quantized attention in one call: ``q [total_q, Hq, D]``, ``k``/``v [total_k, Hkv, D]``,
    ``cu_seqlens_q``/``cu_seqlens_k`` int32/int64 ``[n_seq + 1]`` rising from 0 to the totals. Returns
    ``(out [total_q, Hq, D], lse float32 [Hq, total_q])``. The numerics are :func:`sage_attention_fwd`'s on the
    packed tensors taken as one sequence in which each row sees only its own sequence's keys (``is_causal``
    bottom-right and the window inside each sequence): K smoothing over all packed keys, quantization groups of
    the packed rows. The CPU checks the offsets' values; the CUDA op does not read them on the host (no sync;
    the kernels clamp every key range to the tensor): :func:`tersor.attention.sage_attention_varlen` checks them."""
    return _lib.sage_attention_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, is_causal, scale, qk_bits, pv,
                                          smooth_k, smooth_q, kernel, window_left, window_right)


def sage_route(cc: int, qk_bits: int, pv: str, smooth_q: bool, kernel: str = "auto") -> str:
    """The CUDA kernel ``sage_attention_fwd`` runs for these modes on a device of compute capability ``cc``
    (``10 * major + minor``) in this build: ``"sm8x-mma"`` or ``"sm90a-wgmma"``. Raises ``NotImplementedError``
    (naming what ``cc`` supports) where the call would, ``ValueError`` for a bad ``qk_bits``/``pv``/``kernel``.
    The table itself is csrc/attention/sage_route.h."""
    return _lib._sage_route(int(cc), int(qk_bits), pv, bool(smooth_q), kernel)


def _sage_check_fake(q, k, v, scale, qk_bits, pv, kernel="auto"):
    op = "sage_attention_fwd"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{op}: q, k, v must be 4-d [batch, heads, seq, head_dim], got {q.dim()}-d, {k.dim()}-d, "
                         f"{v.dim()}-d")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{op}: q, k, v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if qk_bits not in (0, 4, 8):
        raise ValueError(f"{op}: qk_bits must be 0, 4 or 8, got {qk_bits}")
    if pv not in SAGE_PV_MODES:
        raise ValueError(f"{op}: pv must be \"fp8\", \"fp16\" or \"fp32\", got \"{pv}\"")
    exact = qk_bits == 0 and pv == "fp32"
    allowed = (torch.float16, torch.bfloat16, torch.float32) if exact else (torch.float16, torch.bfloat16)
    if q.dtype not in allowed:
        raise TypeError(f"{op}: expected float16 or bfloat16 (float32 only in the exact mode), got {q.dtype}")
    torch._check(k.shape == v.shape, lambda: f"{op}: k and v must have the same shape")
    torch._check(k.shape[0] == q.shape[0], lambda: f"{op}: batch of k/v differs from q")
    torch._check(k.shape[3] == q.shape[3], lambda: f"{op}: head_dim of k/v differs from q")
    d, hq, hkv = q.shape[3], q.shape[1], k.shape[1]
    if isinstance(d, int) and d not in SAGE_HEAD_DIMS:
        raise ValueError(f"{op}: head_dim must be 64, 128 or 256, got {d}")
    if isinstance(hq, int) and isinstance(hkv, int) and (hkv < 1 or hq % hkv != 0):
        raise ValueError(f"{op}: query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    torch._check(k.shape[2] >= 1, lambda: f"{op}: needs at least one key")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"{op}: scale must be finite and positive, got {scale}")
    if kernel not in SAGE_KERNELS:
        raise ValueError(f"{op}: kernel must be \"auto\", \"sm8x\" or \"sm90\", got \"{kernel}\"")


def _sage_check_key_padding_fake(q, k, key_padding_mask):
    op = "sage_attention_fwd"
    if key_padding_mask.dtype != torch.bool:
        raise TypeError(f"{op}: key_padding_mask must be bool, got {key_padding_mask.dtype}")
    if key_padding_mask.dim() != 2:
        raise ValueError(f"{op}: key_padding_mask must be 2-d [B, Lk], got {key_padding_mask.dim()}-d")
    torch._check(key_padding_mask.shape[0] == q.shape[0], lambda: f"{op}: key_padding_mask batch differs from q")
    torch._check(key_padding_mask.shape[1] == k.shape[2], lambda: f"{op}: key_padding_mask must have Lk keys")


def _sage_check_block_mask_fake(q, k, block_mask):
    op = "sage_attention_fwd"
    if block_mask.dtype != torch.bool:
        raise TypeError(f"{op}: block_mask must be bool, got {block_mask.dtype}")
    if block_mask.dim() != 4:
        raise ValueError(f"{op}: block_mask must be 4-d [B, Hq or 1, q_blocks, k_blocks], got {block_mask.dim()}-d")
    b, hq, lq, _ = q.shape
    lk = k.shape[2]
    torch._check(block_mask.shape[0] == b, lambda: f"{op}: block_mask batch differs from q")
    torch._check(block_mask.shape[2] == (lq + SAGE_BLOCK_Q - 1) // SAGE_BLOCK_Q,
                 lambda: f"{op}: block_mask must have ceil(Lq / {SAGE_BLOCK_Q}) query blocks")
    torch._check(block_mask.shape[3] == (lk + SAGE_BLOCK_K - 1) // SAGE_BLOCK_K,
                 lambda: f"{op}: block_mask must have ceil(Lk / {SAGE_BLOCK_K}) key blocks")
    hm = block_mask.shape[1]
    if isinstance(hm, int) and isinstance(hq, int) and hm not in (1, hq):
        raise ValueError(f"{op}: block_mask must have 1 or {hq} heads, got {hm}")


def xattention_mask(q: torch.Tensor, k: torch.Tensor, block_size: int, stride: int, threshold: float,
                    is_causal: bool, scale: float, qk: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """XAttention block selection: ``(mask bool, mass float32)``, both ``[B, Hq, ceil(Lq / block_size),
    ceil(Lk / block_size)]``; ``qk`` ``"none"`` (exact scores) or ``"int8"`` (INT8 reduced rows). The algorithm:
    docs/research/xattention.md; most callers want :func:`tersor.attention.xattention_mask`."""
    return _lib.xattention_mask(q, k, int(block_size), int(stride), float(threshold), bool(is_causal), float(scale),
                                qk)


@torch.library.register_fake("tersor::xattention_mask")
def _xattention_mask_fake(q, k, block_size, stride, threshold, is_causal, scale, qk="none"):
    op = "xattention_mask"
    if qk not in ("none", "int8"):
        raise ValueError(f"{op}: qk must be \"none\" or \"int8\", got \"{qk}\"")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"{op}: q and k must be 4-d [batch, heads, seq, head_dim], got {q.dim()}-d and {k.dim()}-d")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{op}: expected float16, bfloat16 or float32, got {q.dtype}")
    if k.dtype != q.dtype:
        raise TypeError(f"{op}: q and k must have the same dtype, got {q.dtype} and {k.dtype}")
    torch._check(k.shape[0] == q.shape[0], lambda: f"{op}: batch of k differs from q")
    torch._check(k.shape[3] == q.shape[3], lambda: f"{op}: head_dim of k differs from q")
    hq, hkv = q.shape[1], k.shape[1]
    if isinstance(hq, int) and isinstance(hkv, int) and (hkv < 1 or hq % hkv != 0):
        raise ValueError(f"{op}: query heads ({hq}) must be a multiple of key heads ({hkv})")
    torch._check(k.shape[2] >= 1, lambda: f"{op}: needs at least one key")
    if stride < 1:
        raise ValueError(f"{op}: stride must be >= 1, got {stride}")
    if block_size < stride or block_size % stride != 0:
        raise ValueError(f"{op}: block_size must be a positive multiple of stride, got block_size {block_size}, "
                         f"stride {stride}")
    if not 0 < threshold <= 1:
        raise ValueError(f"{op}: threshold must be in (0, 1], got {threshold}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"{op}: scale must be finite and positive, got {scale}")
    shape = (q.shape[0], hq, (q.shape[2] + block_size - 1) // block_size, (k.shape[2] + block_size - 1) // block_size)
    return q.new_empty(shape, dtype=torch.bool), q.new_empty(shape, dtype=torch.float32)


@torch.library.register_fake("tersor::sage_attention_varlen_fwd")
def _sage_attention_varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, is_causal, scale, qk_bits, pv, smooth_k,
                                    smooth_q, cuda_kernel="auto", window_left=-1, window_right=-1):
    op = "sage_attention_varlen_fwd"
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"{op}: q, k, v must be packed 3-d [total, heads, head_dim]")
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{op}: {name} must be int32 or int64, got {t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"{op}: {name} must be 1-d [n_seq + 1]")
    _sage_check_fake(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], scale, qk_bits, pv,
                     cuda_kernel)
    total, hq, d = q.shape
    return q.new_empty((total, hq, d)), q.new_empty((hq, total), dtype=torch.float32)


@torch.library.register_fake("tersor::sage_attention_fwd")
def _sage_attention_fwd_fake(q, k, v, is_causal, scale, qk_bits, pv, smooth_k, smooth_q, cuda_kernel="auto",
                             block_mask=None, window_left=-1, window_right=-1, key_padding_mask=None,
                             attn_mask=None):
    # The NotImplementedError of a mode without a CUDA kernel depends on the device's compute capability and is
    # raised by the real kernel only.
    _sage_check_fake(q, k, v, scale, qk_bits, pv, cuda_kernel)
    if block_mask is not None:
        _sage_check_block_mask_fake(q, k, block_mask)
    if key_padding_mask is not None:
        _sage_check_key_padding_fake(q, k, key_padding_mask)
    b, hq, lq, d = q.shape
    out = q.new_empty((b, hq, lq, d))
    lse = q.new_empty((b, hq, lq), dtype=torch.float32)
    return out, lse


# ---------------------------------------------------------------------------------------------------
# attention: quantized paged KV cache and decode (user API: tersor.attention.PagedKVCache, sage_decode)

PAGED_HEAD_DIMS = (64, 128, 256)
DECODE_MAX_Q = 16


def paged_kv_append_(k_codes: torch.Tensor, k_scale: torch.Tensor, v_codes: torch.Tensor, page_meta: torch.Tensor,
                     k: torch.Tensor, v: torch.Tensor, block_table: torch.Tensor, start: torch.Tensor,
                     lengths: torch.Tensor) -> None:
    """Quantizes tokens ``t < lengths[b]`` of ``k``/``v [B, L, Hkv, D]`` into the cache at positions
    ``start[b] + t`` of sequence ``b`` (pages from ``block_table``; int32 indices), in place. docs/formats.md,
    "Paged KV cache v1", has the layout and the page-statistics rule. Most callers want
    :meth:`tersor.attention.PagedKVCache.append`."""
    _lib.paged_kv_append_(k_codes, k_scale, v_codes, page_meta, k, v, block_table, start, lengths)


def sage_decode_paged(q: torch.Tensor, k_codes: torch.Tensor, k_scale: torch.Tensor, v_codes: torch.Tensor,
                      page_meta: torch.Tensor, block_table: torch.Tensor, seqlens: torch.Tensor, scale: float,
                      window_left: int = -1, window_right: int = -1,
                      num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of ``q [B, Lq, Hq, D]`` (the last ``Lq <= 16`` tokens of each sequence) over a
    quantized paged cache; returns ``(out [B, Lq, Hq, D], lse float32 [B, Hq, Lq])``. ``num_workers > 0``:
    split-KV over that many work items (paged_format.h, ``decode_split_quota``); -1: automatic (CUDA: the
    planner for the device's SM count; CPU: one pass). Most callers want
    :func:`tersor.attention.sage_decode`."""
    return _lib.sage_decode_paged(q, k_codes, k_scale, v_codes, page_meta, block_table, seqlens, scale,
                                  window_left, window_right, num_workers)


@torch.library.register_fake("tersor::paged_kv_append_")
def _paged_kv_append_fake(k_codes, k_scale, v_codes, page_meta, k, v, block_table, start, lengths):
    op = "paged_kv_append_"
    if k_codes.dtype != torch.int8 or v_codes.dtype != torch.uint8:
        raise TypeError(f"{op}: k_codes must be int8 and v_codes uint8, got {k_codes.dtype} and {v_codes.dtype}")
    if k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{op}: k and v must be [batch, len, heads_kv, head_dim]")
    return None


@torch.library.register_fake("tersor::sage_decode_paged")
def _sage_decode_paged_fake(q, k_codes, k_scale, v_codes, page_meta, block_table, seqlens, scale, window_left=-1,
                            window_right=-1, num_workers=0):
    op = "sage_decode_paged"
    if q.dim() != 4:
        raise ValueError(f"{op}: q must be [batch, len_q, heads_q, head_dim], got {q.dim()}-d")
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"{op}: q must be float16 or bfloat16, got {q.dtype}")
    b, lq, hq, d = q.shape
    torch._check(lq <= DECODE_MAX_Q, lambda: f"{op}: len_q must be <= {DECODE_MAX_Q}")
    torch._check(d == k_codes.shape[3], lambda: f"{op}: q's head_dim differs from the cache's")
    return q.new_empty((b, lq, hq, d)), q.new_empty((b, hq, lq), dtype=torch.float32)
