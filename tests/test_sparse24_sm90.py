"""2:4 sparse GEMM for Hopper (wgmma.mma_async.sp, sm90a): the x-tile store/descriptor agreement, the CPU
replay of the kernel (_sparse24_emulate_sm90_linear) against float64 references incl. M / N tails, fault
injection (a wrong mapping must be caught), the CUDA routing table (which kernel runs, for every compute
capability, on the CPU), and the kernel itself against the CPU op on a compute-capability 9.0 GPU (marked
cuda; skipped elsewhere)."""

import pytest
import torch

import tersor
from conftest import HAS_TESTING_EXT
from tersor.sparse import compress_2_4
from tersor.sparse.semi_structured import cuda_path_2_4
from test_sparse24 import EPS, check_linear_close, random_2_4  # the 2:4 suite's data and error rule

ops = tersor.ops.lib  # torch.ops.tersor with tersor's error types
# The replays and layout checks are test-only ops (tersor._C_testing); their tests are marked testing_ext.
T = tersor._testing.lib if HAS_TESTING_EXT else None
DTYPES = [torch.float16, torch.bfloat16]


# ---- the x tile: what the copies store is what wgmma reads through the descriptor ----

@pytest.mark.testing_ext
def test_x_tile_store_matches_descriptor_reads():
    checked, bad = T._sparse24_sm90_layout_check().tolist()
    # 256 x 64 elements stored + 2 wgmma x 2 k-tiles x 128 x 32 read.
    assert checked == 256 * 64 + 2 * 2 * 128 * 32
    assert bad == 0


@pytest.mark.testing_ext
def test_x_tile_check_catches_swapped_lbo_sbo():
    checked, bad = T._sparse24_sm90_layout_check(1).tolist()
    assert checked == 256 * 64 + 2 * 2 * 128 * 32
    assert bad > 0


# ---- the kernel replayed lane by lane ----

@pytest.mark.testing_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,rows", [(16, 64, 1), (128, 128, 256), (144, 128, 40), (208, 192, 257),
                                      (272, 64, 300)])
def test_emulated_sm90_vs_float64(dtype, m, k, rows):
    # Tails: M % 128 (partial warpgroups, clamped row blocks), N % 256 and N % 128 (clamped x rows), one and
    # several k-steps (pipeline stages).
    w = random_2_4(m, k, dtype, zero_frac=0.1)
    p = compress_2_4(w)
    x = torch.randn(rows, k).to(dtype)
    b = torch.randn(m).to(dtype)
    y = T._sparse24_emulate_sm90_linear(x, p.values, p.meta, b)
    assert y.shape == (rows, m)
    check_linear_close(y, x, w, b, dtype)


@pytest.mark.testing_ext
def test_emulated_sm90_several_launch_groups():
    # 18 W tiles (a full group of 16 + a partial one) x 2 x tiles: the grouped launch order must still give
    # every output tile to exactly one block (the replay's output starts as NaN).
    m, k, rows = 16 * 8 * 17 + 16, 64, 300
    w = random_2_4(m, k, torch.bfloat16)
    p = compress_2_4(w)
    x = torch.randn(rows, k).bfloat16()
    y = T._sparse24_emulate_sm90_linear(x, p.values, p.meta)
    check_linear_close(y, x, w, None, torch.bfloat16)


@pytest.mark.testing_ext
def test_emulated_sm90_no_bias_and_3d_input():
    w = random_2_4(64, 128, torch.bfloat16)
    p = compress_2_4(w)
    x = torch.randn(2, 3, 128).bfloat16()
    y = T._sparse24_emulate_sm90_linear(x, p.values, p.meta)
    assert y.shape == (2, 3, 64)
    check_linear_close(y, x, w, None, torch.bfloat16)


@pytest.mark.testing_ext
def test_emulated_sm90_sees_every_x_column_and_metadata_position():
    # x = identity rows: a B-layout mix-up moves a column of W to the wrong output; one non-zero per chunk at
    # a rotating position exercises every metadata index of every lane.
    m, k = 64, 256
    w = torch.zeros(m, k, dtype=torch.half)
    for r in range(m):
        for ch in range(k // 4):
            w[r, 4 * ch + (r + ch) % 4] = float((r * 7 + ch) % 11 + 1)
    p = compress_2_4(w)
    x = torch.eye(k).half()
    assert torch.equal(T._sparse24_emulate_sm90_linear(x, p.values, p.meta), w.T.contiguous())


@pytest.mark.testing_ext
@pytest.mark.parametrize("fault", [1, 2, 3])
def test_emulated_sm90_catches_injected_faults(fault):
    # 1: one selector for both k-tiles, 2: LBO/SBO swapped, 3: warps read their neighbour's row block.
    w = random_2_4(128, 128, torch.half)
    p = compress_2_4(w)
    x = torch.randn(40, 128).half()
    good = T._sparse24_emulate_sm90_linear(x, p.values, p.meta)
    check_linear_close(good, x, w, None, torch.half)
    bad = T._sparse24_emulate_sm90_linear(x, p.values, p.meta, None, fault)
    assert not torch.allclose(bad.float(), good.float(), atol=1e-2, rtol=1e-2)


@pytest.mark.testing_ext
def test_emulated_sm90_bad_inputs():
    p = compress_2_4(random_2_4(16, 64, torch.half))
    with pytest.raises(ValueError, match="fault"):
        T._sparse24_emulate_sm90_linear(torch.randn(2, 64).half(), p.values, p.meta, None, 7)
    with pytest.raises(ValueError, match="in_features = 64"):
        T._sparse24_emulate_sm90_linear(torch.randn(2, 32).half(), p.values, p.meta)
    with pytest.raises(TypeError, match="dtype"):
        T._sparse24_emulate_sm90_linear(torch.randn(2, 64), p.values, p.meta)
    with pytest.raises(ValueError, match="fault"):
        T._sparse24_sm90_layout_check(2)


def test_forced_path_is_accepted_by_the_cpu_op():
    # path names a CUDA kernel; the CPU op checks the name and computes the same product for every kernel,
    # whatever this machine or build could run on a GPU.
    w = random_2_4(16, 64, torch.half)
    p = compress_2_4(w)
    x = torch.randn(3, 64).half()
    y = ops.sparse24_linear(x, p.values, p.meta, path="sm90")
    check_linear_close(y, x, w, None, torch.half)
    assert torch.equal(y, ops.sparse24_linear(x, p.values, p.meta))


# ---- the routing table (sparse24_route.h through _sparse24_route), for every compute capability ----

CCS = [80, 86, 89, 90, 100, 120]


@pytest.mark.parametrize("cc", CCS)
@pytest.mark.parametrize("cubin", [False, True])
def test_route_auto(cc, cubin):
    sm90 = cc == 90 and cubin  # wgmma.sp is sm90a: compute capability 9.0 exactly, and only with its cubin
    for rows in (0, 1, 8, 16):
        assert ops._sparse24_route(cc, rows, "auto", cubin) == "gemv"
    for rows in (17, 64, 127):
        assert ops._sparse24_route(cc, rows, "auto", cubin) == "gemm"
    for rows in (128, 129, 1000, 1 << 20):
        assert ops._sparse24_route(cc, rows, "auto", cubin) == ("sm90" if sm90 else "gemm")
    assert tersor.ops.sparse24_route(cc, 300, has_sm90_cubin=cubin) == ("sm90" if sm90 else "gemm")


@pytest.mark.parametrize("cc", CCS)
@pytest.mark.parametrize("cubin", [False, True])
def test_route_forced(cc, cubin):
    for rows in (1, 16):
        assert ops._sparse24_route(cc, rows, "gemv", cubin) == "gemv"
    for rows in (1, 16, 17, 300):
        assert ops._sparse24_route(cc, rows, "gemm", cubin) == "gemm"
    with pytest.raises(ValueError, match="path='gemv' takes at most 16 rows of x, got 17"):
        ops._sparse24_route(cc, 17, "gemv", cubin)
    with pytest.raises(ValueError, match="path must be auto, gemv, gemm or sm90, got 'fast'"):
        ops._sparse24_route(cc, 4, "fast", cubin)
    if cc == 90 and cubin:
        for rows in (1, 17, 300):
            assert ops._sparse24_route(cc, rows, "sm90", cubin) == "sm90"
    else:
        # Never a silent fallback: NotImplementedError naming what this architecture supports.
        with pytest.raises(NotImplementedError, match=rf"path='sm90' cannot run on compute capability "
                           rf"{cc // 10}\.{cc % 10}.*compute-capability 9\.0.*supports path = auto, gemv, gemm$"):
            ops._sparse24_route(cc, 300, "sm90", cubin)


def test_route_pre_ampere_and_defaults():
    for cc in (70, 75):
        with pytest.raises(NotImplementedError, match=rf"compute capability {cc // 10}\.{cc % 10}: .*need compute "
                           r"capability 8\.0 or newer"):
            ops._sparse24_route(cc, 4)
    with pytest.raises(ValueError, match="rows must be non-negative"):
        ops._sparse24_route(80, -1)
    # Defaults: path "auto", has_sm90_cubin = this build's (a CPU build has no sm90a cubin).
    has_cubin = any(a.startswith("90") for a in tersor.ops.build_info()["cuda_archs"].split(",") if a)
    assert ops._sparse24_route(90, 500) == ("sm90" if has_cubin else "gemm")
    assert ops._sparse24_route(90, 500) == tersor.ops.sparse24_route(90, 500)
    # The direct-call contract: a RuntimeError whose message names the Python type.
    with pytest.raises(RuntimeError, match=r"^NotImplementedError: _sparse24_route: path='sm90'"):
        torch.ops.tersor._sparse24_route(80, 300, "sm90", False)


# ---- the kernel on a Hopper GPU ----

def _sm90_built():
    archs = tersor.ops.build_info().get("cuda_archs", "")
    return any(a.startswith("90") for a in archs.split(","))


def _is_sm90():
    """A compute-capability 9.0 GPU and a build with the sm90a cubin (else the sm90 path cannot run)."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0) and _sm90_built()


def _torch_lowp_err(x, w, b, ref):
    y = torch.nn.functional.linear(x, w, b)
    return (y.double() - ref).abs().max().item()


@pytest.mark.cuda
@pytest.mark.testing_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,rows", [(16, 64, 1), (144, 128, 40), (208, 192, 257), (4096, 4096, 512),
                                      (272, 128, 130), (1024, 1024, 1000)])
def test_cuda_sm90_vs_cpu_and_replay(dtype, m, k, rows):
    if not _is_sm90():
        pytest.skip("needs a compute-capability 9.0 GPU and the sm90a cubin")
    w = random_2_4(m, k, dtype)
    p = compress_2_4(w)
    pc = p.to("cuda")
    x = torch.randn(rows, k).to(dtype)
    b = torch.randn(m).to(dtype)
    y = ops.sparse24_linear(x.cuda(), pc.values, pc.meta, b.cuda(), path="sm90").cpu()
    ref = x.double() @ w.double().T + b.double()
    err = (y.double() - ref).abs().max().item()
    torch_err = _torch_lowp_err(x.cuda(), w.cuda(), b.cuda(), ref.cuda())
    assert err <= 2 * torch_err + 1e-6, (err, torch_err)
    y_cpu = ops.sparse24_linear(x, p.values, p.meta, b)
    assert (y.double() - y_cpu.double()).abs().max().item() <= 2 * EPS[dtype] * ref.abs().max().item() + 1e-6
    if m * k * rows <= 2**24:
        e = T._sparse24_emulate_sm90_linear(x, p.values, p.meta, b)
        assert (y.double() - e.double()).abs().max().item() <= 2 * EPS[dtype] * e.double().abs().max().item()


@pytest.mark.cuda
@pytest.mark.parametrize("path", ["gemv", "gemm", "sm90"])
def test_cuda_every_forced_path_vs_cpu(path):
    if path == "sm90" and not _is_sm90():
        pytest.skip("needs a compute-capability 9.0 GPU and the sm90a cubin")
    w = random_2_4(256, 512, torch.bfloat16)
    p = compress_2_4(w)
    pc = p.to("cuda")
    rows = 16 if path == "gemv" else 300
    x = torch.randn(rows, 512).bfloat16()
    assert cuda_path_2_4(rows, path) == path
    y = ops.sparse24_linear(x.cuda(), pc.values, pc.meta, path=path).cpu()
    check_linear_close(y, x, w, None, torch.bfloat16)


@pytest.mark.cuda
def test_cuda_route_matches_this_device():
    # The helper asks the op's own table with this GPU's compute capability and this build's cubins.
    major, minor = torch.cuda.get_device_capability()
    for rows in (1, 16, 17, 300):
        assert cuda_path_2_4(rows) == ops._sparse24_route(10 * major + minor, rows)
    assert cuda_path_2_4(300) == ("sm90" if _is_sm90() else "gemm")


@pytest.mark.cuda
def test_cuda_forced_path_errors():
    p = compress_2_4(random_2_4(16, 64, torch.half)).to("cuda")
    x = torch.randn(40, 64).half().cuda()
    with pytest.raises(ValueError, match="at most 16"):
        ops.sparse24_linear(x, p.values, p.meta, path="gemv")
    with pytest.raises(ValueError, match="gemv, gemm or sm90"):
        ops.sparse24_linear(x, p.values, p.meta, path="fast")
    if not _is_sm90():
        # Never a silent fallback to another kernel: NotImplementedError naming what this GPU supports.
        with pytest.raises(NotImplementedError, match="compute-capability 9.0.*supports path = auto, gemv, gemm"):
            ops.sparse24_linear(x, p.values, p.meta, path="sm90")
        with pytest.raises(NotImplementedError, match="path='sm90'"):
            cuda_path_2_4(300, "sm90")

