"""tersor.sparse.prune_blocks and tersor.nn.SparseLinear(pattern="bsr"): pruning against an independent
reference, the layer equals the pruned dense layer, state-dict/safetensors round trip with a different block
count, validation on load, bad arguments."""

import itertools

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tersor.nn import SparseLinear
from tersor.sparse import prune_blocks

EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _prune_blocks_reference(w, bs, density, act_norm=None):
    """Loop-over-blocks reference: score every block, keep the best round(density * nblocks) (first wins ties)."""
    n, k = w.shape
    wf = w.double() if act_norm is None else w.double() * act_norm.double()
    scored = []
    for i, j in itertools.product(range(n // bs), range(k // bs)):
        scored.append((-float((wf[i * bs:(i + 1) * bs, j * bs:(j + 1) * bs] ** 2).sum()), i * (k // bs) + j, i, j))
    scored.sort()
    keep = max(1, round(density * len(scored)))
    out = torch.zeros_like(w)
    for _, _, i, j in scored[:keep]:
        out[i * bs:(i + 1) * bs, j * bs:(j + 1) * bs] = w[i * bs:(i + 1) * bs, j * bs:(j + 1) * bs]
    return out


@pytest.mark.parametrize("bs,density", [(16, 0.1), (32, 0.3), (64, 0.5), (16, 1.0), (32, 0.01)])
def test_prune_blocks_magnitude_matches_reference(bs, density):
    g = torch.Generator().manual_seed(bs)
    w = torch.randn(128, 192, generator=g)
    torch.testing.assert_close(prune_blocks(w, bs, density), _prune_blocks_reference(w, bs, density), rtol=0, atol=0)


def test_prune_blocks_wanda_and_ties():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 128, generator=g)
    norm = torch.rand(128, generator=g) * 4
    got = prune_blocks(w, 16, 0.25, "wanda", norm)
    torch.testing.assert_close(got, _prune_blocks_reference(w, 16, 0.25, norm), rtol=0, atol=0)
    assert not torch.equal(got, prune_blocks(w, 16, 0.25))
    # all blocks tie: the first ones in row-major block order are kept
    ones = torch.ones(32, 64)
    kept = prune_blocks(ones, 16, 0.5).reshape(2, 16, 4, 16).abs().sum(dim=(1, 3)).ne(0)
    assert kept.tolist() == [[True, True, True, True], [False, False, False, False]]


def test_prune_blocks_bad_arguments():
    w = torch.randn(64, 64)
    with pytest.raises(ValueError, match="density"):
        prune_blocks(w, 16, 0.0)
    with pytest.raises(ValueError, match="blocksize"):
        prune_blocks(w, 24, 0.5)
    with pytest.raises(ValueError, match="act_norm"):
        prune_blocks(w, 16, 0.5, "wanda")
    with pytest.raises(ValueError, match="method"):
        prune_blocks(w, 16, 0.5, "random")
    with pytest.raises(TypeError):
        prune_blocks(w.to(torch.int32), 16, 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bs", [16, 64])
def test_from_linear_equals_pruned_dense(dtype, bs):
    torch.manual_seed(0)
    lin = nn.Linear(256, 128)
    layer = SparseLinear.from_linear(lin, pattern="bsr", blocksize=bs, density=0.2, dtype=dtype)
    wp = prune_blocks(lin.weight.detach(), bs, 0.2).to(dtype)
    assert torch.equal(layer.dense_weight(), wp)
    assert layer.weight_bsr.nnz_blocks == round(0.2 * (128 // bs) * (256 // bs))
    x = torch.randn(3, 5, 256).to(dtype)
    y = layer(x)
    ref = x.double() @ wp.double().T + lin.bias.detach().to(dtype).double()
    assert y.dtype == dtype and y.shape == (3, 5, 128)
    bound = EPS[dtype] * ref.abs() + 1e-6 * (x.double().abs() @ wp.double().abs().T) + 1e-7
    assert bool(((y.double() - ref).abs() <= bound).all())


def test_from_linear_keeps_an_already_block_sparse_weight():
    lin = nn.Linear(128, 64, bias=False)
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[:32, 32:64] = torch.randn(32, 32)
    layer = SparseLinear.from_linear(lin, pattern="bsr", blocksize=32)
    assert layer.weight_bsr.nnz_blocks == 1 and layer.bias is None
    assert torch.equal(layer.dense_weight(), lin.weight.detach())
    with pytest.raises(ValueError, match="density"):
        SparseLinear.from_linear(lin, pattern="bsr", blocksize=32, method="wanda", act_norm=torch.ones(128))


def test_state_dict_round_trip_with_another_block_count(tmp_path):
    lin = nn.Linear(192, 128)
    layer = SparseLinear.from_linear(lin, pattern="bsr", blocksize=32, density=0.4, dtype=torch.bfloat16)
    save_file(layer.state_dict(), tmp_path / "l.safetensors")
    fresh = SparseLinear(192, 128, pattern="bsr", blocksize=32, dtype=torch.bfloat16)
    assert fresh.weight_bsr.nnz_blocks == 0
    assert torch.equal(fresh(torch.randn(2, 192).bfloat16()), fresh.bias.expand(2, -1))
    fresh.load_state_dict(load_file(tmp_path / "l.safetensors"))
    assert torch.equal(fresh.dense_weight(), layer.dense_weight())
    x = torch.randn(4, 192).bfloat16()
    assert torch.equal(fresh(x), layer(x))
    assert "density=0.417" in repr(fresh)  # round(0.4 * 24) = 10 of 24 blocks


def test_load_rejects_corrupt_or_mismatched_state():
    layer = SparseLinear.from_linear(nn.Linear(128, 64), pattern="bsr", blocksize=32, density=0.5,
                                     dtype=torch.float16)
    sd = {k: v.clone() for k, v in layer.state_dict().items()}
    sd["col_indices"][0] = 7  # out of range for 4 block columns
    with pytest.raises(ValueError):
        SparseLinear(128, 64, pattern="bsr", blocksize=32, dtype=torch.float16).load_state_dict(sd)
    with pytest.raises(ValueError, match="blocksize"):
        SparseLinear(128, 64, pattern="bsr", blocksize=16, dtype=torch.float16).load_state_dict(layer.state_dict())


def test_bad_arguments():
    with pytest.raises(TypeError, match="dtype"):
        SparseLinear(64, 64, pattern="bsr", dtype=torch.int8)
    with pytest.raises(ValueError, match="blocksize"):
        SparseLinear(64, 64, pattern="bsr", blocksize=8)
    with pytest.raises(ValueError, match="density"):
        SparseLinear.from_linear(nn.Linear(64, 64).half(), density=0.5)  # 2:4 keeps exactly half
    layer = SparseLinear(64, 64, pattern="bsr", blocksize=16, dtype=torch.float32)
    with pytest.raises(ValueError, match="pattern is .bsr"):
        layer.weight_2_4
    with pytest.raises(ValueError, match="features"):
        layer(torch.randn(2, 32))


@pytest.mark.cuda
def test_cuda_layer_matches_cpu_layer():
    lin = nn.Linear(512, 256)
    layer = SparseLinear.from_linear(lin, pattern="bsr", blocksize=64, density=0.1, dtype=torch.float16)
    x = torch.randn(4, 512).half()
    y_cpu = layer(x)
    y_gpu = layer.cuda()(x.cuda()).cpu()
    torch.testing.assert_close(y_gpu, y_cpu, rtol=2e-3, atol=2e-3)
