"""Independent pure-PyTorch references for tests/test_attention*.py (no tersor ops).

* ``attention_fp64``: exact attention in float64 with the bottom-right causal convention, GQA, LSE.
* ``sage_emulate``: the quantized pipeline written from the spec in docs/research/sage_attention.md,
  vectorized over rows with torch's own e4m3 cast and rounding, to check the C++ CPU twin against.
* ``replay_mismatch``: the bound a lane-by-lane CUDA replay (tersor._C_testing) must meet against the twin.
"""

import math

import torch

LOG2E = torch.tensor(1.4426950408889634, dtype=torch.float32)
FP8_OFFSET = torch.tensor(math.log2(448.0), dtype=torch.float32)


def causal_mask(lq, lk, device="cpu"):
    """Bottom-right aligned: key j visible to query i iff j <= i + lk - lq."""
    return torch.arange(lk, device=device)[None, :] <= torch.arange(lq, device=device)[:, None] + (lk - lq)


def key_mask(lq, lk, is_causal=False, window=None, device="cpu"):
    """bool [lq, lk]: key j visible to query i. Query i sits at key position p = i + lk - lq (bottom-right);
    causal: j <= p; window (left, right), FlashAttention's window_size: p - left <= j <= p + right, a negative
    side unbounded."""
    p = torch.arange(lq, device=device)[:, None] + (lk - lq)
    j = torch.arange(lk, device=device)[None, :]
    m = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if is_causal:
        m &= j <= p
    if window is not None:
        left, right = window
        if left >= 0:
            m &= j >= p - left
        if right >= 0:
            m &= j <= p + right
    return m


def random_qkv(b, hq, hkv, lq, lk, d, dtype, seed=0):
    """q [b, hq, lq, d], k/v [b, hkv, lk, d] in ``dtype``: standard normal, K shifted by 1 (a K bias, as in real
    models, which smoothing removes)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=g).to(dtype)
    k = (torch.randn(b, hkv, lk, d, generator=g) + 1.0).to(dtype)
    v = torch.randn(b, hkv, lk, d, generator=g).to(dtype)
    return q, k, v


def _expand_kv(t, hq):
    return t.repeat_interleave(hq // t.shape[1], dim=1)


def token_mask(block_mask, lq, lk, block_q=128, block_k=128):
    """A block mask [B, H or 1, ceil(lq/bq), ceil(lk/bk)] expanded to the tokens: bool [B, H or 1, lq, lk]."""
    return block_mask.repeat_interleave(block_q, 2)[:, :, :lq].repeat_interleave(block_k, 3)[..., :lk]


def attention_fp64(q, k, v, is_causal=False, scale=None, block_mask=None, window=None, key_padding=None,
                   attn_mask=None):
    """(out float64, lse float64): fully masked rows give 0 and -inf. block_mask: the keys of a false block
    get -inf scores. window: (left, right) sliding window (:func:`key_mask`). key_padding: bool [B, Lk], False =
    a padded key (-inf scores for every query of that batch entry). attn_mask: SDPA's (bool: False hides the
    key; float: added to the scores), broadcast to [B, H, Lq, Lk]."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    k, v = _expand_kv(k, q.shape[1]).double(), _expand_kv(v, q.shape[1]).double()
    s = q.double() @ k.transpose(-1, -2) * scale
    if block_mask is not None:
        s = s.masked_fill(~token_mask(block_mask, q.shape[2], k.shape[2]), -math.inf)
    if is_causal:
        s = s.masked_fill(~causal_mask(q.shape[2], k.shape[2]), -math.inf)
    if window is not None:
        s = s.masked_fill(~key_mask(q.shape[2], k.shape[2], False, window), -math.inf)
    if key_padding is not None:
        s = s.masked_fill(~key_padding[:, None, None, :], -math.inf)
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool else s + attn_mask.double()
    lse = torch.logsumexp(s, dim=-1)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return p @ v, lse


def _group_amax(x, groups, n_groups):
    """amax of |x| rows [..., L, D] per group id of the L axis -> [..., n_groups]."""
    a = x.abs().amax(-1)
    out = torch.zeros(*a.shape[:-1], n_groups, dtype=a.dtype)
    return out.scatter_reduce(-1, groups.expand_as(a), a, reduce="amax")


def _int_quant(x, groups, n_groups, bits):
    qmax = torch.tensor(7.0 if bits == 4 else 127.0)
    amax = _group_amax(x, groups, n_groups)
    pos = amax > 0
    inv = torch.where(pos, qmax / amax.clamp_min(1e-38), torch.zeros_like(amax))
    scale = torch.where(pos, amax / qmax, torch.zeros_like(amax))
    codes = torch.round(x * inv.gather(-1, groups.expand(amax.shape[:-1] + groups.shape))[..., None])
    return codes.clamp(-qmax, qmax), scale


def sage_emulate(q, k, v, is_causal, scale, qk_bits, pv, smooth_k, smooth_q, cta_q=128, cta_k=64, warp_q=32,
                 block_mask=None, window=None, key_padding=None, attn_mask=None):
    """(out float32, lse float32) of the quantized pipeline (see module docstring). block_mask: masked keys get
    -inf scores; a tile all -inf for a row leaves its m, l, o exactly as they were (alpha = 1, p = 0), which is
    what skipping the tile does."""
    b, hq, lq, d = q.shape
    lk = k.shape[2]
    qf, kf, vf = q.float(), k.float(), v.float()
    k_mean = kf.double().mean(2, keepdim=True).float() if smooth_k else torch.zeros_like(kf[:, :, :1])
    ksm = kf - k_mean
    rows, toks = torch.arange(lq), torch.arange(lk)
    # query groups restart every CTA (128 rows, a multiple of 32, so the global formula holds)
    q_group = (rows // warp_q) * 8 + rows % 8
    k_group = (toks // cta_k) * 4 + (toks % 8) // 2
    n_qg, n_kg = int(q_group.max()) + 1, int(k_group.max()) + 1
    qs = qf * (torch.tensor(scale, dtype=torch.float32) * LOG2E)
    ksm_e = _expand_kv(ksm, hq)
    q_bias = None
    if smooth_q:
        blk = rows // warp_q
        n_blk = int(blk.max()) + 1
        means = torch.stack([qs[:, :, blk == i].double().mean(2).float() for i in range(n_blk)], 2)  # [b,h,nb,d]
        qs = qs - means[:, :, blk]
        q_bias = (means @ ksm_e.transpose(-1, -2))[:, :, blk]  # [b,h,lq,lk]
    if qk_bits:
        qi, qsc = _int_quant(qs, q_group, n_qg, qk_bits)
        ki, ksc = _int_quant(ksm, k_group, n_kg, qk_bits)
        ki, ksc = _expand_kv(ki, hq), _expand_kv(ksc, hq)
        acc = (qi.double() @ ki.double().transpose(-1, -2)).float()  # exact integers
        s = acc * (qsc[:, :, q_group][..., :, None] * ksc[:, :, k_group][..., None, :])
    else:
        s = qs @ ksm_e.transpose(-1, -2)
    if q_bias is not None:
        s = s + q_bias
    if pv == "fp8":
        amax = vf.abs().amax(2, keepdim=True)
        # a tensor numerator: torch computes `python_scalar / tensor` as reciprocal * scalar (two roundings)
        inv = torch.where(amax > 0, torch.tensor(448.0) / amax.clamp_min(1e-38), torch.zeros_like(amax))
        v_scale = torch.where(amax > 0, amax / 448.0, torch.zeros_like(amax))
        v_val = (vf * inv).to(torch.float8_e4m3fn).float()
        offset = FP8_OFFSET
    else:
        v_val, v_scale, offset = vf, torch.ones_like(vf[:, :, :1]), torch.tensor(0.0)
    v_val, v_scale = _expand_kv(v_val, hq), _expand_kv(v_scale, hq)
    visible = causal_mask(lq, lk) if is_causal else torch.ones(lq, lk, dtype=torch.bool)
    if window is not None:
        visible &= key_mask(lq, lk, False, window)
    s = s.masked_fill(~visible, -math.inf)
    if block_mask is not None:
        s = s.masked_fill(~token_mask(block_mask, lq, lk), -math.inf)
    if key_padding is not None:
        s = s.masked_fill(~key_padding[:, None, None, :], -math.inf)
    if attn_mask is not None:  # the scores are in log2 units: a float mask too
        s = s.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool else s + attn_mask.float() * LOG2E
    m = torch.full((b, hq, lq, 1), -math.inf)
    l = torch.zeros(b, hq, lq, 1)
    o = torch.zeros(b, hq, lq, d)
    for t0 in range(0, lk, cta_k):
        st = s[..., t0:t0 + cta_k]
        m_new = torch.maximum(m, st.amax(-1, keepdim=True))
        # exp2 of the fp32 argument, correctly rounded (as glibc's exp2f; torch's float exp2 is 1-ulp)
        alpha = torch.where(m_new == -math.inf, torch.ones_like(m), torch.exp2((m - m_new).double()).float())
        p = torch.exp2((st - (m_new - offset)).double()).float()
        p = torch.where(st == -math.inf, torch.zeros_like(p), p)
        if pv == "fp8":
            p = p.to(torch.float8_e4m3fn).float()
        elif pv == "fp16":
            p = p.to(q.dtype).float()
        l = l * alpha + p.sum(-1, keepdim=True)
        o = o * alpha + p @ v_val[:, :, t0:t0 + cta_k]
        m = m_new
    dead = l == 0
    out = torch.where(dead, torch.zeros_like(o), o * v_scale * (1.0 / l))
    corr = (qf @ _expand_kv(k_mean, hq).transpose(-1, -2)) * scale if smooth_k else torch.zeros_like(l)
    lse = torch.where(dead, torch.full_like(l, -math.inf), (m - offset + torch.log2(l)) * math.log(2.0) + corr)
    return out, lse[..., 0]


def assert_twin_matches_emulation(out, lse, ref, ref_lse):
    """The CPU twin's (out, lse) against :func:`sage_emulate`'s on the same inputs; returns the max output
    difference. Only summation order, exp2 ulps and the resulting rare e4m3 flips of one P entry (and so one ulp
    of the rounded output) may differ."""
    dtype = out.dtype
    diff = (out.float() - ref.to(dtype).float()).abs()
    peak = ref.abs().max().item()
    assert diff.max().item() <= (2e-3 + torch.finfo(dtype).eps) * peak, diff.max().item()
    assert diff.mean().item() <= 5e-6 * peak, diff.mean().item()
    assert torch.equal(lse.isinf(), ref_lse.isinf())
    fin = ref_lse.isfinite()
    torch.testing.assert_close(lse[fin], ref_lse[fin], rtol=0, atol=1e-3)
    return diff.max().item()


def replay_mismatch(out, lse, ref, ref_lse, mean_bound=1e-6, min_same=0.99):
    """None if (out, lse) agrees with (ref, ref_lse) to the replay's documented bound, else a description.

    Same numerics, different order: the INT8 scores are exact in both; only fp32 summation order (MMA
    internals, per-lane partial row sums, 32- vs 64-token FP8 partials) and ex2 ftz differ, so almost every
    output is bit-identical and a rare e4m3/16-bit rounding flip of one P entry moves one output by less than
    2e-3 of the peak."""
    diff = (out.float() - ref.float()).abs()
    peak = ref.float().abs().max().item()
    eps = torch.finfo(ref.dtype).eps
    if not torch.equal(lse.isinf(), ref_lse.isinf()):
        return "masked rows differ"
    if diff.max().item() > (2e-3 + eps) * peak:
        return f"max diff {diff.max().item()} > {(2e-3 + eps) * peak}"
    if diff.mean().item() > mean_bound * peak:
        return f"mean diff {diff.mean().item()} > {mean_bound * peak}"
    same = (out == ref).float().mean().item()
    if same < min_same:
        return f"only {same:.4f} of the outputs bit-identical"
    fin = ref_lse.isfinite()
    lse_err = (lse[fin] - ref_lse[fin]).abs().max().item() if fin.any() else 0.0
    if lse_err > 1e-5:
        return f"lse diff {lse_err}"
    return None
