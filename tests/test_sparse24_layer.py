"""tersor.nn.SparseLinear (pattern "2:4"): equals the pruned dense layer, safetensors round trip,
validation on load, bad arguments."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tersor.nn import SparseLinear
from tersor.sparse import is_2_4, prune_2_4

EPS = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _check_equals_pruned(layer, lin, x, dtype, act_norm=None, method="magnitude"):
    wp = prune_2_4(lin.weight.detach(), method, act_norm).to(dtype)
    assert is_2_4(wp)
    assert torch.equal(layer.dense_weight(), wp)
    ref = x.double() @ wp.double().T + lin.bias.detach().to(dtype).double()
    y = layer(x)
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], lin.out_features)
    bound = EPS[dtype] * ref.abs() + 1e-6 * (x.double().abs() @ wp.double().abs().T) + 1e-7
    assert bool(((y.double() - ref).abs() <= bound).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 30])
def test_from_linear_magnitude_equals_pruned_dense(dtype, rows):
    lin = nn.Linear(192, 64)
    layer = SparseLinear.from_linear(lin, dtype=dtype)
    x = torch.randn(rows, 192).to(dtype)
    _check_equals_pruned(layer, lin, x, dtype)


def test_from_linear_wanda():
    lin = nn.Linear(128, 32).half()
    calib = torch.randn(64, 128) * torch.linspace(0.1, 3, 128)
    norm = calib.norm(dim=0)
    layer = SparseLinear.from_linear(lin, method="wanda", act_norm=norm)
    _check_equals_pruned(layer, lin, torch.randn(3, 128).half(), torch.float16, norm, "wanda")
    assert not torch.equal(layer.dense_weight(), SparseLinear.from_linear(lin).dense_weight())


def test_safetensors_round_trip(tmp_path):
    lin = nn.Linear(256, 48)
    layer = SparseLinear.from_linear(lin, dtype=torch.bfloat16)
    save_file(layer.state_dict(), tmp_path / "l.safetensors")
    fresh = SparseLinear(256, 48, bias=True, dtype=torch.bfloat16)
    x = torch.randn(5, 256).bfloat16()
    assert not torch.equal(fresh(x), layer(x))
    fresh.load_state_dict(load_file(tmp_path / "l.safetensors"))
    assert torch.equal(fresh(x), layer(x))
    assert set(layer.state_dict()) == {"values", "meta", "bias"}


def test_load_rejects_corrupt_metadata():
    layer = SparseLinear.from_linear(nn.Linear(64, 16), dtype=torch.float16)
    sd = layer.state_dict()
    sd["meta"] = sd["meta"].clone()
    sd["meta"][0, 0, 0] = 0
    with pytest.raises(ValueError, match="corrupt metadata"):
        SparseLinear(64, 16).load_state_dict(sd)


def test_fp32_layer_stores_bfloat16_and_returns_fp32():
    # An fp32 nn.Linear gives an fp32 layer (issue 13): values in bfloat16, x rounded to bfloat16, fp32 bias/output.
    torch.manual_seed(0)
    lin = nn.Linear(128, 32)
    layer = SparseLinear.from_linear(lin)
    assert layer.values.dtype == torch.bfloat16 and layer.bias.dtype == torch.float32
    x = torch.randn(3, 128)
    w = prune_2_4(lin.weight.detach()).bfloat16().float()
    ref = x.bfloat16().float() @ w.T + lin.bias.detach()
    y = layer(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=1e-2, atol=1e-2)
    with pytest.raises(TypeError, match="float32"):
        layer(x.half())
    fresh = SparseLinear(128, 32, dtype=torch.float32)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh(x), y)


def test_fresh_layer_is_zero_and_valid():
    layer = SparseLinear(64, 32, bias=False, dtype=torch.bfloat16)
    assert torch.equal(layer(torch.randn(2, 64).bfloat16()), torch.zeros(2, 32).bfloat16())


def test_bad_arguments():
    with pytest.raises(ValueError, match="multiples of the blocksize"):
        SparseLinear.from_linear(nn.Linear(64, 16), pattern="bsr")  # 16 rows: no 64x64 block fits
    with pytest.raises(ValueError, match="pattern"):
        SparseLinear.from_linear(nn.Linear(64, 16), pattern="4:8")
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        SparseLinear.from_linear(nn.Linear(64, 16).double())  # fp64 weight, no dtype given
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        SparseLinear(64, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="in_features % 64"):
        SparseLinear.from_linear(nn.Linear(48, 16), dtype=torch.half)
    with pytest.raises(TypeError, match="nn.Linear"):
        SparseLinear.from_linear(nn.Conv1d(4, 4, 1))
    layer = SparseLinear(64, 16)
    with pytest.raises(ValueError, match="expects 64"):
        layer(torch.randn(2, 32).half())


@pytest.mark.cuda
def test_cuda_layer_matches_cpu_layer():
    lin = nn.Linear(512, 256)
    layer = SparseLinear.from_linear(lin, dtype=torch.float16)
    x = torch.randn(4, 512).half()
    y_cpu = layer(x)
    y_gpu = layer.cuda()(x.cuda()).cpu()
    torch.testing.assert_close(y_gpu, y_cpu, rtol=2e-3, atol=2e-3)
