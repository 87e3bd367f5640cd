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


def test_fp32_layer_is_exact_on_cpu():
    # An fp32 nn.Linear gives an fp32 layer with fp32 values (issue 13: "2:4 in fp32: CPU exact"): no operand
    # rounding, the product of F.linear with the pruned weight up to fp32 summation order.
    torch.manual_seed(0)
    lin = nn.Linear(128, 32)
    layer = SparseLinear.from_linear(lin)
    assert layer.values.dtype == torch.float32 and layer.bias.dtype == torch.float32
    w = prune_2_4(lin.weight.detach())
    assert torch.equal(layer.dense_weight(), w)
    for rows in (1, 3, 40):  # the direct loop (<= 16 rows) and decompress + GEMM
        x = torch.randn(rows, 128)
        y = layer(x)
        ref = (x.double() @ w.double().T + lin.bias.detach().double())
        assert y.dtype == torch.float32
        # fp32 accumulation of 64 non-zero products: a few ulp of the magnitudes, far below bf16's 2^-8
        mag = x.double().abs() @ w.double().abs().T + lin.bias.detach().double().abs()
        assert bool(((y.double() - ref).abs() <= 2.0**-20 * mag).all())
        if rows > 16:
            assert torch.equal(y, torch.nn.functional.linear(x, w, lin.bias.detach()))
    with pytest.raises(TypeError, match="float32"):
        layer(torch.randn(3, 128).half())
    assert layer.layer_config()["values_dtype"] == "float32"
    fresh = SparseLinear(128, 32, dtype=torch.float32)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(3, 128)
    assert torch.equal(fresh(x), layer(x))
    # a state of another values dtype is refused, not converted silently by load_state_dict's copy_
    compact = SparseLinear.from_linear(lin, values_dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="values_dtype"):
        fresh.load_state_dict(compact.state_dict())


def test_fp32_layer_compact_bfloat16_values():
    # values_dtype=bfloat16: 9/32 of the dense fp32 bytes; x rounded to bfloat16, fp32 bias/output.
    torch.manual_seed(0)
    lin = nn.Linear(128, 32)
    layer = SparseLinear.from_linear(lin, values_dtype=torch.bfloat16)
    assert layer.values.dtype == torch.bfloat16 and layer.bias.dtype == torch.float32
    x = torch.randn(3, 128)
    w = prune_2_4(lin.weight.detach()).bfloat16().float()
    ref = x.bfloat16().float() @ w.T + lin.bias.detach()
    y = layer(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=1e-2, atol=1e-2)
    exact = SparseLinear.from_linear(lin)
    assert exact.values.nbytes == 2 * layer.values.nbytes
    with pytest.raises(TypeError, match="float32"):
        layer(x.half())
    fresh = SparseLinear(128, 32, dtype=torch.float32, values_dtype=torch.bfloat16)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh(x), y)
    with pytest.raises(TypeError, match="values_dtype"):
        SparseLinear(128, 32, dtype=torch.float16, values_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="values_dtype is for pattern"):
        SparseLinear.from_linear(nn.Linear(64, 64), pattern="bsr", values_dtype=torch.bfloat16)


@pytest.mark.cuda
def test_fp32_layer_on_cuda_uses_the_documented_bfloat16_conversion():
    # On a GPU a float32 layer computes through a cached bfloat16 copy of its values, x rounded to bfloat16
    # (tersor.sparse.linear_2_4); the cache follows in-place changes of the values.
    torch.manual_seed(1)
    lin = nn.Linear(128, 32)
    layer = SparseLinear.from_linear(lin)
    compact = SparseLinear.from_linear(lin, values_dtype=torch.bfloat16)  # the same product on the CPU
    x = torch.randn(3, 128)
    want = compact(x)
    gpu = layer.cuda()
    got = gpu(x.cuda()).cpu()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        gpu.values.mul_(2)
        gpu.bias.mul_(2)
    torch.testing.assert_close(gpu(x.cuda()).cpu(), 2 * want, rtol=1e-5, atol=1e-5)


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


def test_checkpoint_keeps_values_dtype_and_reads_older_fp32_checkpoints(tmp_path):
    # tersor.save records values_dtype; a checkpoint written before it existed (float32 layer, bfloat16
    # values, no values_dtype in the manifest) still loads as the compact layer it was.
    import json

    import tersor

    torch.manual_seed(0)
    x = torch.randn(4, 128)
    for compact in (False, True):
        model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32))
        tersor.quantize_(model, tersor.Sparse24Config(compact=compact), progress=False)
        want = model(x)
        d = tmp_path / f"c{int(compact)}"
        tersor.save(model, d)
        manifest = json.loads((d / "tersor_manifest.json").read_text())
        cfgs = [layer["config"] for layer in manifest["layers"]]
        assert [c["values_dtype"] for c in cfgs] == ["bfloat16" if compact else "float32"] * 2
        if compact:  # as an older tersor wrote it
            for c in cfgs:
                del c["values_dtype"]
            (d / "tersor_manifest.json").write_text(json.dumps(manifest))
        fresh = tersor.load(nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32)), d)
        assert fresh[0].values.dtype == (torch.bfloat16 if compact else torch.float32)
        assert torch.equal(fresh(x), want)
