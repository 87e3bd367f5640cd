"""hadamard_transform vs the strongest alternatives on the same machine.

Baselines: a dense matmul with the explicit n x n Hadamard matrix (cuBLAS / MKL via torch.matmul, where
the matrix fits) and a pure-PyTorch O(n log n) butterfly; the faster of the two is the reported
baseline. A device copy of the same bytes is the roofline: ``extra.frac_of_copy`` is copy time / tersor
time (the issue's goal on H100: >= 0.8 for fp16 rows of 256..32768).
"""

from __future__ import annotations

import math

import torch

import tersor
from tersor.bench import Result, register, time_fn


def _right_matrix(n: int, dtype, device) -> torch.Tensor:
    """M = (H / sqrt(n)).T, so that x @ M == hadamard_transform(x) (row i of M is the transform of e_i)."""
    return tersor.hadamard_transform(torch.eye(n, device=device, dtype=torch.float32)).to(dtype)


def _torch_fwht(x: torch.Tensor, had_k: torch.Tensor | None, scale: float) -> torch.Tensor:
    n = x.shape[-1]
    k = 1 if had_k is None else had_k.shape[0]
    m = n // k
    y = x.reshape(-1, m)
    h = 1
    while h < m:
        y = y.view(-1, m // (2 * h), 2, h)
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2).view(-1, m)
        h *= 2
    y = y.view(-1, k, m)
    if had_k is not None:
        y = torch.matmul(had_k, y)
    return (y * scale).view(x.shape)


def _reference(x: torch.Tensor, had_k: torch.Tensor | None, scale: float) -> torch.Tensor:
    """float64 truth from the pure-PyTorch butterfly. Independent of tersor's kernels; H_K itself is read
    from tersor's table (tests/test_hadamard.py checks that table against the generator)."""
    return _torch_fwht(x.double().cpu(), None if had_k is None else had_k.double().cpu(), scale)


@register("hadamard")
def bench_hadamard(ctx) -> list[Result]:
    dev = ctx.device
    if ctx.is_cuda:
        dtype, total = torch.float16, 1 << 26  # 128 MiB in, 128 MiB out: far past L2
        sizes = [256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 11008, 28672]
        matmul_max_n = 32768
    else:
        dtype, total = torch.float32, 1 << 20
        sizes = [256, 1024, 4096, 11008]
        matmul_max_n = 4096
    if ctx.quick:
        sizes = sizes[:2] + sizes[-1:]
        total = min(total, 1 << 18)
    results = []
    for n in sizes:
        k, _ = tersor.ops.hadamard_factor(n)
        rows = max(1, total // n)
        x = torch.randn(rows, n, device=dev).to(dtype)
        scale = 1.0 / math.sqrt(n)
        t_ours = time_fn(lambda: tersor.hadamard_transform(x), ctx)
        out = torch.empty_like(x)
        t_copy = time_fn(lambda: out.copy_(x), ctx)

        had_k = None if k == 1 else (_right_matrix(k, torch.float32, dev).T * math.sqrt(k)).round().to(dtype)
        baselines = {"torch_butterfly": time_fn(lambda: _torch_fwht(x, had_k, scale), ctx)}
        if n <= matmul_max_n:
            h = _right_matrix(n, dtype, dev)
            baselines["torch.matmul(x, H)"] = time_fn(lambda: torch.matmul(x, h), ctx)
        best = min(baselines, key=baselines.get)

        sample = x[:64]
        truth = _reference(sample, had_k, scale)
        ours = tersor.hadamard_transform(sample).double().cpu()
        accuracy = {"max_abs_err": (ours - truth).abs().max().item()}
        if "torch.matmul(x, H)" in baselines:
            accuracy["matmul_max_abs_err"] = (torch.matmul(sample, h).double().cpu() - truth).abs().max().item()
        bytes_moved = 2 * x.numel() * x.element_size()
        results.append(Result(
            family="hadamard", op="hadamard_transform", shape=f"{rows}x{n}", dtype=str(dtype).replace("torch.", ""),
            tersor_ms=t_ours, baseline=best, baseline_ms=baselines[best], accuracy=accuracy,
            extra={"k": k, "copy_ms": t_copy, "frac_of_copy": t_copy / t_ours,
                   "tersor_GBps": bytes_moved / t_ours / 1e6, "baselines_ms": baselines}))
    return results
