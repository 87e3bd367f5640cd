"""The sm90a quantized-attention kernel (csrc/attention/sage_attn_sm90.cu).

CPU: _sage_emulate_sm90_attention replays the whole sm90a CUDA path lane by lane (prologue with keys padded to
128, tile-native relayout, bulk copies into poisoned stages, wgmma through the kernel's descriptors, the
softmax per 64-key half, the epilogue) and must match the CPU twin as closely as the sm8x replay does.
_sage_sm90_layout_check replays the kernel's addressing (the tile-native relayout, the bulk copy of a
tile block into a shared stage, the wgmma descriptors it builds, its Q register loads, accumulator maps and
P packing, its scale-group indices) against an independent model of the PTX rules, with integer data, and
counts mismatches; each injected fault must be caught. The CUDA routing table (sage_route.h: which kernel
runs, or the NotImplementedError, per compute capability, mode and ``kernel`` argument) walked on the CPU.
GPU (``@pytest.mark.cuda``, Hopper only): the kernel against the CPU twin with the tolerance rule of
tests/test_attention.py, and against the sm8x kernels on the same device (``kernel="sm8x"``).
"""

import pytest
import torch

import tersor
from tersor import attention
from attention_reference import replay_mismatch as _replay_mismatch  # the sm8x replay's bound, same numerics
from conftest import HAS_TESTING_EXT

L = tersor.ops.lib  # the shipped ops
if HAS_TESTING_EXT:
    import tersor._testing

    T = tersor._testing.lib  # torch.ops.tersor_testing (tests marked testing_ext)

CHECKS = ["k tile bijection", "v tile bijection", "QK elements", "PV elements", "Q scale groups",
          "K scale groups", "P fragment rows/tokens"]


@pytest.mark.testing_ext
@pytest.mark.parametrize("head_dim", [64, 128])
def test_layout_check_consistent(head_dim):
    bad = T._sage_sm90_layout_check(head_dim)
    assert len(bad) == len(CHECKS)
    assert bad == [0] * len(CHECKS), dict(zip(CHECKS, bad))


# fault -> the checks that must see it (the others may or may not).
FAULTS = {
    1: ["QK elements"],             # K descriptor with LBO and SBO swapped
    2: ["PV elements", "P fragment rows/tokens"],  # P packed from the wrong n-tile pair
    3: ["QK elements"],             # K descriptor advanced 32 bytes per k-step instead of 2 core matrices
    4: ["QK elements"],             # Q A-registers 1 and 2 swapped
    5: ["K scale groups"],          # second key half uses the first half's K scales
    6: ["PV elements"],             # V^T tile written channel-major (core-matrix order transposed)
}


@pytest.mark.testing_ext
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_layout_check_catches_faults(head_dim, fault):
    bad = dict(zip(CHECKS, T._sage_sm90_layout_check(head_dim, fault)))
    for name in FAULTS[fault]:
        assert bad[name] > 0, (fault, bad)


@pytest.mark.testing_ext
def test_layout_check_bad_input():
    with pytest.raises(ValueError, match="head_dim"):
        T._sage_sm90_layout_check(96)
    with pytest.raises(ValueError, match="fault"):
        T._sage_sm90_layout_check(64, 7)


REPLAY_SHAPES = [  # b, hq, hkv, lq, lk, d, causal
    (1, 2, 1, 200, 300, 64, True),     # GQA, Lq < Lk, key tail inside the second 64-half
    (1, 2, 2, 129, 130, 128, False),   # one row past a CTA, one key past a 128-tile
    (1, 2, 2, 300, 100, 64, True),     # Lq > Lk: fully masked rows, second consumer warpgroup idle
    (2, 2, 1, 64, 257, 128, True),
]


def _replay_inputs(shape, dtype, seed=0):
    b, hq, hkv, lq, lk, d, _ = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=g).to(dtype)
    k = (torch.randn(b, hkv, lk, d, generator=g) + 1.0).to(dtype)
    v = torch.randn(b, hkv, lk, d, generator=g).to(dtype)
    return q, k, v


@pytest.mark.testing_ext
@pytest.mark.parametrize("shape", REPLAY_SHAPES)
@pytest.mark.parametrize("dtype,smooth_k", [(torch.float16, True), (torch.bfloat16, False)])
def test_sm90_replay_matches_cpu_twin(shape, dtype, smooth_k):
    q, k, v = _replay_inputs(shape, dtype)
    causal = shape[-1]
    out, lse = T._sage_emulate_sm90_attention(q, k, v, causal, 0.1, smooth_k)
    ref, ref_lse = L.sage_attention_fwd(q, k, v, causal, 0.1, 8, "fp8", smooth_k, False)
    assert out.shape == ref.shape and out.dtype == dtype and lse.shape == ref_lse.shape
    problem = _replay_mismatch(out, lse, ref, ref_lse)
    assert problem is None, problem


@pytest.mark.testing_ext
def test_sm90_replay_is_not_the_twin():
    # The replay runs its own (kernel) code path: different keys change its output like the twin's, and a
    # wrong scale is visible (guards against a replay that silently returns the twin or zeros).
    q, k, v = _replay_inputs((1, 1, 1, 70, 90, 64, False), torch.float16)
    a, _ = T._sage_emulate_sm90_attention(q, k, v, False, 0.1, True)
    b, _ = T._sage_emulate_sm90_attention(q, k, v, False, 0.2, True)
    assert a.abs().max() > 0 and (a.float() - b.float()).abs().max() > 1e-2


@pytest.mark.testing_ext
def test_sm90_replay_bad_input():
    q, k, v = _replay_inputs((1, 2, 2, 10, 12, 64, False), torch.float16)
    with pytest.raises(TypeError):
        T._sage_emulate_sm90_attention(q.float(), k.float(), v.float(), False, 0.1, True)
    with pytest.raises(ValueError):
        T._sage_emulate_sm90_attention(q[..., :32], k[..., :32], v[..., :32], False, 0.1, True)
    out, lse = T._sage_emulate_sm90_attention(q[:, :, :0], k, v, False, 0.1, True)
    assert out.shape == (1, 2, 0, 64) and lse.shape == (1, 2, 0)


# ---- the CUDA routing table (csrc/attention/sage_route.h), on the CPU -------------------------------------

CCS = (80, 86, 89, 90, 100, 120)
ROUTE_MODES = [(bits, pv, sq) for bits in (8, 4, 0) for pv in ("fp8", "fp16", "fp32") for sq in (False, True)]
KERNELS = ("auto", "sm8x", "sm90")
QK_NAME = {8: "int8", 4: "int4", 0: "none"}

# The architectures each kernel group is written for (CMakeLists.txt, the attention part).
GROUP_ARCHS = {"prologue": ("80", "89", "90a"), "s8_f16": ("80", "89", "90a"), "s8_e4m3": ("89", "90a"),
               "s4_f16": ("80", "89"), "s4_e4m3": ("89",), "sm90": ("90a",)}


def _cubins(arch_list):
    """The cubin spec of a build with TORCH_CUDA_ARCH_LIST = arch_list ("80", "89", "90a", ...): each group gets
    the listed archs it wants, as tersor_add_kernels picks them (a plain "90" entry is built as 90a for a 90a
    group)."""
    groups = []
    for group, want in GROUP_ARCHS.items():
        got = [a if a in want else a + "a" for a in arch_list if a in want or a + "a" in want]
        groups.append(f"{group}=" + ",".join(f"{a}-real" for a in got))
    return ";".join(groups)


DEFAULT_CUBINS = _cubins(("80", "89", "90a"))

# The table of the default build (8.0;8.9;9.0a), written out: the (qk_bits, pv) the mma.sync kernels run per
# compute capability (an sm_80 cubin runs on 8.6 and 8.9, sm_89 code only on 8.9, 90a code only on 9.0; no
# FP8 before 8.9, no INT4 from 9.0 on, no cubin at all for 10.0 / 12.0).
SM8X_DEFAULT = {80: {(8, "fp16"), (4, "fp16")}, 86: {(8, "fp16"), (4, "fp16")},
                89: {(8, "fp16"), (4, "fp16"), (8, "fp8"), (4, "fp8")}, 90: {(8, "fp16"), (8, "fp8")},
                100: set(), 120: set()}


def _default_route(cc, bits, pv, sq, kernel):
    """The expected path name of the default build, or None for NotImplementedError."""
    if bits == 0 or pv == "fp32":
        return None
    sm90 = cc == 90 and (bits, pv) == (8, "fp8") and not sq
    sm8x = (bits, pv) in SM8X_DEFAULT[cc]
    if kernel == "sm90":
        return "sm90a-wgmma" if sm90 else None
    if kernel == "auto" and sm90:
        return "sm90a-wgmma"
    return "sm8x-mma" if sm8x else None


def _runs(archs, cc):
    for a in archs:
        if a.endswith("a"):
            if cc == int(a[:-1]):
                return True
        elif cc // 10 == int(a) // 10 and cc % 10 >= int(a) % 10:
            return True
    return False


def _build_route(cc, bits, pv, sq, kernel, arch_list):
    """The expected path name of a build for arch_list (real cubins), or None."""
    built = {g: [a if a in want else a + "a" for a in arch_list if a in want or a + "a" in want]
             for g, want in GROUP_ARCHS.items()}
    if bits == 0 or pv == "fp32":
        return None
    group = {(8, "fp16"): "s8_f16", (8, "fp8"): "s8_e4m3", (4, "fp16"): "s4_f16", (4, "fp8"): "s4_e4m3"}[(bits, pv)]
    sm8x = _runs(built["prologue"], cc) and _runs(built[group], cc)
    sm90 = (bits, pv, sq) == (8, "fp8", False) and cc == 90 and _runs(built["prologue"], cc) and _runs(built["sm90"], cc)
    if kernel == "sm90":
        return "sm90a-wgmma" if sm90 else None
    if kernel == "auto" and sm90:
        return "sm90a-wgmma"
    return "sm8x-mma" if sm8x else None


def _check_route(route, cc, bits, pv, sq, kernel, expected):
    if expected is not None:
        assert route(cc, bits, pv, sq, kernel) == expected, (cc, bits, pv, sq, kernel)
        return
    with pytest.raises(NotImplementedError) as err:
        route(cc, bits, pv, sq, kernel)
    msg = str(err.value)
    if bits == 0 or pv == "fp32":
        assert "run on the CPU only" in msg, msg
    else:
        assert f"compute capability {cc // 10}.{cc % 10}" in msg, msg
    assert "supported on compute capability" in msg, msg


@pytest.mark.testing_ext
@pytest.mark.parametrize("cc", CCS)
def test_route_default_build(cc):
    route = lambda *a: T._sage_route_for(*a, DEFAULT_CUBINS)  # noqa: E731
    for bits, pv, sq in ROUTE_MODES:
        for kernel in KERNELS:
            _check_route(route, cc, bits, pv, sq, kernel, _default_route(cc, bits, pv, sq, kernel))


@pytest.mark.testing_ext
def test_route_messages_name_supported_modes():
    route = lambda *a: T._sage_route_for(*a, DEFAULT_CUBINS)  # noqa: E731
    with pytest.raises(NotImplementedError, match="no INT4 tensor cores") as err:
        route(90, 4, "fp8", True, "auto")
    assert 'qk_bits=8 pv="fp8", qk_bits=8 pv="fp16"' in str(err.value)
    assert 'kernel="sm90" (wgmma): qk_bits=8 pv="fp8" smooth_q=False' in str(err.value)
    with pytest.raises(NotImplementedError, match="FP8 tensor cores need sm_89") as err:
        route(86, 8, "fp8", False, "auto")
    assert 'qk_bits=8 pv="fp16", qk_bits=4 pv="fp16"' in str(err.value) and 'qk_bits=8 pv="fp8"' not in str(err.value)
    with pytest.raises(NotImplementedError, match="none") as err:
        route(100, 8, "fp16", False, "auto")
    with pytest.raises(NotImplementedError, match="CPU only"):
        route(89, 0, "fp32", False, "auto")
    with pytest.raises(NotImplementedError, match='kernel="sm90"'):
        route(90, 8, "fp8", True, "sm90")
    with pytest.raises(NotImplementedError, match='kernel="sm8x"'):
        route(90, 4, "fp16", False, "sm8x")


@pytest.mark.testing_ext
@pytest.mark.parametrize("arch_list", [("80",), ("89",), ("90a",), ("90",), ("80", "90a"), ("86",),
                                       ("80", "89", "90a", "100a", "120")])
def test_route_partial_builds(arch_list):
    spec = _cubins(arch_list)
    route = lambda *a: T._sage_route_for(*a, spec)  # noqa: E731
    for cc in CCS:
        for bits, pv, sq in ROUTE_MODES:
            for kernel in KERNELS:
                _check_route(route, cc, bits, pv, sq, kernel, _build_route(cc, bits, pv, sq, kernel, arch_list))


@pytest.mark.testing_ext
def test_route_ptx_entries_are_not_routed_to():
    spec = "prologue=80-real,80-virtual;s8_f16=80-real,80-virtual"
    assert T._sage_route_for(86, 8, "fp16", False, "auto", spec) == "sm8x-mma"
    with pytest.raises(NotImplementedError):
        T._sage_route_for(90, 8, "fp16", False, "auto", spec)


def test_route_bad_arguments():
    with pytest.raises(ValueError, match="kernel must be"):
        L._sage_route(90, 8, "fp8", False, "sm70")
    with pytest.raises(ValueError, match="pv must be"):
        L._sage_route(90, 8, "bf8", False, "auto")
    with pytest.raises(ValueError, match="qk_bits"):
        L._sage_route(90, 5, "fp8", False, "auto")
    with pytest.raises(ValueError, match="compute capability"):
        L._sage_route(-1, 8, "fp8", False, "auto")
    with pytest.raises(RuntimeError, match="^ValueError: _sage_route: kernel must be"):
        torch.ops.tersor._sage_route(90, 8, "fp8", False, "sm70")


@pytest.mark.testing_ext
def test_route_bad_cubin_spec():
    with pytest.raises(ValueError, match="cubins"):
        T._sage_route_for(90, 8, "fp8", False, "auto", "sm100=100a-real")


def _built_arch_list():
    info = tersor.build_info()
    if info["cuda"] != "1":
        return None
    return tuple(a[: -len("-real")] for a in info["cuda_archs"].split(",") if a.endswith("-real"))


def test_route_of_this_build():
    # tersor::_sage_route answers for this build's cubins: none in a CPU-only build; on a CUDA build those
    # CMake built for TORCH_CUDA_ARCH_LIST (the table of the partial-build test).
    arch_list = _built_arch_list()
    for cc in CCS:
        for bits, pv, sq in ROUTE_MODES:
            for kernel in KERNELS:
                expected = None if arch_list is None else _build_route(cc, bits, pv, sq, kernel, arch_list)
                _check_route(L._sage_route, cc, bits, pv, sq, kernel, expected)
                _check_route(tersor.ops.sage_route, cc, bits, pv, sq, kernel, expected)


def test_cuda_path_names(monkeypatch):
    cpu = torch.device("cpu")
    assert attention.cuda_path_name(cpu, "int8", "fp8") == "cpu-twin"
    assert attention.cuda_path_name(cpu, "none", "fp32") == "cpu-twin"
    # On CUDA, the name is this build's route for the device's compute capability (no GPU needed).
    cuda = torch.device("cuda", 0)
    arch_list = _built_arch_list()
    for cc in CCS:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, cc=cc: divmod(cc, 10))
        for bits, pv, sq in ROUTE_MODES:
            for kernel in KERNELS:
                expected = None if arch_list is None else _build_route(cc, bits, pv, sq, kernel, arch_list)
                name = lambda cc_, bits_, pv_, sq_, kernel_: attention.cuda_path_name(  # noqa: E731
                    cuda, QK_NAME[bits_], pv_, sq_, kernel=kernel_)
                _check_route(name, cc, bits, pv, sq, kernel, expected)


# ---- on a Hopper GPU ----------------------------------------------------------------------------------

def _hopper():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def _assert_close_to_twin(out, lse, cpu_out, cpu_lse):
    # The rule of tests/test_attention.py (ex2.approx, MMA summation order, rare e4m3 flips of one P entry).
    diff = (out.cpu().float() - cpu_out.float()).abs()
    peak = cpu_out.float().abs().max().item()
    eps = torch.finfo(cpu_out.dtype).eps
    assert diff.max().item() <= (2e-3 + eps) * peak, diff.max().item()
    assert diff.mean().item() <= 5e-6 * peak, diff.mean().item()
    assert torch.equal(lse.cpu().isinf(), cpu_lse.isinf())
    fin = cpu_lse.isfinite()
    torch.testing.assert_close(lse.cpu()[fin], cpu_lse[fin], rtol=0, atol=1e-3)


SHAPES = [  # b, hq, hkv, lq, lk, d, causal: tails of both tile sizes, GQA, Lq != Lk (bottom-right causal)
    (1, 2, 2, 128, 128, 128, False),
    (2, 4, 2, 1000, 1000, 128, True),
    (1, 4, 1, 300, 1100, 64, False),
    (1, 2, 2, 1100, 300, 64, True),   # fully masked rows
    (1, 2, 1, 77, 4097, 128, True),
    (1, 1, 1, 129, 65, 64, False),
]


@pytest.mark.cuda
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,smooth_k", [(torch.float16, True), (torch.bfloat16, False)])
@pytest.mark.parametrize("kernel", ["auto", "sm90", "sm8x"])
def test_sm90_matches_cpu_twin(shape, dtype, smooth_k, kernel):
    if not _hopper():
        pytest.skip("the sm90a kernel needs a compute-capability 9.0 GPU")
    b, hq, hkv, lq, lk, d, causal = shape
    q = torch.randn(b, hq, lq, d).to(dtype)
    k = (torch.randn(b, hkv, lk, d) + 1.0).to(dtype)
    v = torch.randn(b, hkv, lk, d).to(dtype)
    cpu_out, cpu_lse = L.sage_attention_fwd(q, k, v, causal, 0.1, 8, "fp8", smooth_k, False)
    out, lse = L.sage_attention_fwd(q.cuda(), k.cuda(), v.cuda(), causal, 0.1, 8, "fp8", smooth_k, False, kernel)
    assert out.is_cuda and out.dtype == dtype
    _assert_close_to_twin(out, lse, cpu_out, cpu_lse)


@pytest.mark.testing_ext
@pytest.mark.cuda
@pytest.mark.parametrize("shape", REPLAY_SHAPES)
def test_sm90_kernel_matches_replay(shape):
    if not _hopper():
        pytest.skip("the sm90a kernel needs a compute-capability 9.0 GPU")
    q, k, v = _replay_inputs(shape, torch.float16, seed=3)
    causal = shape[-1]
    rep, rep_lse = T._sage_emulate_sm90_attention(q, k, v, causal, 0.1, True)
    out, lse = L.sage_attention_fwd(q.cuda(), k.cuda(), v.cuda(), causal, 0.1, 8, "fp8", True, False)
    # ex2.approx (<= 2 ulp) and the wgmma's internal fp8 summation are not replayed: the CUDA-vs-twin rule.
    _assert_close_to_twin(out, lse, rep, rep_lse)


@pytest.mark.cuda
def test_sm90_long_sequence_and_strided():
    if not _hopper():
        pytest.skip("the sm90a kernel needs a compute-capability 9.0 GPU")
    b, h, n, d = 1, 2, 8192, 128
    q, k, v = (torch.randn(b, n, h, d, device="cuda").half().transpose(1, 2) for _ in range(3))  # bshd memory
    k = k + 1.0
    out, lse = L.sage_attention_fwd(q, k, v, True, d ** -0.5, 8, "fp8", True, False)
    out8, lse8 = L.sage_attention_fwd(q, k, v, True, d ** -0.5, 8, "fp8", True, False, "sm8x")
    # Same numerics contract, different summation orders: both within the twin rule of each other.
    _assert_close_to_twin(out, lse, out8.cpu(), lse8.cpu())
    assert attention.cuda_path_name(q.device, "int8", "fp8", kernel="sm8x") == "sm8x-mma"
    assert attention.cuda_path_name(q.device, "int8", "fp8") == "sm90a-wgmma"
