"""Block-sparse (BSR) linear: ``tersor.sparse.bsr_linear`` against dense ``torch.matmul`` and torch's own BSR
matmul, 64 x 64 blocks at 5/10/20/30/50% block density, on the same machine in the same run.

* CUDA: fp16, W 8192 x 8192, 1 / 16 / 256 / 4096 tokens; torch's BSR baseline is
  ``torch.sparse._triton_ops.bsr_dense_mm`` (Triton; its row says why when it cannot run).
  Target: >= 6x dense and >= 1.5x bsr_dense_mm at 10% density.
* CPU: fp32 (torch's CPU BSR matmul, MKL, has no fp16), W 2048 x 2048, 1 and 64 tokens; torch's BSR
  baseline is ``W_bsr @ x.T`` on the sparse-BSR tensor.
Each configuration gives two rows (baseline dense, baseline torch BSR; when torch's BSR cannot run, the dense
row's ``extra`` says why); ``extra`` holds density, tokens and stored bytes, ``accuracy`` the max error
against the fp32 dense product.
"""

from __future__ import annotations

import warnings

import torch

from tersor.bench import Result, register, time_fn
from tersor.sparse import bsr_linear, to_bsr

_DENSITIES = (0.05, 0.10, 0.20, 0.30, 0.50)


def _block_sparse(n, k, bs, density, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(n // bs, k // bs, generator=g) < density
    w = torch.randn(n, k, generator=g) * 0.02
    w = w * keep.repeat_interleave(bs, 0).repeat_interleave(bs, 1)
    return w.to(device=device, dtype=dtype)


def _torch_bsr_fn(w, x, bs, is_cuda):
    """(name, fn) for torch's BSR matmul of x @ W^T, or (name, None, why) when it cannot run here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w_bsr = w.to_sparse_bsr(bs)
    if is_cuda:
        name = "torch.sparse._triton_ops.bsr_dense_mm"
        try:
            from torch.sparse._triton_ops import bsr_dense_mm

            xt = x.t().contiguous()
            fn = lambda: bsr_dense_mm(w_bsr, xt)  # noqa: E731  -- [N, T]; the transpose is a view
            fn()
            return name, fn, ""
        except Exception as e:  # noqa: BLE001  -- report why in the row
            return name, None, f"{type(e).__name__}: {e}"[:200]
    name = "torch sparse BSR matmul (W_bsr @ x.T, CPU)"
    try:
        xt = x.t()
        fn = lambda: w_bsr @ xt  # noqa: E731
        fn()
        return name, fn, ""
    except Exception as e:  # noqa: BLE001
        return name, None, f"{type(e).__name__}: {e}"[:200]


@register("sparse")
def bench_bsr(ctx) -> list[Result]:
    dev, bs = ctx.device, 64
    if ctx.is_cuda:
        n = k = 8192
        token_list, dtype = (1, 16, 256, 4096), torch.float16
    else:
        n = k = 2048
        token_list, dtype = (1, 64), torch.float32
    densities = _DENSITIES
    if ctx.quick:
        n = k = 1024
        token_list, densities = (1, 16), (0.10, 0.50)
    results = []
    dtype_name = str(dtype).replace("torch.", "")
    for density in densities:
        w = _block_sparse(n, k, bs, density, dtype, dev, seed=int(density * 100))
        b = to_bsr(w, bs)
        for tokens in token_list:
            x = torch.randn(tokens, k, device=dev).to(dtype)
            t_ours = time_fn(lambda: bsr_linear(x, b), ctx)
            t_dense = time_fn(lambda: torch.matmul(x, w.t()), ctx)
            ref = torch.matmul(x.float(), w.float().t())
            err = (bsr_linear(x, b).float() - ref).abs().max().item()
            extra = {"density": density, "blocksize": bs, "tokens": tokens, "nnz_blocks": b.nnz_blocks,
                     "weight_bytes": b.values.numel() * b.values.element_size() + 4 * (b.col_indices.numel()
                                                                                    + b.crow_indices.numel()
                                                                                    + b.schedule.numel()),
                     "dense_weight_bytes": w.numel() * w.element_size()}
            acc = {"max_abs_err_vs_fp32_matmul": err}
            name, fn, why = _torch_bsr_fn(w, x, bs, ctx.is_cuda)
            if fn is None:  # no row with a missing baseline: say why in the dense row
                extra[f"{name} unavailable"] = why
            shape = f"{tokens}x{k}->{n}"
            op = f"bsr_linear d={density:.2f}"
            results.append(Result(family="sparse", op=op, shape=shape, dtype=dtype_name, tersor_ms=t_ours,
                                  baseline=f"torch.matmul (dense {dtype_name} weight)", baseline_ms=t_dense,
                                  accuracy=dict(acc), extra=dict(extra)))
            if fn is not None:
                results.append(Result(family="sparse", op=op, shape=shape, dtype=dtype_name, tersor_ms=t_ours,
                                      baseline=name, baseline_ms=time_fn(fn, ctx), accuracy=dict(acc),
                                      extra=dict(extra)))
    return results
