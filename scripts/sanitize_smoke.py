"""Runs every CUDA kernel once on small inputs (for compute-sanitizer, via scripts/gpu_check.sh)."""

import torch

import tersor

sizes = [1 << i for i in range(16)] + [k << lg for k in tersor.ops.HADAMARD_K_SIZES for lg in (0, 3)]
for n in sizes:
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(3, n, device="cuda").to(dtype)
        tersor.hadamard_transform(x)
        tersor.hadamard_transform(x, transpose=True)
torch.cuda.synchronize()
print(f"sanitize_smoke: ran {len(sizes) * 6} hadamard launches")
