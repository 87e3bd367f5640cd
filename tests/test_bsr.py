"""Block-sparse (BSR) weights: format round trips, bsr_linear (CPU), the CUDA kernel's CPU replay, bad input,
and (marked cuda) the CUDA kernel against the CPU reference."""

import pytest
import torch
import torch.nn.functional as F

import tersor
from conftest import HAS_TESTING_EXT
from tersor.sparse import BSRWeight, bsr_linear, to_bsr
from tersor.sparse.bsr import bsr_schedule, load_bsr

ops = tersor.ops.lib  # torch.ops.tersor with tersor's error types (ValueError, TypeError, NotImplementedError)
# The CPU replay of the CUDA kernel is a test-only op (tersor._C_testing); its tests are marked testing_ext.
T = tersor._testing.lib if HAS_TESTING_EXT else None

LOW = (torch.float16, torch.bfloat16)


def random_block_sparse(n, k, bs, density, dtype=torch.float32, seed=0, empty_rows=()):
    """Dense W [n, k] whose bs x bs blocks are kept with probability `density` (the rest exactly zero)."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(n // bs, k // bs, generator=g) < density
    for r in empty_rows:
        keep[r] = False
    mask = keep.repeat_interleave(bs, 0).repeat_interleave(bs, 1)
    w = torch.randn(n, k, generator=g) * 0.1
    # Some kept blocks get internal zeros (a block is dropped only when all of it is zero).
    w = w * (torch.rand(n, k, generator=g) > 0.1)
    return (w * mask).to(dtype)


def reference_linear(x, w_dense, bias=None):
    """float64 x @ W^T + bias from the dense weight (independent of tersor)."""
    y = x.double() @ w_dense.double().T
    if bias is not None:
        y = y + bias.double()
    return y


def assert_within_torch_error(got, x, w, bias, ref):
    """Low precision: |got - ref| <= 2 |F.linear - ref| + half an ulp of the output (the FlashAttention rule,
    with the output rounding as floor); fp32: tight."""
    if got.dtype == torch.float32:
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5 * (ref.abs().max().item() + 1))
        return
    torch_out = F.linear(x.float(), w.float(), None if bias is None else bias.float()).to(got.dtype)
    torch_err = (torch_out.double() - ref).abs().max().item()
    eps = torch.finfo(got.dtype).eps
    err = (got.double() - ref).abs()
    bound = 2 * torch_err + eps * ref.abs()
    assert (err <= bound + 1e-6).all(), f"max err {err.max().item()} vs torch {torch_err}"


# ---- format ----

@pytest.mark.parametrize("bs", [16, 32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_dense(bs, dtype):
    w = random_block_sparse(4 * bs, 6 * bs, bs, 0.4, dtype, empty_rows=(1,))
    b = to_bsr(w, bs)
    assert b.blocksize == bs and b.shape == tuple(w.shape) and b.values.dtype == dtype
    assert b.crow_indices.dtype == torch.int32 and b.col_indices.dtype == torch.int32
    blocks = w.reshape(4, bs, 6, bs).transpose(1, 2)
    assert b.nnz_blocks == int(blocks.ne(0).any(-1).any(-1).sum())
    assert b.crow_indices[2] == b.crow_indices[1]  # the empty block row
    assert torch.equal(b.to_dense(), w)
    assert torch.equal(BSRWeight.from_dense(w, bs).to_dense(), w)


def test_from_torch_sparse_bsr_drops_zero_blocks():
    w = random_block_sparse(128, 192, 32, 0.5)
    sp = w.to_sparse_bsr(32)
    # torch keeps explicit zero blocks if they are stored: add one by hand.
    values = sp.values().clone()
    values[0] = 0
    sp = torch.sparse_bsr_tensor(sp.crow_indices(), sp.col_indices(), values, sp.shape)
    b = to_bsr(sp)
    assert b.blocksize == 32
    assert b.nnz_blocks == sp.values().shape[0] - 1
    assert torch.equal(b.to_dense(), sp.to_dense())
    # A torch BSR tensor with another blocksize is re-blocked.
    b16 = to_bsr(w.to_sparse_bsr(64), 16)
    assert b16.blocksize == 16 and torch.equal(b16.to_dense(), w)


def test_schedule_layout():
    # Rows with 0, 1, 5, 9, 4 blocks; chunks of 4 blocks.
    crow = torch.tensor([0, 0, 1, 6, 15, 19], dtype=torch.int32)
    s = bsr_schedule(crow, 64, chunk_blocks=4).tolist()
    mb = 5
    rows = [s[4 * i: 4 * i + 4] for i in range(mb)]
    assert [r[0] for r in rows] == [3, 2, 4, 1, 0]  # longest first, stable
    assert rows[0] == [3, 6, 15, -1]
    split = s[4 * mb: len(s) - (mb + 1)]
    items = [split[i: i + 4] for i in range(0, len(split), 4)]
    assert items == [[0, 0, 0, -1], [1, 0, 1, -1], [2, 1, 5, 0], [2, 5, 6, 1], [3, 6, 10, 2], [3, 10, 14, 3],
                     [3, 14, 15, 4], [4, 15, 19, -1]]
    assert s[len(s) - (mb + 1):] == [0, 0, 0, 2, 5, 5]


@pytest.mark.parametrize("bs", [16, 32, 64])
@pytest.mark.parametrize("chunk", [None, 1, 3])
def test_schedule_is_valid_for_random_structures(bs, chunk):
    for seed in range(4):
        w = random_block_sparse(9 * bs, 11 * bs, bs, [0.0, 0.1, 0.5, 1.0][seed], seed=seed, empty_rows=(3,))
        b = to_bsr(w, bs, chunk_blocks=chunk)
        version, bsz, mb, n_split, n_partials = ops._bsr_check(
            b.crow_indices, b.col_indices, b.values, b.schedule, 11 * bs)
        assert (version, bsz, mb) == (1, bs, 9)
        c = chunk or 16384 // (bs * bs)
        nnz = (b.crow_indices[1:] - b.crow_indices[:-1]).tolist()
        assert n_split == sum(max(1, -(-n // c)) for n in nnz)
        assert n_partials == sum(-(-n // c) for n in nnz if n > c)


def test_state_dict_round_trip_and_validation():
    w = random_block_sparse(128, 128, 32, 0.5, torch.float16)
    b = to_bsr(w, 32, chunk_blocks=1)
    b2 = load_bsr(b.state_dict())
    assert torch.equal(b2.to_dense(), w) and torch.equal(b2.schedule, b.schedule)
    bad = dict(b.state_dict(), version=2)
    with pytest.raises(ValueError, match="v1"):
        load_bsr(bad)
    sched = b.schedule.clone()
    sched[4 * 4 + 1] += 1  # first split item starts late
    with pytest.raises(ValueError, match="schedule"):
        load_bsr(dict(b.state_dict(), schedule=sched))
    col = b.col_indices.clone()
    col[0] = 4
    with pytest.raises(ValueError, match="col_indices"):
        load_bsr(dict(b.state_dict(), col_indices=col))
    crow = b.crow_indices.clone()
    crow[1], crow[2] = crow[2], crow[1]
    if crow[1] != crow[2]:
        with pytest.raises(ValueError, match="crow_indices|schedule"):
            load_bsr(dict(b.state_dict(), crow_indices=crow))
    # Columns out of order within a row.
    b3 = to_bsr(torch.ones(32, 128), 32)
    col = b3.col_indices.flip(0).contiguous()
    with pytest.raises(ValueError, match="ascending"):
        load_bsr(dict(b3.state_dict(), col_indices=col))


def test_to_bsr_bad_input():
    with pytest.raises(ValueError, match="blocksize"):
        to_bsr(torch.zeros(64, 64), 8)
    with pytest.raises(ValueError, match="multiples"):
        to_bsr(torch.zeros(64, 80), 32)
    with pytest.raises(TypeError):
        to_bsr(torch.zeros(64, 64, dtype=torch.int32), 32)
    with pytest.raises(ValueError, match="2-d"):
        to_bsr(torch.zeros(2, 64, 64), 32)


# ---- bsr_linear on the CPU ----

@pytest.mark.parametrize("bs", [16, 32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 7, 40, 67])
def test_bsr_linear_cpu_vs_reference(bs, dtype, tokens):
    w = random_block_sparse(5 * bs, 7 * bs, bs, 0.3, dtype, seed=tokens + bs, empty_rows=(2,))
    x = torch.randn(tokens, 7 * bs).to(dtype)
    bias = torch.randn(5 * bs).to(dtype)
    b = to_bsr(w, bs)
    for bb in (None, bias):
        y = bsr_linear(x, b, bb)
        assert y.dtype == dtype and y.shape == (tokens, 5 * bs)
        assert_within_torch_error(y, x, w, bb, reference_linear(x, w, bb))
    # The empty block row is exactly the bias.
    assert torch.equal(bsr_linear(x, b, bias)[:, 2 * bs: 3 * bs], bias[2 * bs: 3 * bs].expand(tokens, bs))


def test_bsr_linear_rounds_once():
    # fp32 accumulation then one rounding: a sum whose fp16 partial sums would lose the small terms.
    bs = 16
    w = torch.zeros(16, 64, dtype=torch.float16)
    w[0, :] = 1.0
    x = torch.full((1, 64), 1.0, dtype=torch.float16)
    x[0, 0] = 2048.0  # 2048 + 63 ones: fp16 running sums stall at 2048 (ulp 2)
    y = bsr_linear(x, to_bsr(w, bs))
    assert y[0, 0].item() == 2112.0  # 2111 rounded once (a running fp16 sum would give 2048)


def test_bsr_linear_leading_dims_zero_tokens_and_all_zero():
    w = random_block_sparse(64, 128, 32, 0.5)
    b = to_bsr(w, 32)
    x = torch.randn(2, 3, 128)
    y = bsr_linear(x, b)
    assert y.shape == (2, 3, 64)
    torch.testing.assert_close(y.double(), reference_linear(x.reshape(6, 128), w).reshape(2, 3, 64), rtol=1e-5, atol=1e-6)
    assert bsr_linear(torch.randn(0, 128), b).shape == (0, 64)
    z = to_bsr(torch.zeros(64, 128), 32)
    assert z.nnz_blocks == 0
    bias = torch.randn(64)
    assert torch.equal(bsr_linear(torch.randn(4, 128), z, bias), bias.expand(4, 64))


def test_bsr_linear_compiles_with_the_weight_object():
    w = random_block_sparse(128, 256, 32, 0.5, torch.bfloat16)
    b = to_bsr(w, 32)
    x = torch.randn(4, 256).bfloat16()
    torch._dynamo.reset()
    f = torch.compile(lambda x, b: bsr_linear(x, b), fullgraph=True)
    assert torch.equal(f(x, b), bsr_linear(x, b))


def test_bsr_linear_bad_input():
    w = random_block_sparse(64, 128, 32, 0.5, torch.float16)
    b = to_bsr(w, 32)
    op = ops.bsr_linear
    x = torch.randn(3, 128).half()
    with pytest.raises(TypeError, match="dtype"):
        bsr_linear(x.float(), b)
    with pytest.raises(TypeError, match="int32"):
        op(x, b.crow_indices.long(), b.col_indices, b.values, b.schedule, 128)
    with pytest.raises(ValueError, match=r"\[\.\.\., 128\]"):
        bsr_linear(torch.randn(3, 96).half(), b)
    with pytest.raises(ValueError, match="bias"):
        bsr_linear(x, b, torch.randn(32).half())
    with pytest.raises(TypeError, match="bias"):
        bsr_linear(x, b, torch.randn(64))
    with pytest.raises(ValueError, match="blocksize"):
        op(x, b.crow_indices, b.col_indices[:2], b.values[:2, :8, :8].contiguous(), b.schedule, 128)
    with pytest.raises(ValueError, match="schedule"):
        op(x, b.crow_indices, b.col_indices, b.values, b.schedule[:-1], 128)
    with pytest.raises(ValueError, match="in_features"):
        op(x[:, :120], b.crow_indices, b.col_indices, b.values, b.schedule, 120)
    col = b.col_indices.clone()
    col[-1] = 4
    with pytest.raises(ValueError, match="col_indices"):
        op(x, b.crow_indices, col, b.values, b.schedule, 128)
    crow = b.crow_indices.clone()
    crow[-1] += 1
    with pytest.raises(ValueError, match="crow_indices"):
        op(x, crow, b.col_indices, b.values, b.schedule, 128)


def test_bsr_direct_op_calls_raise_runtime_error_naming_the_type():
    # The contract for callers of torch.ops.tersor.* (no tersor wrapper): RuntimeError whose message starts
    # with the Python type the check means.
    b = to_bsr(random_block_sparse(64, 128, 32, 0.5, torch.float16), 32)
    x = torch.randn(3, 128).half()
    col = b.col_indices.clone()
    col[-1] = 4
    with pytest.raises(RuntimeError, match=r"^ValueError: bsr_linear: col_indices\["):
        torch.ops.tersor.bsr_linear(x, b.crow_indices, col, b.values, b.schedule, 128)
    with pytest.raises(RuntimeError, match=r"^TypeError: bsr_linear: values"):
        torch.ops.tersor.bsr_linear(x.float(), b.crow_indices, b.col_indices, b.values, b.schedule, 128)
    sched = b.schedule.clone()
    sched[0] = 7
    with pytest.raises(RuntimeError, match=r"^ValueError: _bsr_check: schedule row item 0"):
        torch.ops.tersor._bsr_check(b.crow_indices, b.col_indices, b.values, sched, 128)


# ---- the CUDA kernel replayed on the CPU ----

@pytest.mark.testing_ext
@pytest.mark.parametrize("bs", [16, 32, 64])
@pytest.mark.parametrize("dtype", LOW)
# tokens: one small tile; a large tile in split mode (partials); the whole-row mode with a ragged last tile.
@pytest.mark.parametrize("tokens", [1, 5, 37, 70])
def test_cuda_replay_vs_reference(bs, dtype, tokens):
    n, k = 4 * bs, 9 * bs
    w = random_block_sparse(n, k, bs, 0.6, dtype, seed=bs + tokens, empty_rows=(1,))
    b = to_bsr(w, bs, chunk_blocks=2)  # long rows are split: exercises the partial pass
    x = torch.randn(tokens, k).to(dtype)
    bias = torch.randn(n).to(dtype)
    got = T._bsr_emulate_cuda_linear(x, b.crow_indices, b.col_indices, b.values, b.schedule, k, bias)
    assert_within_torch_error(got, x, w, bias, reference_linear(x, w, bias))
    assert torch.equal(got[:, bs: 2 * bs], bias[bs: 2 * bs].expand(tokens, bs))


@pytest.mark.testing_ext
def test_cuda_replay_catches_a_wrong_layout():
    # The replay really reads the blocks through the layout: transposed values give a different answer.
    bs = 32
    w = random_block_sparse(64, 128, bs, 1.0, torch.float16)
    b = to_bsr(w, bs)
    x = torch.randn(3, 128).half()
    vt = b.values.transpose(1, 2).contiguous()
    good = T._bsr_emulate_cuda_linear(x, b.crow_indices, b.col_indices, b.values, b.schedule, 128)
    bad = T._bsr_emulate_cuda_linear(x, b.crow_indices, b.col_indices, vt, b.schedule, 128)
    ref = reference_linear(x, w)
    assert (good.double() - ref).abs().max() < 0.01 < (bad.double() - ref).abs().max()


@pytest.mark.testing_ext
def test_cuda_replay_rejects_fp32_and_bad_schedule():
    w = random_block_sparse(64, 128, 32, 0.5)
    b = to_bsr(w, 32, chunk_blocks=1)
    op = T._bsr_emulate_cuda_linear
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        op(torch.randn(2, 128), b.crow_indices, b.col_indices, b.values, b.schedule, 128)
    bh = b.to(dtype=torch.float16)
    sched = bh.schedule.clone()
    sched[0] = sched[4]  # two row items name the same row
    with pytest.raises(ValueError, match="schedule"):
        op(torch.randn(2, 128).half(), bh.crow_indices, bh.col_indices, bh.values, sched, 128)


# ---- CUDA ----

@pytest.mark.cuda
@pytest.mark.testing_ext
@pytest.mark.parametrize("bs", [16, 32, 64])
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("tokens", [1, 8, 13, 64, 65, 300])
def test_cuda_bsr_linear_vs_reference(bs, dtype, tokens):
    n, k = 8 * bs, 12 * bs
    w = random_block_sparse(n, k, bs, 0.3, dtype, seed=tokens, empty_rows=(0, 5))
    b = to_bsr(w, bs, chunk_blocks=2)
    x = torch.randn(tokens, k).to(dtype)
    bias = torch.randn(n).to(dtype)
    bc = b.to("cuda")
    for bb in (None, bias):
        got = bsr_linear(x.cuda(), bc, None if bb is None else bb.cuda()).cpu()
        assert_within_torch_error(got, x, w, bb, reference_linear(x, w, bb))
        replay = T._bsr_emulate_cuda_linear(x, b.crow_indices, b.col_indices, b.values, b.schedule,
                                                           k, bb)
        # Same schedule and roundings: at most one 16-bit ulp apart (MMA summation order).
        ulp = torch.finfo(dtype).eps * replay.double().abs().clamp(min=2**-14)
        assert ((got.double() - replay.double()).abs() <= ulp + 1e-30).all()
    again = bsr_linear(x.cuda(), bc, bias.cuda()).cpu()
    assert torch.equal(again, bsr_linear(x.cuda(), bc, bias.cuda()).cpu()), "not deterministic"


@pytest.mark.cuda
def test_cuda_bsr_linear_fp32_and_large():
    w = random_block_sparse(512, 1024, 64, 0.1)
    b = to_bsr(w, 64).to("cuda")
    x = torch.randn(3, 1024)
    torch.testing.assert_close(bsr_linear(x.cuda(), b).cpu().double(), reference_linear(x, w), rtol=1e-4, atol=1e-4)
    w16 = random_block_sparse(2048, 2048, 64, 0.1, torch.float16, seed=3)
    b16 = to_bsr(w16, 64).to("cuda")
    for tokens in (1, 16, 256):
        x16 = torch.randn(tokens, 2048).half()
        got = bsr_linear(x16.cuda(), b16).cpu()
        assert_within_torch_error(got, x16, w16, None, reference_linear(x16, w16))


@pytest.mark.cuda
def test_cuda_bsr_linear_device_mismatch():
    b = to_bsr(random_block_sparse(64, 64, 32, 1.0, torch.float16), 32)
    with pytest.raises(ValueError, match="device"):  # the error contract (issue 17): not a bare RuntimeError
        bsr_linear(torch.randn(2, 64).half().cuda(), b)



@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cuda_bsr_linear_rejects_bad_indices_on_direct_calls(dtype):
    # The kernel reads x and values at offsets taken from col_indices/schedule: the CUDA op must refuse
    # indices that never went through to_bsr/load_bsr, and re-check them after an in-place change.
    # (ops.bsr_linear is the op itself, torch.ops.tersor.bsr_linear, with its RuntimeErrors typed.)
    w = random_block_sparse(64, 128, 32, 0.5, dtype)
    b = to_bsr(w, 32).to("cuda")
    op = ops.bsr_linear
    x = torch.randn(3, 128, dtype=dtype, device="cuda")
    good = op(x, b.crow_indices, b.col_indices, b.values, b.schedule, 128)  # validated
    col = b.col_indices.clone()
    col[-1] = 1000
    with pytest.raises(ValueError, match="col_indices"):
        op(x, b.crow_indices, col, b.values, b.schedule, 128)
    sched = b.schedule.clone()
    sched[0] = 7  # a row item naming a block row that does not exist
    with pytest.raises(ValueError, match="schedule"):
        op(x, b.crow_indices, b.col_indices, b.values, sched, 128)
    saved = b.col_indices.clone()
    b.col_indices[-1] = 1000  # in place, same tensor: the op reads the indices again on every call
    with pytest.raises(ValueError, match="col_indices"):
        op(x, b.crow_indices, b.col_indices, b.values, b.schedule, 128)
    b.col_indices.copy_(saved)
    torch.testing.assert_close(op(x, b.crow_indices, b.col_indices, b.values, b.schedule, 128), good, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=r"^ValueError: bsr_linear: col_indices"):
        torch.ops.tersor.bsr_linear(x, b.crow_indices, col, b.values, b.schedule, 128)


@pytest.mark.cuda
def test_cuda_bsr_linear_graph_capture_after_warm_up():
    # Inside a CUDA-graph capture the host check cannot run: the op accepts index tensors an uncaptured call
    # validated (warm-up), and refuses others.
    w = random_block_sparse(128, 256, 32, 0.5, torch.float16)
    b = to_bsr(w, 32).to("cuda")
    x = torch.randn(4, 256, dtype=torch.float16, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ref = bsr_linear(x, b)  # warm-up: validated
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = bsr_linear(x, b)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, ref)
    fresh = to_bsr(w, 32).to("cuda")  # never seen: cannot be checked inside the capture
    g2 = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="captured"):
        with torch.cuda.graph(g2):
            bsr_linear(x, fresh)
