"""One error contract for the public API (issue 17, item 4): ValueError for bad values and shapes, TypeError for
bad dtypes and argument types, NotImplementedError for modes a device does not support; never a bare
RuntimeError (or AttributeError, KeyError, ...) for a caller's mistake. Each row: a call with one bad input,
the exception type it must raise, and a pattern its message must contain (the argument's name, or what is
wrong with it). Rows are CPU-only; device mismatches need a GPU (marked cuda)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tersor
from tersor import attention, codec, ops, sparse
from tersor.sparse import bsr as B

X16 = torch.randn(2, 64).half()
W24 = sparse.prune_2_4(torch.randn(16, 64).half())
P24 = sparse.compress_2_4(W24)
BW = B.to_bsr(torch.randn(64, 64), 16)
CT = codec.compress(torch.randn(64, 64).bfloat16())
Q = torch.randn(1, 2, 8, 64).half()
E8P_STATE = tersor.quant.quantize_e8p(torch.randn(32, 64, generator=torch.Generator().manual_seed(0)), 2)
AQLM_CODES = torch.randint(-128, 127, (32, 8, 2), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
AQLM_BOOKS, AQLM_SCALES = torch.randn(2, 256, 1, 8).half(), torch.ones(32, 1, 1, 1).half()


def _e8p(**change):
    return tersor.nn.E8PLinear({k: v for k, v in {**E8P_STATE, **change}.items() if v is not None})


def _aqlm(codes=AQLM_CODES, books=AQLM_BOOKS, scales=AQLM_SCALES, bias=None):
    return tersor.nn.AQLMLinear(codes, books, scales, bias)

# id: (call, exception type, message pattern)
CASES = {
    # ops (through tersor.ops: the C++ checks' types, and the dispatcher's schema check mapped to TypeError)
    "hadamard/x-dtype": (lambda: ops.hadamard_transform(torch.ones(4, 8, dtype=torch.int32)), TypeError, "int32"),
    "hadamard/x-size": (lambda: ops.hadamard_transform(torch.ones(4, 7)), ValueError, "n=7"),
    "hadamard/scale-type": (lambda: ops.hadamard_transform(torch.ones(4, 8), scale="a"), TypeError, "scale"),
    "hadamard/x-not-tensor": (lambda: ops.hadamard_transform([1.0, 2.0]), TypeError, "argument 'x'"),
    # codec
    "codec.compress/dtype": (lambda: codec.compress(torch.ones(4, dtype=torch.int32)), TypeError, "dtype"),
    "codec.compress/not-tensor": (lambda: codec.compress([1.0]), TypeError, "tensor"),
    "codec.compress/chunk_elems": (lambda: codec.compress(torch.ones(64), chunk_elems=-1), ValueError, "chunk_elems"),
    "codec.decompress/type": (lambda: codec.decompress("x"), TypeError, "CompressedTensor"),
    "codec.from_bytes/garbage": (lambda: codec.CompressedTensor.from_bytes(torch.zeros(100, dtype=torch.uint8)),
                                 ValueError, "magic"),
    "codec.from_bytes/dtype": (lambda: codec.CompressedTensor.from_bytes(torch.zeros(100)), TypeError, "uint8"),
    "codec.linear_path/rows": (lambda: codec.linear_path(CT, -1), ValueError, "rows"),
    "CompressedLinear/weight": (lambda: tersor.nn.CompressedLinear("x"), TypeError, "weight"),
    "CompressedLinear/bias-shape": (lambda: tersor.nn.CompressedLinear(CT, torch.randn(3).bfloat16()), ValueError,
                                    "bias"),
    "CompressedLinear/bias-dtype": (lambda: tersor.nn.CompressedLinear(CT, torch.randn(64)), TypeError, "bias"),
    "CompressedLinear/x-features": (lambda: tersor.nn.CompressedLinear(CT)(torch.randn(2, 32).bfloat16()),
                                    ValueError, "features"),
    "CompressedLinear/x-dtype": (lambda: tersor.nn.CompressedLinear(CT)(torch.randn(2, 64)), TypeError, "x must be"),
    # 2:4
    "prune_2_4/method": (lambda: sparse.prune_2_4(W24, "x"), ValueError, "method"),
    "compress_2_4/dtype": (lambda: sparse.compress_2_4(torch.zeros(16, 64, dtype=torch.float64)), TypeError,
                           "weight must be"),
    "compress_2_4/not-2:4": (lambda: sparse.compress_2_4(torch.ones(16, 64).half()), ValueError, "not 2:4"),
    "load_2_4/meta-dtype": (lambda: sparse.load_2_4(P24.values, P24.meta.long()), TypeError, "meta"),
    "linear_2_4/x-dtype": (lambda: sparse.linear_2_4(torch.randn(2, 64), P24), TypeError, "x must have"),
    "linear_2_4/x-shape": (lambda: sparse.linear_2_4(torch.randn(2, 32).half(), P24), ValueError, "in_features"),
    "linear_2_4/path": (lambda: sparse.linear_2_4(X16, P24, path="nope"), ValueError, "path"),
    "SparseLinear/pattern": (lambda: tersor.nn.SparseLinear(64, 16, pattern="3:4"), ValueError, "pattern"),
    "SparseLinear/in_features": (lambda: tersor.nn.SparseLinear(-1, 16), ValueError, "in_features"),
    "SparseLinear/values_dtype": (lambda: tersor.nn.SparseLinear(64, 16, dtype=torch.half,
                                                                 values_dtype=torch.bfloat16), TypeError, "values_dtype"),
    # BSR
    "to_bsr/blocksize": (lambda: B.to_bsr(torch.randn(64, 64), 24), ValueError, "blocksize"),
    "to_bsr/dtype": (lambda: B.to_bsr(torch.ones(64, 64, dtype=torch.int32), 16), TypeError, "W must be"),
    "to_bsr/shape": (lambda: B.to_bsr(torch.ones(64), 16), ValueError, "2-d"),
    "bsr_linear/x-dtype": (lambda: B.bsr_linear(torch.randn(2, 64).half(), BW), TypeError, "dtype"),
    "bsr_linear/x-shape": (lambda: B.bsr_linear(torch.randn(2, 32), BW), ValueError, "x must be"),
    "bsr_linear/bias": (lambda: B.bsr_linear(torch.randn(2, 64), BW, torch.randn(3)), ValueError, "bias"),
    "load_bsr/format": (lambda: B.load_bsr({"format": "x"}), ValueError, "format"),
    "load_bsr/type": (lambda: B.load_bsr(3), TypeError, "state"),
    "load_bsr/missing": (lambda: B.load_bsr({"format": "tersor.bsr", "version": 1}), ValueError, "shape"),
    "prune_blocks/density": (lambda: B.prune_blocks(torch.randn(64, 64), 16, 1.5), ValueError, "density"),
    # E8P (QuIP#'s layout; issue 19: the layout and the Hadamard convention are declared, Qidxs is int64)
    "E8PLinear/state": (lambda: tersor.nn.E8PLinear(3), TypeError, "state"),
    "E8PLinear/Qidxs-dtype": (lambda: _e8p(Qidxs=E8P_STATE["Qidxs"].int()), TypeError, "Qidxs"),
    "E8PLinear/codebook_id": (lambda: _e8p(codebook_id=None), ValueError, "codebook_id"),
    "E8PLinear/SU-length": (lambda: _e8p(SU=E8P_STATE["SU"][:32]), ValueError, "SU"),
    "E8PLinear/Wscale-rows": (lambda: _e8p(Wscale=torch.ones(32)), ValueError, "Wscale"),
    "E8PLinear/hadamard": (lambda: tersor.nn.E8PLinear(E8P_STATE, hadamard="x"), ValueError, "hadamard"),
    "E8PLinear/x-features": (lambda: _e8p()(torch.randn(2, 32)), ValueError, "features"),
    "dequantize_e8p/Qidxs-dtype": (lambda: tersor.quant.dequantize_e8p({**E8P_STATE, "Qidxs": E8P_STATE["Qidxs"].float()}),
                                   TypeError, "Qidxs"),
    "e8p_linear/in_features": (lambda: ops.e8p_linear(torch.randn(2, 64), E8P_STATE["Qidxs"], 48), ValueError,
                               "in_features"),
    # AQLM (issue 19: int32/int64 codes with a range check; the layer copies what it is given)
    "AQLMLinear/codes-dtype": (lambda: _aqlm(codes=AQLM_CODES.float()), TypeError, "codes"),
    "AQLMLinear/codes-range": (lambda: _aqlm(codes=AQLM_CODES.long() + 1000), ValueError, "codes"),
    "AQLMLinear/codebooks": (lambda: _aqlm(books=AQLM_BOOKS[..., :4]), ValueError, "codebooks"),
    "AQLMLinear/scales": (lambda: _aqlm(scales=AQLM_SCALES[:3]), ValueError, "scales"),
    "AQLMLinear/bias": (lambda: _aqlm(bias=torch.randn(3)), ValueError, "bias"),
    "AQLMLinear/x-features": (lambda: _aqlm()(torch.randn(2, 32)), ValueError, "features"),
    "AQLMLinear.from_aqlm/object": (lambda: tersor.nn.AQLMLinear.from_aqlm(3), TypeError, "codes"),
    "aqlm_linear/x-dtype": (lambda: ops.aqlm_linear(torch.randn(2, 64).int(), AQLM_CODES, AQLM_BOOKS, AQLM_SCALES),
                            TypeError, "x must be"),
    # attention
    "sage_attention/dtype": (lambda: attention.sage_attention(Q.float(), Q.float(), Q.float()), TypeError, "float16"),
    "sage_attention/head-dim": (lambda: attention.sage_attention(Q, Q[..., :32], Q), ValueError, "head dim"),
    "sage_attention/qk": (lambda: attention.sage_attention(Q, Q, Q, qk="int3"), ValueError, "qk"),
    "sage_attention/devices": (lambda: attention.sage_attention(Q, Q.to("meta"), Q), ValueError, "one device"),
    "sage_attention/no-kernel": (lambda: attention.sage_attention(Q.to("meta"), Q.to("meta"), Q.to("meta")),
                                 NotImplementedError, "meta"),
    "sageattn/layout": (lambda: attention.sageattn(Q, Q, Q, tensor_layout="X"), ValueError, "tensor_layout"),
    # model API
    "quantize_/model": (lambda: tersor.quantize_(3, tersor.LosslessConfig()), TypeError, "model"),
    "quantize_/config": (lambda: tersor.quantize_(nn.Linear(4, 4), 3), TypeError, "config"),
    "quantize_/needs-data": (lambda: tersor.quantize_(nn.Sequential(nn.Linear(64, 64)), tersor.E8PConfig(2)),
                             ValueError, "calibration"),
    "E8PConfig/bits": (lambda: tersor.E8PConfig(bits=5), ValueError, "bits"),
    "AQLMConfig/nbits": (lambda: tersor.AQLMConfig(2, 20), ValueError, "nbits"),
    "BlockSparseConfig/density": (lambda: tersor.BlockSparseConfig(16, 2.0), ValueError, "density"),
    "Sparse24Config/method": (lambda: tersor.Sparse24Config("x"), ValueError, "method"),
    "Sparse24Config/compact": (lambda: tersor.Sparse24Config(compact="yes"), TypeError, "compact"),
    "save/model": (lambda: tersor.save(3, "/tmp/tersor-error-contract"), TypeError, "model"),
    "load/directory": (lambda: tersor.load(nn.Linear(4, 4), "/tmp/tersor-no-such-dir"), ValueError, "not found"),
    "from_pretrained/directory": (lambda: tersor.from_pretrained("/tmp/tersor-no-such-dir"), ValueError, "not found"),
    "dequantize_/model": (lambda: tersor.dequantize_(3), TypeError, "model"),
    "dequantize_/dtype": (lambda: tersor.dequantize_(nn.Linear(4, 4), torch.int8), TypeError, "dtype"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_public_api_error_contract(case):
    call, exc, pattern = CASES[case]
    with pytest.raises(Exception) as info:
        call()
    # exactly the contract's type (a RuntimeError subclass such as NotImplementedError counts as itself)
    assert isinstance(info.value, exc), f"{case}: {type(info.value).__name__}: {info.value}"
    assert type(info.value) is not RuntimeError
    assert pattern.lower() in str(info.value).lower(), f"{case}: message {str(info.value)!r} does not name {pattern!r}"


def test_schema_type_errors_become_type_errors_only_for_tersor_ops():
    # The mapping is narrow: torch's own RuntimeErrors from other ops pass through unchanged.
    from tersor._errors import translate

    assert isinstance(translate(RuntimeError("tersor::x() Expected a value of type 'Tensor' for argument 'x'")),
                      TypeError)
    assert translate(RuntimeError("aten::mm() Expected a value of type 'Tensor' for argument 'x'")) is None
    assert translate(RuntimeError("CUDA error: an illegal memory access")) is None


@pytest.mark.cuda
@pytest.mark.parametrize("which", ["sparse24", "bsr", "codec"])
def test_device_mismatch_is_a_value_error(which):
    # x on the GPU, the weight on the CPU (or the reverse): a caller's mistake, ValueError naming the devices.
    with pytest.raises(ValueError, match="cuda|cpu"):
        if which == "sparse24":
            ops.lib.sparse24_linear(X16.cuda(), P24.values, P24.meta, None, "auto")
        elif which == "bsr":
            B.bsr_linear(torch.randn(2, 64).cuda(), BW)
        else:
            ops.lib.codec_decode(CT.stream.cuda(), CT.table, CT.header, CT.dtype, list(CT.shape), False)
