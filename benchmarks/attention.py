"""Quantized attention (``tersor.attention.sage_attention``, SageAttention2 numerics) against
``F.scaled_dot_product_attention``.

* Speed: the same q/k/v through sage_attention (default modes of the device) and SDPA in the same run.
  GPU: SDPA in fp16 (flash / cuDNN, whichever torch picks); the issue's target shapes are hd128, b4 h32,
  L = 1K..32K. Until ``tersor.attention.CUDA_KERNELS_READY`` (the stage-1 sm8x kernels validated on a GPU)
  the CUDA rows are skipped. CPU: the CPU twin (an exact emulation of
  the kernels' numerics, not a fast path) against the faster of fp32 and fp16 SDPA, small sizes.
* ``extra``: TOPS of both (4·b·h·d·L², halved when causal); ``accuracy``: cosine similarity and relative L1
  of sage_attention (default modes, and INT4 QK) against an fp64 reference.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from tersor import attention
from tersor.bench import Result, register, time_fn


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
    path = attention.cuda_path_name(torch.device(dev), qk, pv)  # which kernel the row measured
    return Result(family="attention", op=f"sage_attention {qk}+{pv} [{path}]", shape=f"b{b} h{h} L{seq} d{d}" + (" causal" if causal else ""),
                  dtype=str(dtype).replace("torch.", ""), tersor_ms=t_sage, baseline=baseline, baseline_ms=t_sdpa,
                  accuracy=acc, extra={"tersor_tops": flops / t_sage / 1e9, "baseline_tops": flops / t_sdpa / 1e9})


@register("attention")
def bench_attention(ctx) -> list[Result]:
    if ctx.is_cuda:
        if not attention.CUDA_KERNELS_READY:
            print("[attention bench] CUDA rows skipped: the CUDA sage kernels are not validated yet")
            return []
        shapes = [(4, 32, 1024, 128, False)] if ctx.quick else \
            [(4, 32, s, 128, c) for s in (1024, 2048, 4096, 8192, 16384, 32768) for c in (False, True)] + \
            [(4, 32, s, 64, False) for s in (1024, 4096, 16384)]
        return [_case(ctx, *s, accuracy=s[2] <= 4096) for s in shapes]
    shapes = [(1, 2, 256, 64, False)] if ctx.quick else \
        [(1, 4, 256, 64, False), (1, 4, 1024, 64, False), (1, 4, 1024, 128, True), (2, 8, 512, 128, False)]
    return [_case(ctx, *s) for s in shapes]
