"""2:4 semi-structured sparsity: pruning, format v1 (against an independent packer written from
docs/formats.md), compress/decompress, the CPU linear and the CPU replay of the CUDA GEMV against float64
references, bad inputs, and CUDA-vs-CPU checks (marked cuda)."""

import pytest
import torch

import tersor
from conftest import HAS_TESTING_EXT
from tersor import sparse
from tersor.sparse import compress_2_4, decompress_2_4, load_2_4, prune_2_4

ops = tersor.ops.lib  # torch.ops.tersor with tersor's error types (ValueError, TypeError, NotImplementedError)
# The CPU replays of the CUDA kernels are test-only ops (tersor._C_testing); their tests are marked testing_ext.
T = tersor._testing.lib if HAS_TESTING_EXT else None
DTYPES = [torch.float16, torch.bfloat16]
# float32 2:4 weights: the CPU ops only (the exact path of a float32 SparseLinear)
CPU_DTYPES = DTYPES + [torch.float32]
EPS = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-24}
BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


# ---- independent references (no tersor calls) ----

def ref_prune(w: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """Keeps the two highest scores of each group of 4 (ties: lower index), one group at a time."""
    out = torch.zeros_like(w)
    m, k = w.shape
    for i in range(m):
        for c in range(0, k, 4):
            s = [(-float(score[i, c + j]), j) for j in range(4)]
            for _, j in sorted(s)[:2]:
                out[i, c + j] = w[i, c + j]
    return out


def ref_pack(w: torch.Tensor):
    """Format v1 written from its description in docs/formats.md, element by element."""
    m, k = w.shape
    values = torch.zeros(m // 16 * (k // 32) * 256, dtype=w.dtype)
    meta = [0] * (m // 16 * (k // 64) * 32)
    for row in range(m):
        for ch in range(k // 4):
            group = w[row, 4 * ch:4 * ch + 4]
            keep = [j for j in range(4) if group[j] != 0]
            keep += [j for j in range(4) if j not in keep][: 2 - len(keep)]
            keep.sort()
            for j, idx in enumerate(keep):
                kc = 2 * ch + j
                r, c = row % 16, kc % 16
                lane = 4 * (r % 8) + (c % 8) // 2
                slot = (c % 2) + 2 * (r // 8) + 4 * (c // 8)
                tile = (row // 16) * (k // 32) + kc // 16
                values[tile * 256 + lane * 8 + slot] = group[idx]
            nib = keep[0] | (keep[1] << 2)
            c = ch % 16
            lane = 4 * (r % 8) + 2 * (c // 8) + (c % 8) // 4 if (r := row % 16) is not None else 0
            word = ((row // 16) * (k // 64) + ch // 16) * 32 + lane
            meta[word] |= nib << (16 * (r // 8) + 4 * (c % 4))
    meta = torch.tensor([v - (1 << 32) if v >= 1 << 31 else v for v in meta], dtype=torch.int32)
    return values.view(m // 16, k // 32, 256), meta.view(m // 16, k // 64, 32)


def random_2_4(m, k, dtype, zero_frac=0.0):
    w = prune_2_4(torch.randn(m, k, dtype=torch.float64).to(dtype))
    if zero_frac:
        w[torch.rand(m, k) < zero_frac] = 0
    return w


def check_linear_close(y, x, w, bias, dtype):
    """|y - ref| <= 1 ulp of the output dtype at |ref| + fp32-accumulation slack (ref in float64)."""
    xd, wd = x.double().reshape(-1, w.shape[1]), w.double()
    ref = xd @ wd.T + (bias.double() if bias is not None else 0)
    mag = xd.abs() @ wd.abs().T
    err = (y.double().reshape(ref.shape) - ref).abs()
    bound = EPS[dtype] * ref.abs() + 1e-6 * mag + 1e-7
    assert bool((err <= bound).all()), f"max err {err.max().item():.3g}, worst ratio {(err / bound).max().item():.3g}"


# ---- pruning ----

@pytest.mark.parametrize("dtype", [torch.float32] + DTYPES)
def test_prune_magnitude_matches_reference(dtype):
    w = torch.randn(8, 32).to(dtype)
    w[0, :4] = 1.0  # full tie: keeps columns 0, 1
    w[1, 4:8] = torch.tensor([0.5, -2.0, 2.0, 0.1])  # |tie| between 5 and 6: keeps both (top 2)
    w[2, 8:12] = torch.tensor([-1.0, 1.0, 0.5, 1.0])  # three-way tie of 1.0: keeps 8 and 9
    p = prune_2_4(w)
    assert p.dtype == w.dtype and p.shape == w.shape
    assert torch.equal(p, ref_prune(w, w.float().abs()))
    assert torch.equal(p[0, :4], torch.tensor([1.0, 1.0, 0, 0]).to(dtype))
    assert torch.equal(p[2, 8:12], torch.tensor([-1.0, 1.0, 0, 0]).to(dtype))
    assert sparse.is_2_4(p)


def test_prune_wanda_matches_reference():
    w = torch.randn(16, 64)
    a = torch.rand(64) * 3
    p = prune_2_4(w, "wanda", a)
    assert torch.equal(p, ref_prune(w, w.abs() * a))
    assert torch.equal(prune_2_4(w, "wanda", torch.ones(64)), prune_2_4(w))
    assert not torch.equal(p, prune_2_4(w))  # the norms matter


def test_prune_bad_inputs():
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match="method"):
        prune_2_4(w, "random")
    with pytest.raises(ValueError, match="act_norm"):
        prune_2_4(w, "wanda")
    with pytest.raises(ValueError, match="act_norm"):
        prune_2_4(w, "wanda", torch.ones(7))
    with pytest.raises(ValueError, match="non-negative"):
        prune_2_4(w, "wanda", -torch.ones(8))
    with pytest.raises(ValueError, match="only used"):
        prune_2_4(w, "magnitude", torch.ones(8))
    with pytest.raises(ValueError, match="in % 4"):
        prune_2_4(torch.randn(4, 6))
    with pytest.raises(TypeError):
        prune_2_4(torch.ones(4, 8, dtype=torch.int32))


# ---- format v1 ----

@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("m,k", [(16, 64), (32, 128), (48, 192)])
def test_compress_matches_documented_layout(dtype, m, k):
    w = random_2_4(m, k, dtype, zero_frac=0.2)  # also chunks with 0 or 1 non-zeros
    w[3, :8] = 0
    v, meta = ops.sparse24_compress(w)
    rv, rmeta = ref_pack(w)
    assert v.shape == (m // 16, k // 32, 256) and meta.shape == (m // 16, k // 64, 32)
    assert torch.equal(v.view(BITS[dtype]), rv.view(BITS[dtype]))
    assert torch.equal(meta, rmeta)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_round_trip_bit_exact(dtype):
    w = random_2_4(64, 256, dtype, zero_frac=0.3)
    w[5, 16:20] = torch.tensor([0.0, -0.0, 0.0, 0.0]).to(dtype)
    w[7, 0:4] = torch.tensor([float("inf"), 0, float("nan"), 0]).to(dtype)
    packed = compress_2_4(w)
    # values: half the elements; meta: 4 bits per chunk of 4 (2 bits per kept value)
    assert packed.shape == w.shape and packed.nbytes() * 32 == w.numel() * (16 * w.element_size() + 4)
    d = decompress_2_4(packed)
    assert torch.equal(d.view(BITS[dtype])[:, :16], w.view(BITS[dtype])[:, :16])
    assert torch.equal(d.isnan(), w.isnan())
    assert torch.equal(torch.nan_to_num(d), torch.nan_to_num(w))
    load_2_4(packed.values, packed.meta, (64, 256))  # compress output passes the loader


def test_compress_refuses_dense_weight_naming_first_chunk():
    w = prune_2_4(torch.randn(32, 128).half())
    w[17, 40:44] = torch.tensor([1.0, 1.0, 1.0, 0.0])  # 3 non-zeros in chunk 10 of row 17
    w[20, 0:4] = 1.0
    with pytest.raises(ValueError, match=r"row 17, columns 40\.\.43 hold 3 non-zeros"):
        compress_2_4(w)


@pytest.mark.parametrize("bad,exc,msg", [
    (torch.zeros(16, 64, dtype=torch.float64), TypeError, "float16, bfloat16 or float32"),
    (torch.zeros(16, 64, dtype=torch.int16), TypeError, "float16, bfloat16 or float32"),
    (torch.zeros(8, 64, dtype=torch.half), ValueError, "multiple of 16"),
    (torch.zeros(16, 32, dtype=torch.half), ValueError, "multiple of 64"),
    (torch.zeros(64, dtype=torch.half), ValueError, "2-d"),
])
def test_compress_bad_inputs(bad, exc, msg):
    with pytest.raises(exc, match=msg):
        ops.sparse24_compress(bad)


def test_loader_rejects_corrupt_or_mismatched_tensors():
    p = compress_2_4(random_2_4(32, 128, torch.half))
    meta = p.meta.clone()
    meta[1, 0, 5] &= ~0xF0  # nibble 1 -> 0b0000 (invalid)
    with pytest.raises(ValueError, match="corrupt metadata"):
        load_2_4(p.values, meta)
    meta = p.meta.clone()
    meta[0, 1, 0] = (meta[0, 1, 0] & ~0xF) | 0b0001  # idx1 < idx0: not ordered
    with pytest.raises(ValueError, match="corrupt metadata"):
        load_2_4(p.values, meta)
    with pytest.raises(ValueError, match="expected"):
        load_2_4(p.values, p.meta, (32, 64))
    with pytest.raises(ValueError, match="meta must be"):
        load_2_4(p.values, p.meta[:, :1])
    with pytest.raises(TypeError):
        load_2_4(p.values.double(), p.meta)
    with pytest.raises(TypeError):
        load_2_4(p.values, p.meta.long())


@pytest.mark.parametrize("op", ["sparse24_decompress", "sparse24_linear",
                                pytest.param("_sparse24_emulate_cuda_linear", marks=pytest.mark.testing_ext)])
def test_ops_reject_bad_packed_shapes(op):
    p = compress_2_4(random_2_4(32, 128, torch.half))
    x = torch.randn(2, 128).half()
    lib = T if op.startswith("_") else ops
    f = (lambda v, m: getattr(lib, op)(v, m)) if op == "sparse24_decompress" else \
        (lambda v, m: getattr(lib, op)(x, v, m))
    with pytest.raises(ValueError, match="does not match"):
        f(p.values, p.meta[:, :1].contiguous())
    with pytest.raises(ValueError, match=r"\[M/16, K/32, 256\]"):
        f(p.values.reshape(2, 4, 2, 128), p.meta)
    with pytest.raises(ValueError, match="K % 64"):
        f(p.values[:, :3].contiguous(), p.meta[:, :1].contiguous())
    with pytest.raises(TypeError, match="int32"):
        f(p.values, p.meta.long())
    with pytest.raises(TypeError, match="must be float16"):
        f(p.values.double(), p.meta)
    if lib is T:  # the replay of a CUDA kernel: float32 values are CPU-only
        with pytest.raises(TypeError, match="float32 2:4 weights are CPU-only"):
            f(p.values.float(), p.meta)


# ---- linear ----

@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("lead", [(1,), (3,), (2, 4), (16,), (17,), (40,), (0,)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_cpu_vs_float64(dtype, lead, with_bias):
    m, k = 48, 320
    w = random_2_4(m, k, dtype)
    p = compress_2_4(w)
    x = torch.randn(*lead, k).to(dtype)
    b = torch.randn(m).to(dtype) if with_bias else None
    y = ops.sparse24_linear(x, p.values, p.meta, b)
    assert y.shape == (*lead, m) and y.dtype == dtype
    if x.numel():
        check_linear_close(y, x, w, b, dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_linear_widens_subnormal_and_extreme_weights_exactly(dtype):
    # The direct path widens whole tiles to fp32 (F16C for float16 where the CPU has it): subnormal, largest
    # finite and signed values must come out exact, and an inf weight must give inf/nan where the reference does.
    tiny = torch.finfo(dtype).tiny
    w = random_2_4(32, 128, dtype)
    nz = w != 0
    special = torch.tensor([tiny / 4, -tiny / 2, tiny * 3 / 8, torch.finfo(dtype).max, -torch.finfo(dtype).max, 1.0])
    w[nz] = special[torch.arange(int(nz.sum())) % len(special)].to(dtype)
    p = compress_2_4(w)
    assert torch.equal(decompress_2_4(p), w)
    x = torch.randn(3, 128).to(dtype) / 16
    y = ops.sparse24_linear(x, p.values, p.meta)
    ref = (x.double() @ w.double().T).to(dtype)
    finite = ref.isfinite()
    assert torch.equal(y.isfinite(), finite)
    check_linear_close(y[:, finite.all(0)], x, w[finite.all(0)], None, dtype)
    # Subnormal weights alone, x scaled so their products are O(1): a flushed or mis-widened subnormal shows.
    w_sub = torch.where(nz, special[torch.arange(w.numel()).view_as(w) % 3].to(dtype), torch.zeros((), dtype=dtype))
    assert bool((w_sub[nz].abs() < tiny).all())
    x_big = torch.randn(3, 128).to(dtype) * (2.0 ** (12 if dtype == torch.float16 else 120))
    ps = compress_2_4(w_sub)
    y_sub = ops.sparse24_linear(x_big, ps.values, ps.meta)
    assert y_sub.abs().max().item() > 1e-3
    check_linear_close(y_sub, x_big, w_sub, None, dtype)
    w_inf = w.clone()
    w_inf[0, nz[0].nonzero()[0, 0]] = float("inf")
    y_inf = ops.sparse24_linear(x, compress_2_4(w_inf).values, compress_2_4(w_inf).meta)
    ref_inf = (x.double() @ w_inf.double().T)
    assert torch.equal(y_inf[:, 0].isnan(), ref_inf[:, 0].isnan()) and torch.equal(y_inf[:, 0].isinf(), ref_inf[:, 0].isinf())


def test_linear_noncontiguous_x():
    w = random_2_4(32, 128, torch.half)
    p = compress_2_4(w)
    x = torch.randn(128, 6).half().T
    check_linear_close(ops.sparse24_linear(x, p.values, p.meta), x, w, None, torch.half)


def test_linear_bad_inputs():
    p = compress_2_4(random_2_4(32, 128, torch.half))
    with pytest.raises(TypeError, match="dtype"):
        ops.sparse24_linear(torch.randn(2, 128), p.values, p.meta)
    with pytest.raises(ValueError, match="in_features = 128"):
        ops.sparse24_linear(torch.randn(2, 64).half(), p.values, p.meta)
    with pytest.raises(ValueError, match="bias must be"):
        ops.sparse24_linear(torch.randn(2, 128).half(), p.values, p.meta, torch.randn(16).half())
    with pytest.raises(TypeError, match="bias"):
        ops.sparse24_linear(torch.randn(2, 128).half(), p.values, p.meta, torch.randn(32))


def test_direct_op_calls_raise_runtime_error_naming_the_type():
    # The contract for callers of torch.ops.tersor.* (no tersor wrapper): RuntimeError whose message starts
    # with the Python type the check means.
    p = compress_2_4(random_2_4(32, 128, torch.half))
    with pytest.raises(RuntimeError, match=r"^ValueError: sparse24_linear: x's last dim must be in_features = 128"):
        torch.ops.tersor.sparse24_linear(torch.randn(2, 64).half(), p.values, p.meta)
    with pytest.raises(RuntimeError, match=r"^TypeError: sparse24_linear: x must have the weight's dtype"):
        torch.ops.tersor.sparse24_linear(torch.randn(2, 128), p.values, p.meta)
    with pytest.raises(RuntimeError, match=r"^ValueError: sparse24_linear: path must be auto, gemv, gemm or sm90"):
        torch.ops.tersor.sparse24_linear(torch.randn(2, 128).half(), p.values, p.meta, None, "fast")
    with pytest.raises(RuntimeError, match=r"^ValueError: sparse24_compress: the weight is not 2:4 sparse"):
        torch.ops.tersor.sparse24_compress(torch.ones(16, 64).half())


# ---- the path argument (a CUDA kernel choice; the CPU checks it and computes the same product) ----

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 16, 17, 40])
def test_linear_cpu_same_product_for_every_path(dtype, rows):
    w = random_2_4(48, 192, dtype)
    p = compress_2_4(w)
    x = torch.randn(rows, 192).to(dtype)
    b = torch.randn(48).to(dtype)
    ref = ops.sparse24_linear(x, p.values, p.meta, b)
    check_linear_close(ref, x, w, b, dtype)
    for kernel in ("auto", "gemm", "sm90") + (("gemv",) if rows <= 16 else ()):
        assert torch.equal(ops.sparse24_linear(x, p.values, p.meta, b, kernel), ref), kernel
        assert torch.equal(tersor.ops.sparse24_linear(x, p.values, p.meta, b, path=kernel), ref), kernel
        assert torch.equal(sparse.linear_2_4(x, p, b, path=kernel), ref), kernel


def test_linear_cpu_rejects_bad_path_arguments():
    p = compress_2_4(random_2_4(16, 64, torch.half))
    with pytest.raises(ValueError, match="path must be auto, gemv, gemm or sm90, got 'fast'"):
        ops.sparse24_linear(torch.randn(2, 64).half(), p.values, p.meta, None, "fast")
    with pytest.raises(ValueError, match="path='gemv' takes at most 16 rows of x, got 17"):
        ops.sparse24_linear(torch.randn(17, 64).half(), p.values, p.meta, None, "gemv")
    with pytest.raises(ValueError, match="at most 16 rows of x, got 18"):
        sparse.linear_2_4(torch.randn(3, 6, 64).half(), p, path="gemv")


def test_linear_path_argument_in_the_fake():
    # torch.compile traces through the fake: it accepts what the op accepts and raises the same types.
    p = compress_2_4(random_2_4(16, 64, torch.half))
    x = torch.randn(4, 64).half()
    torch._dynamo.reset()
    f = torch.compile(lambda x, kernel: tersor.ops.sparse24_linear(x, p.values, p.meta, path=kernel), fullgraph=True)
    assert torch.equal(f(x, "gemv"), ops.sparse24_linear(x, p.values, p.meta))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fx, fv, fm = (mode.from_tensor(t) for t in (torch.randn(17, 64).half(), p.values, p.meta))
        assert torch.ops.tersor.sparse24_linear(fx, fv, fm, None, "gemm").shape == (17, 16)
        with pytest.raises(ValueError, match="path must be"):
            torch.ops.tersor.sparse24_linear(fx, fv, fm, None, "fast")
        with pytest.raises(ValueError, match="at most 16"):
            torch.ops.tersor.sparse24_linear(fx, fv, fm, None, "gemv")


# ---- the CUDA GEMV's lane-by-lane replay (catches fragment/metadata layout bugs on a CPU) ----

@pytest.mark.testing_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k", [(16, 64), (48, 192), (32, 64 * 9), (16, 64 * 17)])
@pytest.mark.parametrize("rows", [1, 5, 8, 9, 16])
def test_emulated_cuda_gemv_vs_float64(dtype, m, k, rows):
    w = random_2_4(m, k, dtype, zero_frac=0.1)
    p = compress_2_4(w)
    x = torch.randn(rows, k).to(dtype)
    b = torch.randn(m).to(dtype)
    y = T._sparse24_emulate_cuda_linear(x, p.values, p.meta, b)
    assert y.shape == (rows, m)
    check_linear_close(y, x, w, b, dtype)


@pytest.mark.testing_ext
def test_emulated_gemv_sees_every_metadata_position():
    # One non-zero per row at a chosen position: a wrong lane/bit in the metadata mapping moves it.
    m, k = 16, 128
    for pos in range(4):
        w = torch.zeros(m, k, dtype=torch.half)
        for r in range(m):
            for ch in range(k // 4):
                w[r, 4 * ch + (pos + r + ch) % 4] = float((r * 7 + ch) % 11 + 1)
        p = compress_2_4(w)
        x = torch.eye(k)[:16].half()  # picks columns 0..15 of W
        y = T._sparse24_emulate_cuda_linear(x, p.values, p.meta)
        assert torch.equal(y.float(), w[:, :16].float().T)
        x = torch.eye(k)[k - 16:].half()
        assert torch.equal(T._sparse24_emulate_cuda_linear(x, p.values, p.meta).float(), w[:, k - 16:].float().T)


@pytest.mark.testing_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,rows", [(16, 64, 17), (144, 128, 40), (32, 192, 130), (272, 64, 21)])
def test_emulated_cuda_gemm_vs_float64(dtype, m, k, rows):
    # > 16 rows: the tiled GEMM (partial 128-row W tiles and 128-row x tiles, zero-filled copies).
    w = random_2_4(m, k, dtype, zero_frac=0.1)
    p = compress_2_4(w)
    x = torch.randn(rows, k).to(dtype)
    b = torch.randn(m).to(dtype)
    y = T._sparse24_emulate_cuda_linear(x, p.values, p.meta, b)
    assert y.shape == (rows, m)
    check_linear_close(y, x, w, b, dtype)


@pytest.mark.testing_ext
def test_gemm_padding_rows_feed_valid_metadata():
    # Issue 17.5: both GEMMs pad a CTA tile past M by loading the last valid row block again
    # (gemm_stage_row_block), never zeros: a zero nibble is not an ordered pair, undefined for
    # mma.sp::ordered_metadata. The replays check every nibble an MMA reads, so a tile with padding rows
    # (M = 48: 3 of the 8 row blocks of a 128-row tile; sm90: of a 128-row tile too) passes only under that rule.
    w = random_2_4(48, 128, torch.half)
    p = compress_2_4(w)
    x = torch.randn(40, 128).half()
    check_linear_close(T._sparse24_emulate_cuda_linear(x, p.values, p.meta), x, w, None, torch.half)
    xs = torch.randn(130, 128).half()  # the sm90 replay's tile path (>= 128 rows of x)
    check_linear_close(T._sparse24_emulate_sm90_linear(xs, p.values, p.meta), xs, w, None, torch.half)
    # ... and the check itself fires on a nibble that is not an ordered pair (bypassing load_2_4)
    meta = p.meta.clone()
    meta[1, 0, 5] &= ~0xF0
    with pytest.raises(RuntimeError, match="ordered pair"):
        T._sparse24_emulate_cuda_linear(x, p.values, meta)
    with pytest.raises(RuntimeError, match="ordered pair"):
        T._sparse24_emulate_cuda_linear(x[:3], p.values, meta)  # the GEMV replay reads it too


@pytest.mark.testing_ext
def test_emulated_gemm_sees_every_x_column():
    # x = identity rows: a swizzle/ldmatrix mix-up moves a column of W to the wrong output.
    m, k = 32, 128
    w = random_2_4(m, k, torch.half)
    p = compress_2_4(w)
    x = torch.eye(k).half()
    y = T._sparse24_emulate_cuda_linear(x, p.values, p.meta)
    assert torch.equal(y, w.T.contiguous())


# ---- CUDA vs CPU (run on a GPU machine) ----

def _torch_lowp_err(x, w, b, ref):
    y = torch.nn.functional.linear(x, w, b)
    return (y.double() - ref).abs().max().item()


@pytest.mark.cuda
@pytest.mark.testing_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k", [(16, 64), (256, 1024), (4096, 4096), (48, 64 * 9), (272, 128)])
@pytest.mark.parametrize("rows", [1, 4, 8, 9, 16, 33, 130])
def test_cuda_linear_vs_reference(dtype, m, k, rows):
    w = random_2_4(m, k, dtype)
    p = compress_2_4(w).to("cuda")
    x = torch.randn(rows, k).to(dtype)
    b = torch.randn(m).to(dtype)
    y = ops.sparse24_linear(x.cuda(), p.values, p.meta, b.cuda()).cpu()
    ref = x.double() @ w.double().T + b.double()
    err = (y.double() - ref).abs().max().item()
    torch_err = _torch_lowp_err(x.cuda(), w.cuda(), b.cuda(), ref.cuda())
    assert err <= 2 * torch_err + 1e-6, (err, torch_err)
    if m * k * rows > 2**26:
        return  # the lane-by-lane replay is too slow for the big shapes
    # The kernel (GEMV or GEMM) agrees with its CPU replay up to fp32 summation order + one rounding.
    pc = compress_2_4(w)
    e = T._sparse24_emulate_cuda_linear(x, pc.values, pc.meta, b)
    assert (y.double() - e.double()).abs().max().item() <= 2 * EPS[dtype] * e.double().abs().max().item()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_compress_decompress_bit_exact(dtype):
    w = random_2_4(256, 512, dtype, zero_frac=0.2)
    pc = compress_2_4(w)
    pg = compress_2_4(w.cuda())
    assert torch.equal(pg.values.cpu().view(torch.int16), pc.values.view(torch.int16))
    assert torch.equal(pg.meta.cpu(), pc.meta)
    assert torch.equal(decompress_2_4(pg).cpu().view(torch.int16), w.view(torch.int16))


@pytest.mark.cuda
def test_cuda_compress_refuses_dense_weight():
    w = prune_2_4(torch.randn(32, 128).half())
    w[3, 8:12] = 1.0  # 4 non-zeros
    with pytest.raises(ValueError, match=r"row 3, columns 8\.\.11"):
        compress_2_4(w.cuda())


@pytest.mark.cuda
def test_cuda_gemv_deterministic():
    w = random_2_4(1024, 4096, torch.bfloat16)
    p = compress_2_4(w).to("cuda")
    x = torch.randn(7, 4096, device="cuda").bfloat16()
    y0 = ops.sparse24_linear(x, p.values, p.meta)
    for _ in range(3):
        assert torch.equal(ops.sparse24_linear(x, p.values, p.meta), y0)
