"""Timing: warm-up, then the median of repeated runs; CUDA events on the GPU, with the L2 flushed
before each run when the working set could sit in it."""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable

import torch


@dataclasses.dataclass
class BenchContext:
    device: str  # "cpu" or "cuda"
    quick: bool = False  # fewer shapes and repeats (CI smoke runs)
    budget_s: float = 0.25  # target measuring time per timed function
    families: tuple = ()  # the families named on the command line (empty: all); a benchmark may do more when named

    @property
    def is_cuda(self) -> bool:
        return self.device == "cuda"


_flush_buffer: torch.Tensor | None = None


def _l2_flush_buffer() -> torch.Tensor:
    global _flush_buffer
    if _flush_buffer is None:
        l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20)
        _flush_buffer = torch.empty(2 * max(l2, 64 << 20), dtype=torch.uint8, device="cuda")
    return _flush_buffer


def time_fn(fn: Callable[[], object], ctx: BenchContext, flush_l2: bool = True, max_reps: int = 200) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    if ctx.is_cuda:
        return _time_cuda(fn, ctx, flush_l2, max_reps)
    return _time_cpu(fn, ctx, max_reps)


def _time_cpu(fn, ctx, max_reps):
    fn()  # warm-up (allocations, caches, lazy init)
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-6)
    reps = 3 if ctx.quick else int(min(max_reps, max(3, ctx.budget_s / once)))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _time_cuda(fn, ctx, flush_l2, max_reps):
    flush = _l2_flush_buffer() if flush_l2 else None
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    once = max(start.elapsed_time(end) / 1e3, 1e-6)
    reps = 10 if ctx.quick else int(min(max_reps, max(10, ctx.budget_s / once)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        if flush is not None:
            flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))
