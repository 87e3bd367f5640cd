"""XAttention block selection (tersor.attention.xattention_mask, the tersor::xattention_mask op) against a
plain-PyTorch reference of the algorithm written from mit-han-lab/x-attention's ``xattn_estimate`` /
``find_blocks_chunked`` (docs/research/xattention.md), its invariants (monotone in the threshold, threshold 1 keeps
every block with mass, forced blocks), bad input, and sparse_sage_attention (scoring + block-sparse kernel)."""

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

import tersor
from tersor import attention
from tersor.attention import sage_attention, sparse_sage_attention, xattention_mask
from attention_reference import attention_fp64
from conftest import HAS_TESTING_EXT

L = tersor.ops.lib


def xattention_reference(q, k, block_size, stride, threshold, causal, scale=None):
    """(mask, mass) by XAttention's recipe in float64: the strided reshape (cat of Q[S-1-s::S] and K[s::S] along
    the head dim, zero padding), one matmul, softmax of scores * scale / S, block sums, then the greedy selection
    (forced blocks first, the others by descending mass while the kept mass < threshold * total)."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    s_ = stride
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q = q.double()
    k = k.double().repeat_interleave(hq // hkv, 1)
    nq, nk = -(-lq // s_), -(-lk // s_)
    qp = F.pad(q, (0, 0, 0, nq * s_ - lq))
    kp = F.pad(k, (0, 0, 0, nk * s_ - lk))
    rq = torch.cat([qp[:, :, s_ - 1 - s::s_] for s in range(s_)], dim=-1)
    rk = torch.cat([kp[:, :, s::s_] for s in range(s_)], dim=-1)
    r = rq @ rk.transpose(-1, -2) * scale / s_
    if causal:
        vis = (torch.arange(nk) * s_)[None, :] <= (torch.arange(nq) * s_)[:, None] + (lk - lq)
        r = r.masked_fill(~vis, -math.inf)
    p = torch.softmax(r, dim=-1).nan_to_num(0.0)
    per = block_size // s_
    nqb, nkb = -(-lq // block_size), -(-lk // block_size)
    p = F.pad(p, (0, nkb * per - nk, 0, nqb * per - nq))
    mass = p.view(b, hq, nqb, per, nkb, per).sum(dim=(3, 5))
    forced = torch.zeros(b, hq, nqb, nkb, dtype=torch.bool)
    for qb in range(nqb):
        key = min((qb + 1) * block_size, lq) - 1 + (lk - lq)
        forced[:, :, qb, min(max(key, 0), lk - 1) // block_size] = True
    if causal:
        forced[..., 0] = True
    total = torch.zeros(b, hq, nqb)
    kept = torch.zeros(b, hq, nqb, dtype=torch.float64)
    total = total.double()
    for j in range(nkb):  # sequential sums, as a loop over blocks would add them
        total = total + mass[..., j]
        kept = kept + torch.where(forced[..., j], mass[..., j], 0.0)
    _, order = torch.sort(mass, dim=-1, descending=True, stable=True)
    keep = forced.clone()
    for t in range(nkb):
        j = order[..., t]
        mj = mass.gather(-1, j[..., None])[..., 0]
        fj = forced.gather(-1, j[..., None])[..., 0]
        take = ~fj & (mj > 0) & ((kept < threshold * total) if threshold < 1 else torch.ones_like(fj))
        keep.scatter_(-1, j[..., None], (take | fj)[..., None] | keep.gather(-1, j[..., None]))
        kept = kept + torch.where(take, mj, 0.0)
    return keep, mass


def _structured_qk(b, hq, hkv, lq, lk, d, seed=0, dtype=torch.float16, noise=0.5, wmax=0.02):
    """Attention with structure: a local band (a shared positional code, bottom-right aligned), a few vertical
    stripes (keys every query attends to) and noise."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=g) * noise
    k = torch.randn(b, hkv, lk, d, generator=g) * noise
    pos = torch.arange(max(lq, lk))[:, None].float()
    freq = torch.linspace(wmax / 20, wmax, d // 2)[None, :]
    pe = torch.cat([torch.sin(pos * freq), torch.cos(pos * freq)], -1)
    q = q + (pe[lk - lq:lk] if lk >= lq else pe[:lq])
    k = k + pe[:lk]
    u = torch.randn(d, generator=g)
    u = u / u.norm() * math.sqrt(d)
    q = q + u
    k[:, :, torch.randint(0, lk, (4,), generator=g)] += 2.0 * u
    return q.to(dtype), k.to(dtype)


CASES = [  # b, hq, hkv, lq, lk, d, block, stride, causal
    (1, 2, 2, 512, 512, 64, 128, 8, False),
    (1, 2, 2, 512, 512, 64, 128, 8, True),
    (2, 4, 2, 300, 700, 64, 128, 16, True),   # Lq < Lk, tails, GQA
    (1, 2, 1, 700, 300, 128, 64, 4, True),    # Lq > Lk: query blocks without visible keys
    (1, 1, 1, 257, 390, 32, 32, 8, False),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("threshold", [0.5, 0.9, 1.0])
def test_matches_pytorch_reference(case, threshold):
    b, hq, hkv, lq, lk, d, block, stride, causal = case
    q, k = _structured_qk(b, hq, hkv, lq, lk, d, seed=lq + lk)
    mask, mass = L.xattention_mask(q, k, block, stride, threshold, causal, d ** -0.5)
    ref_mask, ref_mass = xattention_reference(q, k, block, stride, threshold, causal)
    assert mask.dtype == torch.bool and mass.dtype == torch.float32
    assert mask.shape == ref_mask.shape == (b, hq, -(-lq // block), -(-lk // block))
    torch.testing.assert_close(mass.double(), ref_mass, rtol=1e-6, atol=1e-9)
    assert torch.equal(mask, ref_mask)
    if threshold < 1:  # the structure makes the selection non-trivial
        assert 0 < mask.float().mean() < 1 or mask.shape[-1] == 1


def test_reference_is_xattention_antidiagonal_sum():
    # The reduced score is the antidiagonal sum of each stride x stride sub-block of Q K^T (checked directly,
    # so the reshape in the reference is not just a restatement of the C++ loop).
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 16, 8, generator=g).double(), torch.randn(1, 1, 24, 8, generator=g).double()
    s_ = 4
    full = q[0, 0] @ k[0, 0].T
    rq = torch.cat([q[:, :, s_ - 1 - s::s_] for s in range(s_)], -1)[0, 0]
    rk = torch.cat([k[:, :, s::s_] for s in range(s_)], -1)[0, 0]
    red = rq @ rk.T
    for i in range(4):
        for j in range(6):
            sub = full[i * s_:(i + 1) * s_, j * s_:(j + 1) * s_]
            assert torch.isclose(red[i, j], torch.flip(sub, [0]).diagonal().sum())


@pytest.mark.parametrize("causal", [False, True])
def test_higher_threshold_never_drops_a_block(causal):
    q, k = _structured_qk(1, 4, 2, 1024, 1024, 64, seed=3)
    prev = None
    for t in (0.05, 0.2, 0.5, 0.8, 0.9, 0.95, 0.99, 1.0):
        m = xattention_mask(q, k, threshold=t, is_causal=causal)
        if prev is not None:
            assert not (prev & ~m).any(), t
        prev = m
    assert prev.sum() > xattention_mask(q, k, threshold=0.05, is_causal=causal).sum()


@pytest.mark.parametrize("causal", [False, True])
def test_threshold_one_keeps_every_block_with_mass(causal):
    q, k = _structured_qk(1, 2, 2, 640, 896, 64, seed=5)
    mask, mass = xattention_mask(q, k, threshold=1.0, is_causal=causal, return_mass=True)
    assert torch.equal(mask & (mass > 0), mass > 0)
    if not causal:
        assert mask.all()
    else:  # blocks entirely in the future have no mass and are dropped (unless forced)
        assert not mask.all()


def test_forced_blocks_diagonal_and_sink():
    # Queries that attend to one key block only: the threshold alone would keep that block, the diagonal and
    # (causal) the first block are kept besides.
    q, k = _structured_qk(1, 1, 1, 512, 512, 64, seed=7)
    for causal in (False, True):
        m = xattention_mask(q, k, threshold=0.01, is_causal=causal)
        for qb in range(4):
            assert m[0, 0, qb, qb]
            if causal:
                assert m[0, 0, qb, 0]
    # Lq < Lk (bottom-right): query block qb's diagonal is the key block of row (last row + Lk - Lq)
    q2, k2 = _structured_qk(1, 1, 1, 200, 520, 64, seed=8)
    m = xattention_mask(q2, k2, threshold=0.01, is_causal=True)
    assert m[0, 0, 0, (127 + 320) // 128] and m[0, 0, 1, 519 // 128]


def test_gqa_equals_repeated_heads_and_layouts():
    q, k = _structured_qk(1, 4, 2, 300, 400, 64, seed=9)
    a = xattention_mask(q, k, threshold=0.8, is_causal=True)
    b = xattention_mask(q, k.repeat_interleave(2, 1), threshold=0.8, is_causal=True)
    assert torch.equal(a, b)
    c = xattention_mask(q.transpose(1, 2), k.transpose(1, 2), threshold=0.8, is_causal=True, layout="bshd")
    assert torch.equal(a, c)


def test_bad_input():
    q, k = _structured_qk(1, 2, 2, 64, 64, 64)
    with pytest.raises(TypeError):
        xattention_mask(q.int(), k.int())
    with pytest.raises(TypeError):
        xattention_mask(q, k.float())
    with pytest.raises(ValueError, match="4-d"):
        xattention_mask(q[0], k)
    with pytest.raises(ValueError, match="multiple of stride"):
        xattention_mask(q, k, block_size=100, stride=8)
    with pytest.raises(ValueError, match="stride"):
        xattention_mask(q, k, stride=0)
    for t in (0.0, -0.5, 1.5, math.nan):
        with pytest.raises(ValueError, match="threshold"):
            xattention_mask(q, k, threshold=t)
    with pytest.raises(ValueError, match="heads"):
        xattention_mask(q, k[:, :1].expand(1, 3, 64, 64).contiguous()[:, :, :, :32])
    with pytest.raises(ValueError, match="layout"):
        xattention_mask(q, k, layout="sbhd")
    with pytest.raises(ValueError, match="scale"):
        xattention_mask(q, k, scale=-1.0)


@pytest.mark.parametrize("fn", ["op", "fake"])
def test_bad_input_op(fn):
    q, k = _structured_qk(1, 2, 2, 64, 64, 64)

    def call(q, k, block=128, stride=8, thr=0.9, scale=0.125):
        if fn == "fake":
            from torch._subclasses.fake_tensor import FakeTensorMode
            with FakeTensorMode() as mode:
                q, k = mode.from_tensor(q), mode.from_tensor(k)
                return L.xattention_mask(q, k, block, stride, thr, False, scale)
        return L.xattention_mask(q, k, block, stride, thr, False, scale)

    mask, mass = call(q, k)
    assert mask.shape == mass.shape == (1, 2, 1, 1) and mask.dtype == torch.bool
    with pytest.raises(ValueError, match="multiple of stride"):
        call(q, k, block=12)
    with pytest.raises(ValueError, match="threshold"):
        call(q, k, thr=0.0)
    with pytest.raises(ValueError, match="multiple of key heads"):
        call(torch.cat([q, q[:, :1]], 1), k)
    with pytest.raises(TypeError, match="same dtype"):
        call(q, k.bfloat16())
    with pytest.raises(ValueError, match="scale"):
        call(q, k, scale=math.inf)


# ---- sparse_sage_attention -----------------------------------------------------------------------------

def test_sparse_sage_attention_is_scoring_plus_block_mask():
    q, k = _structured_qk(1, 2, 2, 520, 520, 64, seed=11)
    v = torch.randn(1, 2, 520, 64).half()
    out, mask = sparse_sage_attention(q, k, v, threshold=0.9, is_causal=True, return_mask=True)
    assert torch.equal(mask, xattention_mask(q, k, threshold=0.9, is_causal=True))
    assert torch.equal(out, sage_attention(q, k, v, is_causal=True, block_mask=mask))
    out2, lse2, mask2 = sparse_sage_attention(q, k, v, threshold=0.9, is_causal=True, return_lse=True,
                                              return_mask=True)
    assert torch.equal(out, out2) and torch.equal(mask, mask2) and lse2.shape == (1, 2, 520)


def test_sparse_sage_attention_accuracy_on_structured_attention():
    # Band + stripes: at threshold 0.9 a good share of the blocks goes, and the output stays close to dense.
    q, k = _structured_qk(1, 2, 2, 2048, 2048, 64, seed=12)
    v = torch.randn(1, 2, 2048, 64).half()
    out, mask = sparse_sage_attention(q, k, v, threshold=0.9, is_causal=True, return_mask=True)
    ref, _ = attention_fp64(q, k, v, True)
    causal_blocks = 16 * 17 / 2
    density = mask[0].sum().item() / (2 * causal_blocks)
    cos = F.cosine_similarity(out.double().flatten(), ref.flatten(), dim=0).item()
    assert density < 0.7, density
    assert cos > 0.99, cos
    full = sparse_sage_attention(q, k, v, threshold=1.0, is_causal=True)
    cos_full = F.cosine_similarity(full.double().flatten(), ref.flatten(), dim=0).item()
    assert cos_full >= cos - 1e-6


def test_sparse_sage_attention_bad_input():
    q, k = _structured_qk(1, 2, 2, 64, 64, 64)
    with pytest.raises(ValueError, match="threshold"):
        sparse_sage_attention(q, k, k, threshold=0.0)
    with pytest.raises(TypeError):
        sparse_sage_attention(q, k, k)  # threshold is required


# ---- SageAttentionConfig(sparse_threshold=...) -----------------------------------------------------------

def test_config_sparse_threshold_checks():
    assert tersor.SageAttentionConfig().sparse_threshold is None
    c = tersor.SageAttentionConfig(sparse_threshold=0.9, sparse_stride=16)
    assert c.to_dict()["sparse_threshold"] == 0.9 and c.to_dict()["sparse_stride"] == 16
    for bad in (0.0, 1.5, -1.0):
        with pytest.raises(ValueError, match="sparse_threshold"):
            tersor.SageAttentionConfig(sparse_threshold=bad)
    with pytest.raises(TypeError, match="sparse_threshold"):
        tersor.SageAttentionConfig(sparse_threshold="0.9")
    with pytest.raises(ValueError, match="sparse_stride"):
        tersor.SageAttentionConfig(sparse_threshold=0.9, sparse_stride=12)
    with pytest.raises(TypeError, match="sparse_stride"):
        tersor.SageAttentionConfig(sparse_threshold=0.9, sparse_stride=8.0)


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
def test_config_sparse_threshold_routes_models_to_sparse_sage(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tersor.attention import hf

    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, attn_implementation="sdpa")
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    x = torch.randint(0, 128, (1, 300))
    tersor.quantize_(m, tersor.SageAttentionConfig())
    with torch.no_grad():
        dense = m(x).logits
    calls = []
    real = attention.sparse_sage_attention

    def spy(*a, **kw):
        calls.append(kw["threshold"])
        return real(*a, **kw)

    monkeypatch.setattr(hf, "sparse_sage_attention", spy)
    rep = tersor.quantize_(m, tersor.SageAttentionConfig(sparse_threshold=1.0))
    assert m.config.tersor_sage["sparse_threshold"] == 1.0 and "block-sparse" in rep.attention
    with torch.no_grad():
        full = m(x).logits
    assert calls == [1.0, 1.0]  # both layers
    # threshold 1 keeps every block with estimated mass: all causal blocks of a random-weight model
    assert torch.equal(full, dense)
    tersor.quantize_(m, tersor.SageAttentionConfig(sparse_threshold=0.3))
    with torch.no_grad():
        sparse = m(x).logits
    assert calls[2:] == [0.3, 0.3] and not torch.equal(sparse, dense)


# ---- the scoring kernel's thread-by-thread CPU replay ----------------------------------------------------

def _replay_close(mask, mass, ref_mask, ref_mass):
    # fp32 (the kernel) against fp64 (the op): masses to float rounding; a selection may differ only at a
    # near-tie, which these inputs do not have
    torch.testing.assert_close(mass, ref_mass, rtol=1e-4, atol=1e-5)
    return torch.equal(mask, ref_mask)


@pytest.mark.testing_ext
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("threshold", [0.5, 0.9, 1.0])
def test_cuda_replay_matches_cpu_op(case, threshold):
    import tersor._testing

    T = tersor._testing.lib
    b, hq, hkv, lq, lk, d, block, stride, causal = case
    q, k = _structured_qk(b, hq, hkv, lq, lk, d, seed=lq + lk)
    ref_mask, ref_mass = L.xattention_mask(q, k, block, stride, threshold, causal, d ** -0.5)
    mask, mass = T._xattn_emulate_cuda(q, k, block, stride, threshold, causal, d ** -0.5)
    assert mask.dtype == torch.bool and mask.shape == ref_mask.shape
    assert _replay_close(mask, mass, ref_mask, ref_mass)


@pytest.mark.testing_ext
@pytest.mark.parametrize("fault", [1, 2])
def test_cuda_replay_catches_faults(fault):
    import tersor._testing

    T = tersor._testing.lib
    q, k = _structured_qk(1, 2, 2, 512, 512, 64, seed=21)
    ref_mask, ref_mass = L.xattention_mask(q, k, 128, 8, 0.9, True, 0.125)
    mask, mass = T._xattn_emulate_cuda(q, k, 128, 8, 0.9, True, 0.125, fault)
    with pytest.raises(AssertionError):
        _replay_close(mask, mass, ref_mask, ref_mass)
    with pytest.raises(ValueError, match="fault"):
        T._xattn_emulate_cuda(q, k, 128, 8, 0.9, True, 0.125, 3)


# ---- qk = "int8": INT8 reduced rows (the tensor-core path) ----------------------------------------------

INT8_CASES = [c for c in CASES if (c[6] // c[7]) % 8 == 0 and (c[7] * c[5]) % 32 == 0]


def test_int8_cases_cover_several_shapes():
    assert len(INT8_CASES) >= 3


@pytest.mark.parametrize("case", INT8_CASES)
def test_int8_scores_are_close_to_exact(case):
    b, hq, hkv, lq, lk, d, block, stride, causal = case
    q, k = _structured_qk(b, hq, hkv, lq, lk, d, seed=lq + lk)
    mask, mass = L.xattention_mask(q, k, block, stride, 0.9, causal, d ** -0.5, "none")
    mask8, mass8 = L.xattention_mask(q, k, block, stride, 0.9, causal, d ** -0.5, "int8")
    # per-row INT8 over stride * D values: the block masses move by well under a percent of a row's mass
    rows_per_block = block // stride
    assert (mass8 - mass).abs().max().item() < 0.02 * rows_per_block
    assert (mask8 != mask).float().mean().item() < 0.05
    assert not torch.equal(mass8, mass)  # really quantized


@pytest.mark.testing_ext
@pytest.mark.parametrize("case", INT8_CASES)
@pytest.mark.parametrize("threshold", [0.5, 0.9, 1.0])
def test_int8_cuda_replay_matches_cpu(case, threshold):
    import tersor._testing

    T = tersor._testing.lib
    b, hq, hkv, lq, lk, d, block, stride, causal = case
    q, k = _structured_qk(b, hq, hkv, lq, lk, d, seed=lq + lk)
    ref_mask, ref_mass = L.xattention_mask(q, k, block, stride, threshold, causal, d ** -0.5, "int8")
    mask, mass = T._xattn_emulate_cuda(q, k, block, stride, threshold, causal, d ** -0.5, 0, "int8")
    assert _replay_close(mask, mass, ref_mask, ref_mass)


@pytest.mark.testing_ext
@pytest.mark.parametrize("fault", [1, 2, 3])
def test_int8_cuda_replay_catches_faults(fault):
    import tersor._testing

    T = tersor._testing.lib
    q, k = _structured_qk(1, 2, 2, 512, 512, 64, seed=21)
    ref_mask, ref_mass = L.xattention_mask(q, k, 128, 8, 0.9, True, 0.125, "int8")
    mask, mass = T._xattn_emulate_cuda(q, k, 128, 8, 0.9, True, 0.125, fault, "int8")
    with pytest.raises(AssertionError):
        _replay_close(mask, mass, ref_mask, ref_mass)


def test_qk_argument():
    q, k = _structured_qk(1, 2, 2, 256, 256, 64)
    assert torch.equal(xattention_mask(q, k), xattention_mask(q, k, qk="none"))  # "auto" is exact on the CPU
    with pytest.raises(ValueError, match="qk"):
        xattention_mask(q, k, qk="fp8")
    with pytest.raises(ValueError, match="qk"):
        L.xattention_mask(q, k, 128, 8, 0.9, False, 0.125, "int4")
    if HAS_TESTING_EXT:
        import tersor._testing

        with pytest.raises(ValueError, match="int8"):
            tersor._testing.lib._xattn_emulate_cuda(q, k, 32, 8, 0.9, False, 0.125, 0, "int8")


# ---- GPU: the fused scoring kernel against the CPU op (skipped without one) ------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("threshold", [0.5, 0.9, 1.0])
def test_cuda_matches_cpu(case, threshold):
    b, hq, hkv, lq, lk, d, block, stride, causal = case
    q, k = _structured_qk(b, hq, hkv, lq, lk, d, seed=lq + lk)
    mask, mass = L.xattention_mask(q, k, block, stride, threshold, causal, d ** -0.5)
    cmask, cmass = L.xattention_mask(q.cuda(), k.cuda(), block, stride, threshold, causal, d ** -0.5)
    assert cmask.is_cuda and cmask.dtype == torch.bool and cmass.dtype == torch.float32
    # fp32 on the GPU against fp64: the masses to float rounding; a selection may differ only at a near-tie
    torch.testing.assert_close(cmass.cpu(), mass, rtol=1e-4, atol=1e-5)
    differ = (cmask.cpu() != mask)
    assert differ.float().mean().item() <= 0.01, differ.sum().item()


@pytest.mark.cuda
@pytest.mark.parametrize("case", INT8_CASES)
def test_int8_cuda_matches_cpu(case):
    b, hq, hkv, lq, lk, d, block, stride, causal = case
    q, k = _structured_qk(b, hq, hkv, lq, lk, d, seed=lq + lk)
    mask, mass = L.xattention_mask(q, k, block, stride, 0.9, causal, d ** -0.5, "int8")
    cmask, cmass = L.xattention_mask(q.cuda(), k.cuda(), block, stride, 0.9, causal, d ** -0.5, "int8")
    torch.testing.assert_close(cmass.cpu(), mass, rtol=1e-4, atol=1e-5)
    assert (cmask.cpu() != mask).float().mean().item() <= 0.01


def test_sparse_sage_attention_compiles_fullgraph():
    q, k = _structured_qk(1, 2, 2, 300, 300, 64, seed=31)
    v = torch.randn(1, 2, 300, 64).half()

    def f(q, k, v):
        return sparse_sage_attention(q, k, v, threshold=0.9, is_causal=True) + 1

    eager = f(q, k, v)
    compiled = torch.compile(f, fullgraph=True, dynamic=False)(q, k, v)
    assert torch.equal(eager, compiled)
