"""Block-sparse quantized attention (issue 16): ``block_mask`` of sage_attention / sage_attention_fwd.

The CPU twin skips the tiles of masked key blocks as the kernels do; checked against the independent references
of tests/attention_reference.py with the masked blocks' scores set to -inf (the fp64 reference for the exact
mode, the vectorized emulation for the quantized modes, with the tolerances of tests/test_attention.py), an
all-true mask bit-identical to no mask, the skip itself (a masked block's K/V are never read), empty rows, bad
masks, the lane-by-lane CUDA replays with a mask, and the CUDA kernels against the twin where a GPU exists.
"""

import math

import pytest
import torch

import tersor
from tersor import attention
from tersor.attention import BLOCK_K, BLOCK_Q, block_mask_shape, sage_attention
from attention_reference import (assert_twin_matches_emulation, attention_fp64, replay_mismatch, sage_emulate,
                                 token_mask)
from conftest import HAS_TESTING_EXT

L = tersor.ops.lib

SHAPES = [  # b, hq, hkv, lq, lk, d, causal
    (1, 4, 2, 300, 400, 64, False),   # GQA, tails in both
    (1, 2, 1, 260, 390, 128, True),   # Lq < Lk causal (bottom-right)
    (2, 2, 2, 400, 250, 64, True),    # Lq > Lk causal: fully masked rows already
    (1, 2, 2, 129, 129, 64, True),    # one-row / one-key tail blocks
]

MODES = [  # qk_bits, pv, smooth_k, smooth_q (those of tests/test_attention.py)
    (8, "fp8", True, False),
    (4, "fp8", True, True),
    (8, "fp16", False, False),
    (8, "fp16", True, True),
]


def _qkv(shape, dtype=torch.float16, seed=0):
    b, hq, hkv, lq, lk, d, _ = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=g).to(dtype)
    k = (torch.randn(b, hkv, lk, d, generator=g) * 2 + 1.5).to(dtype)
    v = torch.randn(b, hkv, lk, d, generator=g).to(dtype)
    return q, k, v


def _random_mask(shape, heads, density=0.5, seed=1):
    b, hq, _, lq, lk, _, _ = shape
    g = torch.Generator().manual_seed(seed)
    return torch.rand(block_mask_shape(b, heads, lq, lk), generator=g) < density


def test_block_constants_are_the_kernel_tiles():
    assert BLOCK_Q == 128 and BLOCK_K == 128
    assert block_mask_shape(2, 3, 129, 128) == (2, 3, 2, 1)
    assert block_mask_shape(1, 1, 1, 257) == (1, 1, 1, 3)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", MODES + [(0, "fp32", True, False)])
@pytest.mark.parametrize("heads", ["one", "all"])
def test_all_true_mask_is_bit_identical_to_no_mask(shape, mode, heads):
    bits, pv, sk, sq = mode
    dtype = torch.float32 if bits == 0 else torch.float16
    q, k, v = _qkv(shape, dtype)
    causal = shape[-1]
    mask = torch.ones(block_mask_shape(shape[0], 1 if heads == "one" else shape[1], shape[3], shape[4]),
                      dtype=torch.bool)
    out, lse = L.sage_attention_fwd(q, k, v, causal, 0.1, bits, pv, sk, sq)
    out_m, lse_m = L.sage_attention_fwd(q, k, v, causal, 0.1, bits, pv, sk, sq, block_mask=mask)
    assert torch.equal(out, out_m)
    assert torch.equal(lse, lse_m)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads", ["one", "all"])
def test_exact_mode_with_mask_matches_fp64(shape, dtype, heads):
    q, k, v = _qkv(shape, dtype)
    causal = shape[-1]
    mask = _random_mask(shape, 1 if heads == "one" else shape[1])
    out, lse = L.sage_attention_fwd(q, k, v, causal, 0.11, 0, "fp32", True, False, block_mask=mask)
    ref, ref_lse = attention_fp64(q, k, v, causal, 0.11, block_mask=mask)
    assert not ref.isnan().any() and not out.isnan().any()
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-7)
    else:  # rounded once from fp64
        torch.testing.assert_close(out, ref.to(dtype), rtol=0, atol=0)
    assert torch.equal(lse.isinf(), ref_lse.isinf())
    fin = ref_lse.isfinite()
    torch.testing.assert_close(lse.double()[fin], ref_lse[fin], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", MODES)
def test_quantized_twin_with_mask_matches_emulation(shape, mode):
    bits, pv, sk, sq = mode
    dtype = torch.bfloat16 if pv == "fp16" and sq else torch.float16
    q, k, v = _qkv(shape, dtype)
    causal = shape[-1]
    mask = _random_mask(shape, shape[1], seed=7)
    out, lse = L.sage_attention_fwd(q, k, v, causal, 0.1, bits, pv, sk, sq, block_mask=mask)
    ref, ref_lse = sage_emulate(q, k, v, causal, 0.1, bits, pv, sk, sq, block_mask=mask)
    max_diff = assert_twin_matches_emulation(out, lse, ref, ref_lse)
    # and the mask mattered: the dense result is far from it
    dense, _ = L.sage_attention_fwd(q, k, v, causal, 0.1, bits, pv, sk, sq)
    assert (dense.float() - out.float()).abs().max().item() > 20 * max_diff + 1e-3


def test_quantized_with_mask_is_accurate_against_fp64():
    # Structured data and a mask that keeps what carries the mass: the quantized block-sparse output is as
    # close to the fp64 block-sparse reference as dense sage is to dense fp64.
    shape = (1, 4, 4, 512, 512, 128, True)
    q, k, v = _qkv(shape, torch.float16, seed=3)
    mask = _random_mask(shape, 4, density=0.6, seed=4)
    out = sage_attention(q, k, v, is_causal=True, block_mask=mask)
    ref, _ = attention_fp64(q, k, v, True, block_mask=mask)
    o, r = out.double().flatten(), ref.flatten()
    cos = torch.nn.functional.cosine_similarity(o, r, dim=0).item()
    l1 = ((o - r).abs().sum() / r.abs().sum()).item()
    assert cos > 0.998 and l1 < 0.06, (cos, l1)


@pytest.mark.parametrize("pv", ["fp16", "fp32"])
def test_masked_blocks_are_never_read(pv):
    # The tiles of a masked key block are skipped, not multiplied by zero: NaN K/V there change nothing (a
    # -inf additive mask would give NaN). No K smoothing and no FP8 V, whose per-channel statistics span every
    # key; INT8 K groups stay inside their 64-key tile.
    shape = (1, 2, 2, 256, 512, 64, False)
    q, k, v = _qkv(shape, torch.float16)
    mask = torch.ones(block_mask_shape(1, 1, 256, 512), dtype=torch.bool)
    mask[0, 0, 0, 1] = False
    mask[0, 0, 1, 1:3] = False
    bits = 0 if pv == "fp32" else 8
    out, lse = L.sage_attention_fwd(q, k, v, False, 0.1, bits, pv, False, False, block_mask=mask)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 128:256] = float("nan")  # key block 1: masked for both query blocks
    v2[:, :, 128:256] = float("nan")
    out2, lse2 = L.sage_attention_fwd(q, k2, v2, False, 0.1, bits, pv, False, False, block_mask=mask)
    assert not out2.isnan().any()
    assert torch.equal(out, out2) and torch.equal(lse, lse2)
    k3, v3 = k2.clone(), v2.clone()
    k3[:, :, 256:384] = float("nan")  # key block 2: masked for query block 1 only
    v3[:, :, 256:384] = float("nan")
    out3, lse3 = L.sage_attention_fwd(q, k3, v3, False, 0.1, bits, pv, False, False, block_mask=mask)
    assert torch.equal(out[:, :, 128:], out3[:, :, 128:]) and torch.equal(lse[:, :, 128:], lse3[:, :, 128:])
    assert out3[:, :, :128].isnan().all()  # query block 0 does see key block 2


@pytest.mark.parametrize("mode", MODES + [(0, "fp32", True, False)])
def test_rows_without_visible_keys_give_zero_and_minus_inf(mode):
    bits, pv, sk, sq = mode
    dtype = torch.float32 if bits == 0 else torch.float16
    shape = (1, 2, 1, 300, 300, 64, True)
    q, k, v = _qkv(shape, dtype)
    mask = torch.ones(block_mask_shape(1, 2, 300, 300), dtype=torch.bool)
    mask[0, 0, 1] = False          # head 0, query block 1: nothing visible
    mask[0, 1, 2, :2] = False       # head 1, block 2: only key block 2 (rows 256..299 see keys 256..row)
    mask[0, 1, 0, 0] = False        # head 1, block 0 sees nothing (causal leaves only key block 0)
    out, lse = L.sage_attention_fwd(q, k, v, True, 0.1, bits, pv, sk, sq, block_mask=mask)
    assert not out.isnan().any() and not lse.isnan().any()
    assert (out[0, 0, 128:256] == 0).all() and lse[0, 0, 128:256].eq(-math.inf).all()
    assert (out[0, 1, :128] == 0).all() and lse[0, 1, :128].eq(-math.inf).all()
    assert lse[0, 1, 256:].isfinite().all() and lse[0, 0, :128].isfinite().all()
    ref, ref_lse = attention_fp64(q, k, v, True, 0.1, block_mask=mask)
    assert torch.equal(lse.isinf(), ref_lse.isinf())


def test_wrapper_block_mask_layouts_padding_and_heads():
    shape = (1, 4, 2, 200, 300, 48, True)  # head dim padded to 64
    q, k, v = _qkv(shape, torch.float16)
    mask = _random_mask(shape, 1, density=0.7, seed=5)
    a = sage_attention(q, k, v, is_causal=True, block_mask=mask)
    b = sage_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, layout="bshd",
                       block_mask=mask).transpose(1, 2)
    assert torch.equal(a, b)
    # a shared mask is the per-head mask repeated
    c = sage_attention(q, k, v, is_causal=True, block_mask=mask.expand(1, 4, -1, -1))
    assert torch.equal(a, c)
    ref, _ = attention_fp64(q, k, v, True, block_mask=mask)
    cos = torch.nn.functional.cosine_similarity(a.double().flatten(), ref.flatten(), dim=0).item()
    assert cos > 0.99


def test_module_takes_block_mask():
    shape = (1, 2, 2, 200, 300, 64, True)
    q, k, v = _qkv(shape, torch.float16)
    mask = _random_mask(shape, 2, seed=6)
    mod = tersor.nn.SageAttention()
    assert torch.equal(mod(q, k, v, is_causal=True, block_mask=mask),
                       sage_attention(q, k, v, is_causal=True, block_mask=mask))


def test_varlen_takes_per_sequence_block_masks():
    # Two packed sequences: each gets its own mask, and the result is the per-sequence sage_attention with it.
    from tersor.attention import sage_attention_varlen

    g = torch.Generator().manual_seed(3)
    lens = [(200, 300), (130, 130)]
    q = torch.randn(sum(a for a, _ in lens), 4, 64, generator=g).half()
    k = torch.randn(sum(b for _, b in lens), 2, 64, generator=g).half()
    v = torch.randn(k.shape, generator=g).half()
    cq = torch.tensor([0, 200, 330], dtype=torch.int32)
    ck = torch.tensor([0, 300, 430], dtype=torch.int32)
    m0 = torch.rand(block_mask_shape(1, 4, 200, 300)[1:], generator=g) < 0.5
    out = sage_attention_varlen(q, k, v, cq, ck, 200, 300, is_causal=True, block_mask=[m0, None])
    ref0 = sage_attention(q[None, :200], k[None, :300], v[None, :300], is_causal=True, layout="bshd",
                          block_mask=m0[None])[0]
    ref1 = sage_attention(q[None, 200:], k[None, 300:], v[None, 300:], is_causal=True, layout="bshd")[0]
    assert torch.equal(out[:200], ref0) and torch.equal(out[200:], ref1)
    assert not torch.equal(out[:200], sage_attention_varlen(q, k, v, cq, ck, 200, 300, is_causal=True)[:200])
    with pytest.raises(TypeError, match="block_mask"):
        sage_attention_varlen(q, k, v, cq, ck, 200, 300, block_mask=m0)
    with pytest.raises(ValueError, match="block_mask"):
        sage_attention_varlen(q, k, v, cq, ck, 200, 300, block_mask=[m0[0], None])
    with pytest.raises(ValueError, match="block_mask"):
        sage_attention_varlen(q, k, v, cq, ck, 200, 300, block_mask=[m0[:, :1], None])


def test_bad_block_mask_wrapper():
    shape = (1, 4, 2, 200, 300, 64, False)
    q, k, v = _qkv(shape, torch.float16)
    good = torch.ones(block_mask_shape(1, 4, 200, 300), dtype=torch.bool)
    with pytest.raises(TypeError, match="bool"):
        sage_attention(q, k, v, block_mask=good.float())
    with pytest.raises(TypeError, match="bool tensor"):
        sage_attention(q, k, v, block_mask=[[True]])
    for bad in (good[0], good[:, :2], good[:, :, :1], good[:, :, :, :2], torch.ones(1, 4, 2, 4, dtype=torch.bool),
                torch.ones(2, 4, 2, 3, dtype=torch.bool)):
        with pytest.raises(ValueError, match="block_mask must be"):
            sage_attention(q, k, v, block_mask=bad)
    with pytest.raises(ValueError, match=r"\[1, 4 or 1, 2, 3\]"):
        sage_attention(q, k, v, block_mask=good[:, :, :, :2])


@pytest.mark.parametrize("fn", ["op", "fake"])
def test_bad_block_mask_op(fn):
    shape = (1, 4, 2, 200, 300, 64, False)
    q, k, v = _qkv(shape, torch.float16)
    good = torch.ones(block_mask_shape(1, 4, 200, 300), dtype=torch.bool)

    def call(mask):
        if fn == "fake":
            from torch._subclasses.fake_tensor import FakeTensorMode
            with FakeTensorMode() as mode:
                fq, fk, fv, fm = (mode.from_tensor(t) for t in (q, k, v, mask))
                return L.sage_attention_fwd(fq, fk, fv, False, 0.1, 8, "fp8", True, False, block_mask=fm)
        return L.sage_attention_fwd(q, k, v, False, 0.1, 8, "fp8", True, False, block_mask=mask)

    out, lse = call(good)
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    with pytest.raises(TypeError, match="bool"):
        call(good.to(torch.uint8))
    with pytest.raises(ValueError, match="block_mask"):
        call(good[:, :2])
    with pytest.raises((ValueError, RuntimeError), match="block"):
        call(good[:, :, :, :2])


def test_block_mask_compiles_fullgraph():
    shape = (1, 2, 2, 200, 200, 64, True)
    q, k, v = _qkv(shape, torch.float16)
    mask = _random_mask(shape, 2, density=0.6, seed=2)

    def f(q, k, v, m):
        return sage_attention(q, k, v, is_causal=True, block_mask=m) * 2

    eager = f(q, k, v, mask)
    compiled = torch.compile(f, fullgraph=True, dynamic=False)(q, k, v, mask)
    assert torch.equal(eager, compiled)


def test_token_mask_reference_helper():
    m = torch.tensor([[[[True, False], [False, True]]]])
    t = token_mask(m, 130, 200)
    assert t.shape == (1, 1, 130, 200)
    assert t[0, 0, 0, :128].all() and not t[0, 0, 0, 128:].any()
    assert not t[0, 0, 129, :128].any() and t[0, 0, 129, 128:].all()


# ---- the kernels' index helpers (sage_format.h, xattn_format.h), evaluated through _sage_index ------------

@pytest.mark.testing_ext
def test_live_tile_walk_and_mask_offsets():
    import itertools

    import tersor._testing

    T = tersor._testing.lib
    g = torch.Generator().manual_seed(0)
    for n_kb, tile_keys in itertools.product((1, 3, 7), (64, 128)):
        for _ in range(10):
            row = (torch.rand(n_kb, generator=g) < 0.5).int().tolist()
            n_tiles = -(-(n_kb * 128 - int(torch.randint(0, 128, (1,), generator=g))) // tile_keys)
            walk = T._sage_index("live_tiles", [n_tiles, tile_keys] + row)
            assert walk == [t for t in range(n_tiles) if row[t * tile_keys // 128]]
    # dense: every tile
    assert T._sage_index("live_tiles", [5, 64, 1, 1, 1]) == [0, 1, 2, 3, 4]
    # offsets: shared mask (1 head) ignores h; 64-bit sizes
    assert T._sage_index("block_mask_row_offset", [1, 5, 2, 1, 3, 4])[0] == ((1 * 1 + 0) * 3 + 2) * 4
    assert T._sage_index("block_mask_row_offset", [1, 5, 2, 8, 3, 4])[0] == ((1 * 8 + 5) * 3 + 2) * 4
    big = T._sage_index("block_mask_row_offset", [100, 63, 1023, 64, 1024, 1024])[0]
    assert big == ((100 * 64 + 63) * 1024 + 1023) * 1024 and big > 2 ** 32


@pytest.mark.testing_ext
def test_xattention_index_rules():
    import tersor._testing

    T = tersor._testing.lib
    s_ = 8
    for i in range(5):
        for s in range(s_):
            assert T._sage_index("xattn_rows", [i, s, s_]) == [i * s_ + s_ - 1 - s, i * s_ + s]
    for lq, lk in ((64, 64), (40, 100), (100, 40), (1, 9)):
        nq, nk = -(-lq // s_), -(-lk // s_)
        for i in range(nq):
            vis = [j for j in range(nk) if T._sage_index("xattn_causal_visible", [i, j, s_, lq, lk])[0]]
            assert vis == [j for j in range(nk) if j * s_ <= i * s_ + lk - lq]
            assert T._sage_index("xattn_visible_reduced_keys", [i, s_, lq, lk, 1])[0] == len(vis)
            assert T._sage_index("xattn_visible_reduced_keys", [i, s_, lq, lk, 0])[0] == nk
        for qb in range(-(-lq // 32)):
            key = min((qb + 1) * 32, lq) - 1 + lk - lq
            assert T._sage_index("xattn_diagonal_block", [qb, 32, lq, lk])[0] == min(max(key, 0), lk - 1) // 32


# ---- the lane-by-lane CUDA replays with a mask ----------------------------------------------------------

REPLAY_SHAPES = [
    (1, 2, 1, 300, 700, 64, False),   # many key tiles: the live-tile walk reuses both stages
    (1, 2, 2, 260, 390, 128, True),
    (1, 2, 2, 400, 250, 64, True),
]


@pytest.mark.testing_ext
@pytest.mark.parametrize("shape", REPLAY_SHAPES)
@pytest.mark.parametrize("pv,sk,dtype", [("fp8", True, torch.float16), ("fp16", True, torch.bfloat16)])
def test_sm8x_replay_with_mask_matches_twin(shape, pv, sk, dtype):
    import tersor._testing

    T = tersor._testing.lib
    q, k, v = _qkv(shape, dtype, seed=11)
    causal = shape[-1]
    mask = _random_mask(shape, shape[1], density=0.5, seed=12)
    out, lse = T._sage_emulate_cuda_attention(q, k, v, causal, 0.1, pv, sk, block_mask=mask)
    ref, ref_lse = L.sage_attention_fwd(q, k, v, causal, 0.1, 8, pv, sk, False, block_mask=mask)
    problem = replay_mismatch(out, lse, ref, ref_lse)
    assert problem is None, problem
    dense, _ = T._sage_emulate_cuda_attention(q, k, v, causal, 0.1, pv, sk)
    assert not torch.equal(dense, out)


@pytest.mark.testing_ext
def test_sm8x_replay_catches_a_wrong_prefetch():
    # fault 7: the double buffer prefetches tile + 1 instead of the next live tile, so a tile after a masked one
    # is multiplied with the wrong K / V: the replay must show it (the skip test above is not vacuous).
    import tersor._testing

    T = tersor._testing.lib
    shape = REPLAY_SHAPES[0]
    q, k, v = _qkv(shape, torch.float16, seed=11)
    mask = torch.ones(block_mask_shape(1, 1, 300, 700), dtype=torch.bool)
    mask[..., 1::2] = False
    ref, ref_lse = L.sage_attention_fwd(q, k, v, False, 0.1, 8, "fp8", True, False, block_mask=mask)
    good = T._sage_emulate_cuda_attention(q, k, v, False, 0.1, "fp8", True, 0, block_mask=mask)
    assert replay_mismatch(*good, ref, ref_lse) is None
    bad = T._sage_emulate_cuda_attention(q, k, v, False, 0.1, "fp8", True, 7, block_mask=mask)
    assert replay_mismatch(*bad, ref, ref_lse) is not None
    # without a mask the walk is dense and fault 7 changes nothing
    dense = T._sage_emulate_cuda_attention(q, k, v, False, 0.1, "fp8", True, 0)
    dense7 = T._sage_emulate_cuda_attention(q, k, v, False, 0.1, "fp8", True, 7)
    assert torch.equal(dense[0], dense7[0]) and torch.equal(dense[1], dense7[1])


@pytest.mark.testing_ext
@pytest.mark.parametrize("shape", REPLAY_SHAPES)
def test_sm90_replay_with_mask_matches_twin(shape):
    import tersor._testing

    T = tersor._testing.lib
    q, k, v = _qkv(shape, torch.float16, seed=13)
    causal = shape[-1]
    mask = _random_mask(shape, 1, density=0.5, seed=14)
    out, lse = T._sage_emulate_sm90_attention(q, k, v, causal, 0.1, True, block_mask=mask)
    ref, ref_lse = L.sage_attention_fwd(q, k, v, causal, 0.1, 8, "fp8", True, False, block_mask=mask)
    problem = replay_mismatch(out, lse, ref, ref_lse)
    assert problem is None, problem


@pytest.mark.testing_ext
def test_replays_reject_bad_masks():
    import tersor._testing

    T = tersor._testing.lib
    shape = (1, 2, 2, 200, 300, 64, False)
    q, k, v = _qkv(shape, torch.float16)
    with pytest.raises(ValueError, match="block_mask"):
        T._sage_emulate_cuda_attention(q, k, v, False, 0.1, "fp8", True, block_mask=torch.ones(1, 2, 1, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        T._sage_emulate_sm90_attention(q, k, v, False, 0.1, True, block_mask=torch.ones(1, 2, 2, 3))


# ---- GPU: the kernels against the twin (skipped without one) -------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kernel", ["sm8x", "sm90"])
def test_cuda_block_mask_matches_twin(shape, kernel):
    causal = shape[-1]
    q, k, v = _qkv(shape, torch.float16)
    mask = _random_mask(shape, shape[1], seed=9)
    try:
        attention.cuda_path_name(torch.device("cuda"), "int8", "fp8", False, kernel)
    except NotImplementedError:
        pytest.skip(f"no {kernel} kernel for int8+fp8 on this GPU")
    cpu_out, cpu_lse = L.sage_attention_fwd(q, k, v, causal, 0.1, 8, "fp8", True, False, block_mask=mask)
    out, lse = L.sage_attention_fwd(q.cuda(), k.cuda(), v.cuda(), causal, 0.1, 8, "fp8", True, False, kernel,
                                    mask.cuda())
    diff = (out.cpu().float() - cpu_out.float()).abs()
    peak = cpu_out.float().abs().max().item()
    assert diff.max().item() <= (2e-3 + torch.finfo(torch.float16).eps) * peak
    assert diff.mean().item() <= 5e-6 * peak
    assert torch.equal(lse.cpu().isinf(), cpu_lse.isinf())
    ones = torch.ones_like(mask).cuda()
    dense, _ = L.sage_attention_fwd(q.cuda(), k.cuda(), v.cuda(), causal, 0.1, 8, "fp8", True, False, kernel)
    dense_m, _ = L.sage_attention_fwd(q.cuda(), k.cuda(), v.cuda(), causal, 0.1, 8, "fp8", True, False, kernel, ones)
    assert torch.equal(dense, dense_m)
