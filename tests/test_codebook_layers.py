"""tersor.nn.E8PLinear (incl. from_quipsharp) and tersor.nn.AQLMLinear: forward against dense references,
safetensors round trips, bad inputs."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from tersor.nn import AQLMLinear, E8PLinear
from tersor.quant import aqlm_dequantize_reference, quipsharp
from tersor.quant.quipsharp import E81B


def sylvester(n):
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n**0.5


def quipsharp_dense_weight(state, resid_scale):
    """QuIP#'s forward as a dense matrix, from its definition (docs/research/e8p12.md section 4), built
    with explicit Hadamard matrices and this file's own decode of the codes."""
    q, su, sv = state["Qidxs"], state["SU"].double(), state["SV"].double()
    n, m = su.numel(), sv.numel()
    bits = quipsharp.qidxs_bits(q, n)
    from tersor.quant.e8p12 import e8p12_decode

    w_hat = e8p12_decode(quipsharp.unpack_qidxs_e8p(q[:, : n // 32])).reshape(m, n).double()
    if bits == 4:
        w_hat += e8p12_decode(quipsharp.unpack_qidxs_e8p(q[:, n // 32:])).reshape(m, n).double() / resid_scale
    elif bits == 3:
        codes = [(q[:, n // 32:] >> (8 * j)) & 0xFF for j in range(8)]
        codes = torch.stack(codes, -1).reshape(m, n // 8)
        w_hat += E81B[codes].reshape(m, n).double() / resid_scale
    su = su / state["scaleWH"].double() if "scaleWH" in state else su
    wscale = state.get("Wscale", torch.ones(())).double()
    return (sv * wscale)[:, None] * (sylvester(m) @ w_hat @ sylvester(n).T) * su[None, :]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_e8p_linear_layer_matches_its_dense_weight(bits):
    lin = torch.nn.Linear(128, 64)
    layer = E8PLinear.from_linear(lin, bits=bits)
    x = torch.randn(5, 128)
    ref = F.linear(x.double(), layer.dequantize().double(), lin.bias.double())
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5)
    # and a large batch (decode + matmul path)
    x = torch.randn(3, 7, 128)
    torch.testing.assert_close(layer(x).double(), F.linear(x.double(), layer.dequantize().double(), lin.bias.double()),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_from_quipsharp_matches_quipsharp_forward(bits):
    g = torch.Generator().manual_seed(bits)
    st = quipsharp.quantize_e8p(torch.randn(32, 256, generator=g), bits=bits)
    # Released QuIP# models carry fine-tuned fp16 SU/SV, a legacy Wscale, sometimes scaleWH and a bias.
    state = {
        "Qidxs": st["Qidxs"],
        "SU": (torch.randn(256, generator=g) * 0.5).half(),
        "SV": (torch.randn(32, generator=g) * 0.01).half(),
        "Wscale": torch.tensor(1.25).half(),
        "scaleWH": (torch.rand(256, generator=g) + 0.5).half(),
        "bias": torch.randn(32, generator=g).half(),
        "codebook_id": torch.tensor({2: 7, 3: 18, 4: 17}[bits]),
    }
    rs = {2: 1.0, 3: 2.04, 4: 3.45}[bits]
    layer = E8PLinear.from_quipsharp(state)
    x = torch.randn(4, 256, generator=g)
    ref = x.double() @ quipsharp_dense_weight(state, rs).T + state["bias"].double()
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-4, atol=1e-5)
    if bits > 2:  # quip_params.resid_scale_override
        layer = E8PLinear.from_quipsharp(state, resid_scale_override=2.5)
        ref = x.double() @ quipsharp_dense_weight(state, 2.5).T + state["bias"].double()
        torch.testing.assert_close(layer(x).double(), ref, rtol=1e-4, atol=1e-5)


def test_from_quipsharp_errors():
    st = quipsharp.quantize_e8p(torch.randn(16, 64), bits=2)
    with pytest.raises(ValueError, match="missing tensor 'SV'"):
        E8PLinear.from_quipsharp({"Qidxs": st["Qidxs"], "SU": st["SU"]})
    with pytest.raises(ValueError, match="fused QuIP# layers"):
        E8PLinear.from_quipsharp({**st, "fuse_scales": torch.ones(3)})
    with pytest.raises(ValueError, match="codebook_id 17 does not match"):
        E8PLinear.from_quipsharp({**st, "codebook_id": torch.tensor(17)})
    # 96 = 12 * 8 is a QuIP# Hadamard size (H_12 ships), but E8P's layout needs in_features % 64 == 0
    bad = {"Qidxs": torch.zeros(16, 3 * 96 // 96, dtype=torch.int64), "SU": torch.ones(96), "SV": torch.ones(16)}
    with pytest.raises(ValueError, match=r"in_features % 64 == 0"):
        E8PLinear.from_quipsharp(bad)


@pytest.mark.parametrize("bits", [2, 4])
def test_e8p_layer_safetensors_round_trip(tmp_path, bits):
    layer = E8PLinear.from_linear(torch.nn.Linear(64, 32), bits=bits)
    layer2 = E8PLinear.from_quipsharp({k: v for k, v in layer.state_dict().items() if k != "resid_scale"},
                                      resid_scale_override=3.0 if bits == 4 else None)
    save_file(layer2.state_dict(), tmp_path / "l.safetensors")
    layer3 = E8PLinear(load_file(tmp_path / "l.safetensors"))
    assert layer3._resid == layer2._resid
    x = torch.randn(2, 64)
    assert torch.equal(layer3(x), layer2(x))


# ---------------------------------------------------------------------------------------------- AQLM


@pytest.mark.parametrize("books,nbits", [(2, 8), (1, 16)])
def test_aqlm_layer_matches_aqlm_semantics(books, nbits):
    g = torch.Generator().manual_seed(nbits)
    ct = torch.int8 if nbits == 8 else torch.int16
    codes = torch.randint(-(1 << (nbits - 1)), 1 << (nbits - 1), (48, 16, books), generator=g).to(ct)
    codebooks = (torch.randn(books, 1 << nbits, 1, 8, generator=g) * 0.1).half()
    scales = (torch.rand(48, 1, 1, 1, generator=g) + 0.5).half()
    bias = torch.randn(48, generator=g).half()
    layer = AQLMLinear.from_aqlm(codes=codes, codebooks=codebooks, scales=scales, bias=bias)
    x = torch.randn(3, 128, generator=g).half()
    # AQLM rounds the codebook sum to fp16, then the product with the scale; ours rounds once: within fp16 rounding.
    w_aqlm = aqlm_dequantize_reference(codes, codebooks, scales).float()
    ref = F.linear(x.float(), w_aqlm, bias.float())
    got = layer(x)
    assert got.dtype == torch.float16 and got.shape == (3, 48)
    torch.testing.assert_close(got.float(), ref, rtol=4e-3, atol=4e-3 * ref.abs().max().item())
    assert (layer.dequantize().float() - w_aqlm).abs().max() <= 2**-10 * w_aqlm.abs().max() * 2


def test_aqlm_layer_from_linear_and_round_trip(tmp_path):
    lin = torch.nn.Linear(64, 32)
    layer = AQLMLinear.from_linear(lin, num_codebooks=2, nbits=8, iters=2)
    x = torch.randn(4, 64)
    ref = lin(x)
    err = (layer(x) - ref).norm() / ref.norm()
    assert err < 0.2, err
    save_file(layer.state_dict(), tmp_path / "a.safetensors")
    st = load_file(tmp_path / "a.safetensors")
    layer2 = AQLMLinear.from_aqlm(codes=st["codes"], codebooks=st["codebooks"], scales=st["scales"], bias=st["bias"])
    assert torch.equal(layer2(x), layer(x))


def test_aqlm_layer_bad_inputs():
    codes = torch.zeros(16, 8, 2, dtype=torch.int8)
    with pytest.raises(Exception, match="group size must be 1x8|out_group_size 1"):
        AQLMLinear(codes, torch.zeros(2, 256, 2, 4, dtype=torch.float16), torch.ones(16, 1, 1, 1))
    layer = AQLMLinear(codes, torch.zeros(2, 256, 1, 8, dtype=torch.float16), torch.ones(16, 1, 1, 1))
    with pytest.raises(ValueError, match="expects 64"):
        layer(torch.randn(2, 32))


def _aqlm_tensors(out, in_features, books, nbits, seed=0):
    g = torch.Generator().manual_seed(seed)
    ct = torch.int8 if nbits <= 8 else torch.int16
    codes = torch.randint(-(1 << (nbits - 1)), 1 << (nbits - 1), (out, in_features // 8, books), generator=g).to(ct)
    codebooks = (torch.randn(books, 1 << nbits, 1, 8, generator=g) * 0.1).half()
    scales = (torch.rand(out, 1, 1, 1, generator=g) + 0.5).half()
    return codes, codebooks, scales


class _AQLMLayerLike:
    """The attributes of AQLM's QuantizedLinear that from_aqlm reads (its tensors are parameters there)."""

    def __init__(self, codes, codebooks, scales):
        self.codes = torch.nn.Parameter(codes, requires_grad=False)
        self.codebooks = torch.nn.Parameter(codebooks, requires_grad=False)
        self.scales = torch.nn.Parameter(scales, requires_grad=False)
        self.bias = None


@pytest.mark.parametrize("how", ["keywords", "layer", "constructor"])
def test_aqlm_layer_does_not_alias_the_callers_tensors(how):
    """Issue 19.6: AQLM's CPU forward rewrites its codes in place (a transposed layout, same shape when
    in/8 == out); a layer built from those tensors must keep computing with the values it was given."""
    codes, codebooks, scales = _aqlm_tensors(16, 128, 2, 8)
    if how == "keywords":
        layer = AQLMLinear.from_aqlm(codes=codes, codebooks=codebooks, scales=scales)
    elif how == "layer":
        src = _AQLMLayerLike(codes, codebooks, scales)
        codes, codebooks, scales = src.codes.data, src.codebooks.data, src.scales.data
        layer = AQLMLinear.from_aqlm(src)
    else:
        layer = AQLMLinear(codes, codebooks, scales)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(1)).half()
    want = F.linear(x.float(), aqlm_dequantize_reference(codes.clone(), codebooks.clone(), scales.clone()).float())
    y0 = layer(x)
    torch.testing.assert_close(y0.float(), want, rtol=4e-3, atol=4e-3 * want.abs().max().item())
    with torch.no_grad():
        codes.copy_(codes.transpose(0, 1).clone())  # what AQLM's CPU path does to codes [16, 16, 2]
        codebooks.mul_(-3)
        scales.add_(1)
    assert torch.equal(layer(x), y0)
    for name in ("codes", "codebooks", "scales"):
        given = {"codes": codes, "codebooks": codebooks, "scales": scales}[name]
        assert getattr(layer, name).untyped_storage().data_ptr() != given.untyped_storage().data_ptr(), name


@pytest.mark.parametrize("nbits,books", [(8, 2), (16, 1), (4, 2)])
@pytest.mark.parametrize("code_dtype", [torch.int16, torch.int32, torch.int64])
def test_aqlm_layer_accepts_wider_code_storage(nbits, books, code_dtype):
    """Issue 19.7: AQLM accepts codes stored in wider integer types (int16 for 2x8, int64); they name the same
    entries as its own int8/int16 storage."""
    if code_dtype == torch.int16 and nbits > 8:
        pytest.skip("int16 is the native storage of 16-bit codes")
    codes, codebooks, scales = _aqlm_tensors(24, 64, books, nbits, seed=nbits)
    ref = AQLMLinear(codes, codebooks, scales)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
    idx = codes.to(torch.int64) & ((1 << nbits) - 1)
    variants = {"signed": codes.to(code_dtype), "index": idx.to(code_dtype)}
    if code_dtype == torch.int16 and nbits <= 8:
        variants["sign-extended + 2^nbits"] = (idx + (1 << nbits) * 7).to(torch.int16)  # read mod 2^nbits
    for what, c in variants.items():
        layer = AQLMLinear.from_aqlm(codes=c, codebooks=codebooks, scales=scales)
        assert layer.codes.dtype == ref.codes.dtype, what
        assert torch.equal(layer.codes, ref.codes), what
        assert torch.equal(layer(x), ref(x)), what
        # AQLM's semantics agree that the variant names the same weight
        assert torch.equal(aqlm_dequantize_reference(c, codebooks, scales),
                           aqlm_dequantize_reference(codes, codebooks, scales)), what


@pytest.mark.parametrize("code_dtype", [torch.int32, torch.int64])
def test_aqlm_layer_refuses_out_of_range_wide_codes(code_dtype):
    codes, codebooks, scales = _aqlm_tensors(8, 32, 2, 8)
    for bad in (256, -129, 1 << 20):
        c = codes.to(code_dtype)
        c[3, 1, 0] = bad
        with pytest.raises(ValueError, match=r"codes .*\[-128, 256\).*got range"):
            AQLMLinear.from_aqlm(codes=c, codebooks=codebooks, scales=scales)
    c = codes.to(code_dtype)
    c[0, 0, 1], c[1, 0, 1] = 255, -128  # the extremes of both forms are fine
    AQLMLinear(c, codebooks, scales)
    with pytest.raises(TypeError, match="codes must be"):
        AQLMLinear(codes.float(), codebooks, scales)
    with pytest.raises(TypeError, match="codes must be int16, int32 or int64 for 65536-entry"):
        AQLMLinear(codes[..., :1], torch.zeros(1, 65536, 1, 8, dtype=torch.float16), scales)


def test_aqlm_layer_broadcast_scale():
    codes, codebooks, scales = _aqlm_tensors(16, 64, 2, 8)
    one = scales[:1].clone()
    layer = AQLMLinear(codes, codebooks, one)
    assert list(layer.scales.shape) == [16, 1, 1, 1] and layer.scales.stride(0) == 1
    full = AQLMLinear(codes, codebooks, one.expand(16, 1, 1, 1).contiguous())
    x = torch.randn(3, 64)
    assert torch.equal(layer(x), full(x))
    with pytest.raises(ValueError, match=r"scales must have shape \[16, 1, 1, 1\]"):
        AQLMLinear(codes, codebooks, scales[:2])


def test_aqlm_layer_fp16_codebook_sum_overflow_is_finite():
    """The documented difference: a 2x8 float16 codebook sum above 65504 is inf in AQLM's float16 arithmetic
    (aqlm_dequantize_reference rounds the sum to fp16), finite here (fp32 sum and scaling, rounded once)."""
    codes = torch.zeros(4, 2, 2, dtype=torch.int8)
    codebooks = torch.full((2, 256, 1, 8), 40000.0).half()
    scales = torch.full((4, 1, 1, 1), 1e-3).half()
    layer = AQLMLinear(codes, codebooks, scales)
    x = torch.ones(1, 16, dtype=torch.float16)
    assert torch.isinf(aqlm_dequantize_reference(codes, codebooks, scales)).all()
    want = 16 * 80000.0 * float(scales[0])
    torch.testing.assert_close(layer(x).float(), torch.full((1, 4), want), rtol=1e-3, atol=0)
    assert torch.isfinite(layer.dequantize()).all()
