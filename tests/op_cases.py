"""Sample inputs for every public torch.ops.tersor operator: the registry the contract tests walk.

Adding an op means adding its cases here; tests/test_op_contract.py fails for a public op without any.
Each entry: op name -> function(device) returning a list of (args, kwargs).
"""

import torch


def _hadamard(device):
    cases = []
    for n, dtype in [(64, torch.float32), (256, torch.float16), (12 * 8, torch.bfloat16), (1, torch.float32)]:
        x = torch.randn(3, n, device=device).to(dtype)
        cases.append(((x,), {}))
        cases.append(((x,), {"scale": 0.5, "transpose": True}))
    cases.append(((torch.randn(2, 5, 128, device=device),), {"scale": None}))
    cases.append(((torch.randn(2, 20 * 4, device=device, requires_grad=True),), {"transpose": True}))
    return cases


OP_CASES = {
    "hadamard_transform": _hadamard,
}
