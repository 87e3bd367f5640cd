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
