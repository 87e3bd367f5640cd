"""Decode over a paged KV cache (``tersor.attention.sage_decode``) and packed varlen prefill
(``tersor.attention.sage_attention_varlen``), issue 15, against SDPA in the same run.

* decode: q [B, 1, Hq 32, D 128] (GQA, Hkv 8) against a cache of L tokens per sequence; tersor reads the
  quantized paged cache (INT8 K + e4m3 V, ~1 byte per element), SDPA an fp16/bf16 contiguous cache
  ([B, Hkv, L, D], ``enable_gqa``); the faster of fp32 and 16-bit SDPA on the CPU. ``extra``: bytes of both
  caches. ``accuracy``: rel-L1 of both against fp64.
* varlen: sequences of mixed lengths packed (FlashAttention's API, one launch) against SDPA run per sequence and
  on the padded batch (with a mask); ``extra.tersor_padded_ms``: tersor's own prefill on the padded batch with a
  key padding mask (the issue's goal: varlen at least as fast, with no padding waste). CUDA rows too (labelled
  "unverified" until ``tersor.attention.CUDA_KERNELS_READY``).
* ``accuracy`` of decode also has ``rel_l1_prefill``: the prefill path (``sage_attention``, one query against the
  same keys) against fp64 on the same data (the issue's goal: decode no worse).
CPU rows are the CPU twin (the kernels' reference numerics, not a fast path): for the record only.

CUDA rows (decode only): B in {1, 8, 32}, Hq 32 / Hkv 8, D 128, L 4K .. 128K, the planner's split, against SDPA on
an fp16 contiguous cache in the same run. ``tersor_ms`` times the op (``sage_decode_paged``, no host sync);
``extra.with_index_checks_ms`` the checked ``sage_decode`` (one host sync for its index checks). The timed caches
hold random valid codes written straight into the cache tensors (the kernels' speed does not depend on the
values). ``accuracy`` is the CUDA output against the CPU twin on the same cache (small cases only). ``extra``:
``cache_read_GBps`` = the cache bytes a decode reads (codes, scales, page statistics) / time, for the issue's
bandwidth goal. While ``tersor.attention.paged.CUDA_DECODE_READY`` is False the rows say "unverified".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tersor.attention import (CUDA_KERNELS_READY, PagedKVCache, cuda_path_name, pick_modes, sage_attention,
                              sage_attention_varlen, sage_decode)
from tersor.attention import paged as _paged
from tersor.bench import Result, register, time_fn


def _rel_l1(out, ref):
    return ((out.double() - ref.double()).abs().sum() / ref.double().abs().sum()).item()


def _decode_case(ctx, b, hq, hkv, d, seqlen, page_size=64, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seqlen + b)
    k = torch.randn(b, seqlen, hkv, d, generator=g) + 2 * torch.randn(1, 1, hkv, d, generator=g)
    v = torch.randn(b, seqlen, hkv, d, generator=g)
    q = torch.randn(b, 1, hq, d, generator=g).to(dtype)
    pages = seqlen // page_size
    cache = PagedKVCache(b * pages, page_size, hkv, d, dtype=dtype)
    bt = torch.randperm(b * pages, generator=g).view(b, pages).to(torch.int32)
    sl = torch.full((b,), seqlen, dtype=torch.int32)
    cache.append(k, v, bt, torch.zeros(b, dtype=torch.int32), sl)
    kc, vc = k.transpose(1, 2).to(dtype).contiguous(), v.transpose(1, 2).to(dtype).contiguous()  # [B, Hkv, L, D]
    qs = q.transpose(1, 2)  # [B, Hq, 1, D]
    t_dec = time_fn(lambda: sage_decode(q, cache, bt, sl), ctx)
    t_sdpa = time_fn(lambda: F.scaled_dot_product_attention(qs, kc, vc, enable_gqa=True), ctx)
    baseline = f"SDPA {str(dtype).replace('torch.', '')} cache"
    q32, k32, v32 = qs.float(), kc.float(), vc.float()
    t32 = time_fn(lambda: F.scaled_dot_product_attention(q32, k32, v32, enable_gqa=True), ctx)
    if t32 < t_sdpa:
        t_sdpa, baseline = t32, "SDPA float32 cache"
    ref = F.scaled_dot_product_attention(qs.double(), k.transpose(1, 2).double(), v.transpose(1, 2).double(),
                                         enable_gqa=True).transpose(1, 2)
    prefill = sage_attention(q, k.to(dtype), v.to(dtype), is_causal=True, layout="bshd")
    acc = {"rel_l1": _rel_l1(sage_decode(q, cache, bt, sl), ref), "rel_l1_prefill": _rel_l1(prefill, ref),
           "rel_l1_sdpa": _rel_l1(F.scaled_dot_product_attention(qs, kc, vc, enable_gqa=True).transpose(1, 2), ref)}
    return Result(family="attention", op="sage_decode int8+fp8 paged [cpu-twin]",
                  shape=f"b{b} hq{hq}/hkv{hkv} d{d} L{seqlen} page{page_size}", dtype=str(dtype).replace("torch.", ""),
                  tersor_ms=t_dec, baseline=baseline, baseline_ms=t_sdpa, accuracy=acc,
                  extra={"cache_bytes": cache.nbytes, "baseline_cache_bytes": 2 * kc.numel() * kc.element_size()})


def _varlen_case(ctx, lens, h, d, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(sum(lens))
    total, lmax = sum(lens), max(lens)
    dev = ctx.device
    q, k, v = (torch.randn(total, h, d, generator=g).to(dtype).to(dev) for _ in range(3))
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=dev)
    t_var = time_fn(lambda: sage_attention_varlen(q, k, v, cu, cu, lmax, lmax, is_causal=True), ctx)

    def per_sequence():
        for a, z in zip(cu[:-1].tolist(), cu[1:].tolist()):
            F.scaled_dot_product_attention(*(t[a:z].transpose(0, 1)[None] for t in (q, k, v)), is_causal=True)

    pad = lambda t: torch.stack([F.pad(t[a:z], (0, 0, 0, 0, 0, lmax - (z - a)))  # noqa: E731
                                 for a, z in zip(cu[:-1].tolist(), cu[1:].tolist())]).transpose(1, 2)
    qp, kp, vp = pad(q), pad(k), pad(v)
    valid = (torch.arange(lmax)[None, :] < torch.tensor(lens)[:, None]).to(dev)
    mask = (torch.ones(lmax, lmax, dtype=torch.bool, device=dev).tril()[None] & valid[:, None, :])[:, None]
    t_seq = time_fn(per_sequence, ctx)
    t_pad = time_fn(lambda: F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask), ctx)
    t_tersor_pad = time_fn(lambda: sage_attention(qp, kp, vp, is_causal=True, key_padding_mask=valid), ctx)
    baseline, t_base = ("SDPA per sequence", t_seq) if t_seq <= t_pad else ("SDPA padded + mask", t_pad)
    qk, pv = pick_modes(torch.device(dev))
    path = cuda_path_name(torch.device(dev), qk, pv)
    if ctx.is_cuda and not CUDA_KERNELS_READY:
        path += ", unverified"
    return Result(family="attention", op=f"sage_attention_varlen {qk}+{pv} [{path}]",
                  shape=f"{len(lens)} seqs {min(lens)}..{lmax} h{h} d{d} causal", dtype=str(dtype).replace("torch.", ""),
                  tersor_ms=t_var, baseline=baseline, baseline_ms=t_base,
                  extra={"sdpa_per_sequence_ms": t_seq, "sdpa_padded_ms": t_pad, "tersor_padded_ms": t_tersor_pad,
                         "varlen_vs_tersor_padded": t_tersor_pad / t_var,
                         "padding_waste": 1 - total / (len(lens) * lmax)})


def _random_codes(cache):
    """Valid random cache contents (INT8 K codes, e4m3 V codes without NaN, positive scales), generated on the
    cache's device: what append would write, for timing."""
    dev = cache.device
    cache.k_codes.random_(-127, 128)
    cache.v_codes.copy_(torch.randint(0, 0x7e, cache.v_codes.shape, dtype=torch.uint8, device=dev)
                        | (torch.randint(0, 2, cache.v_codes.shape, dtype=torch.uint8, device=dev) << 7))
    cache.k_scale.uniform_(0.01, 0.06)
    cache.page_meta[:, :, 0].normal_()
    cache.page_meta[:, :, 1].uniform_(0.001, 0.01)


def _decode_cuda_case(ctx, b, hq, hkv, d, seqlen, page_size=64):
    g = torch.Generator().manual_seed(seqlen + b)
    pages = seqlen // page_size
    cache = PagedKVCache(b * pages, page_size, hkv, d, dtype=torch.float16, device="cuda")
    torch.manual_seed(seqlen + b)
    _random_codes(cache)
    bt = torch.randperm(b * pages, generator=g).view(b, pages).to(torch.int32).cuda()
    sl = torch.full((b,), seqlen, dtype=torch.int32, device="cuda")
    q = torch.randn(b, 1, hq, d, generator=g).to(torch.float16).cuda()
    # The op itself (the planner's split, num_workers -1): sage_decode's index checks add one host sync per
    # call, which a serving loop would do once per batch, not per layer; timed separately.
    scale = 1 / d ** 0.5
    t_dec = time_fn(lambda: torch.ops.tersor.sage_decode_paged(q, cache.k_codes, cache.k_scale, cache.v_codes,
                                                                cache.page_meta, bt, sl, scale, -1, -1, -1), ctx)
    t_checked = time_fn(lambda: sage_decode(q, cache, bt, sl), ctx)
    kc = torch.randn(b, hkv, seqlen, d, dtype=torch.float16, device="cuda")
    vc = torch.randn(b, hkv, seqlen, d, dtype=torch.float16, device="cuda")
    qs = q.transpose(1, 2)
    t_sdpa = time_fn(lambda: F.scaled_dot_product_attention(qs, kc, vc, enable_gqa=True), ctx)
    acc = {}
    if b * seqlen <= 16384:  # the twin on the same cache (CPU; small cases only)
        cpu = PagedKVCache(b * pages, page_size, hkv, d, dtype=torch.float16)
        for name in ("k_codes", "k_scale", "v_codes", "page_meta"):
            getattr(cpu, name).copy_(getattr(cache, name).cpu())
        out = sage_decode(q, cache, bt, sl).cpu()  # the planner's split: differs from the one-pass twin by rounding
        ref = sage_decode(q.cpu(), cpu, bt.cpu(), sl.cpu())
        acc = {"rel_l1_vs_twin": _rel_l1(out, ref)}
    read = b * hkv * seqlen * (2 * d + 4) + b * hkv * pages * 2 * d * 4  # codes + k_scale + page_meta
    tag = "cuda" if _paged.CUDA_DECODE_READY else "cuda, unverified"
    return Result(family="attention", op=f"sage_decode int8+fp8 paged [{tag}]",
                  shape=f"b{b} hq{hq}/hkv{hkv} d{d} L{seqlen} page{page_size}", dtype="float16",
                  tersor_ms=t_dec, baseline="SDPA float16 cache", baseline_ms=t_sdpa, accuracy=acc,
                  extra={"cache_bytes": cache.nbytes, "baseline_cache_bytes": 2 * kc.numel() * kc.element_size(),
                         "with_index_checks_ms": t_checked, "cache_read_GBps": read / (t_dec * 1e-3) / 1e9,
                         "sdpa_read_GBps": 2 * kc.numel() * kc.element_size() / (t_sdpa * 1e-3) / 1e9})


@register("attention")
def bench_decode(ctx) -> list[Result]:
    if ctx.is_cuda:
        if ctx.quick:
            return [_decode_cuda_case(ctx, 1, 32, 8, 128, 4096)]
        rows = [_decode_cuda_case(ctx, b, 32, 8, 128, L) for b in (1, 8, 32) for L in (4096, 16384, 131072)
                if b * L <= 32 * 32768]
        g = torch.Generator().manual_seed(15)
        lens = torch.randint(512, 8193, (16,), generator=g).tolist()  # 16 sequences of 0.5K-8K tokens
        return rows + [_varlen_case(ctx, lens, 32, 128, torch.float16)]
    if ctx.quick:
        return [_decode_case(ctx, 1, 8, 2, 128, 1024), _varlen_case(ctx, [100, 37, 300], 2, 64)]
    rows = [_decode_case(ctx, b, 32, 8, 128, L) for b, L in ((1, 4096), (8, 4096), (1, 16384))]
    rows.append(_varlen_case(ctx, [512, 64, 1024, 200, 17, 777], 8, 128))
    return rows
