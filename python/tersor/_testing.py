"""Fakes for the test-only ops of ``tersor._C_testing`` (``torch.ops.tersor_testing``).

The testing extension holds the lane-by-lane CPU replays of the CUDA kernels, layout checks and ops with
fault injection. It is built when CMake's ``TERSOR_TESTING`` is on (development and CI, ``scripts/run.sh``)
and never ships in a release wheel; importing this module without it raises ImportError.
"""

from __future__ import annotations

import torch

from . import _C_testing  # noqa: F401  -- registers torch.ops.tersor_testing.*
from ._errors import CheckedOps
from .ops import _bsr_linear_fake, _sparse24_linear_fake_impl

#: ``torch.ops.tersor_testing`` whose C++ checks raise the Python error type they name (see tersor._errors).
lib = CheckedOps(torch.ops.tersor_testing)


@torch.library.register_fake("tersor_testing::_sparse24_emulate_cuda_linear")
def _sparse24_emulate_fake(x, values, meta, bias=None):
    return _sparse24_linear_fake_impl(x, values, meta, bias, "_sparse24_emulate_cuda_linear")


@torch.library.register_fake("tersor_testing::_sparse24_emulate_sm90_linear")
def _sparse24_emulate_sm90_fake(x, values, meta, bias=None, fault=0):
    return _sparse24_linear_fake_impl(x, values, meta, bias, "_sparse24_emulate_sm90_linear")


@torch.library.register_fake("tersor_testing::_sparse24_sm90_layout_check")
def _sparse24_sm90_layout_check_fake(fault=0):
    return torch.empty(2, dtype=torch.int64)


@torch.library.register_fake("tersor_testing::_bsr_emulate_cuda_linear")
def _bsr_emulate_cuda_linear_fake(x, crow_indices, col_indices, values, schedule, in_features, bias=None):
    y = _bsr_linear_fake(x, crow_indices, col_indices, values, schedule, in_features, bias)
    torch._check_type(x.dtype in (torch.float16, torch.bfloat16), lambda: "_bsr_emulate_cuda_linear: the "
                      f"tensor-core kernel takes float16 or bfloat16, got {x.dtype}")
    return y


@torch.library.register_fake("tersor_testing::_sage_float_to_e4m3")
def _sage_float_to_e4m3_fake(x):
    torch._check(x.dtype == torch.float32, lambda: "_sage_float_to_e4m3: expected float32")
    return x.new_empty(x.shape, dtype=torch.uint8)


@torch.library.register_fake("tersor_testing::_sage_e4m3_to_float")
def _sage_e4m3_to_float_fake(x):
    torch._check(x.dtype == torch.uint8, lambda: "_sage_e4m3_to_float: expected uint8")
    return x.new_empty(x.shape, dtype=torch.float32)


@torch.library.register_fake("tersor_testing::_sage_quantize_int")
def _sage_quantize_int_fake(x, inv_scale, bits):
    torch._check(x.dtype == torch.float32, lambda: "_sage_quantize_int: expected float32")
    return x.new_empty(x.shape, dtype=torch.int8)


# codec: the CPU replays of the CUDA decode and fused-GEMV kernels (header list: csrc/codec/codec_glue.h)
_CODEC_WIRE_DTYPES = {1: torch.float32, 2: torch.float16, 3: torch.bfloat16, 4: torch.float8_e4m3fn,
                      5: torch.float8_e5m2}


def _codec_emulate_header_fake(stream, table, header, op):
    torch._check(stream.dtype == torch.uint8 and stream.dim() == 1, lambda: f"{op}: stream must be 1-d uint8")
    torch._check(table.dtype == torch.int32 and table.shape == (4096,), lambda: f"{op}: bad decode table")
    torch._check(len(header) >= 13 and header[1] in _CODEC_WIRE_DTYPES and len(header) == 13 + header[12],
                 lambda: f"{op}: malformed header list")
    return _CODEC_WIRE_DTYPES[header[1]], list(header[13:])


@torch.library.register_fake("tersor_testing::_codec_emulate_cuda_decode")
def _codec_emulate_cuda_decode_fake(stream, table, header):
    dtype, shape = _codec_emulate_header_fake(stream, table, header, "_codec_emulate_cuda_decode")
    return stream.new_empty(shape, dtype=dtype)


@torch.library.register_fake("tersor_testing::_codec_emulate_cuda_linear")
def _codec_emulate_cuda_linear_fake(x, stream, table, header, bias=None):
    dtype, shape = _codec_emulate_header_fake(stream, table, header, "_codec_emulate_cuda_linear")
    torch._check(x.dim() == 2 and len(shape) == 2 and x.shape[1] == shape[1] and x.dtype == dtype,
                 lambda: "_codec_emulate_cuda_linear: x must be [B, K] of the weight's dtype")
    return x.new_empty((x.shape[0], shape[0]))
