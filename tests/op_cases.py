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


def _codec_decode(device):
    from tersor import codec

    cases = []
    for shape, dtype in [((64, 256), torch.bfloat16), ((1000,), torch.float32), ((3, 4, 128), torch.float16),
                         ((2,), torch.bfloat16)]:
        ct = codec.compress((torch.randn(shape) * 0.02).to(dtype)).to(device)
        cases.append(((ct.stream, ct.table, ct.header, dtype, list(shape)), {"verify": False}))
    cases.append(((ct.stream, ct.table, ct.header, ct.dtype, list(ct.shape)), {}))
    return cases


def _codec_linear(device):
    from tersor import codec

    cases = []
    for n, k, dtype, lead in [(32, 256, torch.bfloat16, (1,)), (16, 128, torch.float16, (2, 3)),
                              (8, 64, torch.float32, (5,))]:
        ct = codec.compress((torch.randn(n, k) * 0.05).to(dtype)).to(device)
        x = torch.randn(*lead, k, device=device).to(dtype)
        bias = torch.randn(n, device=device).to(dtype)
        cases.append(((x, ct.stream, ct.table, ct.header, dtype, [n, k]), {"bias": bias}))
        cases.append(((x, ct.stream, ct.table, ct.header, dtype, [n, k]), {}))
    return cases


OP_CASES = {
    "hadamard_transform": _hadamard,
    "codec_decode": _codec_decode,
    "codec_linear": _codec_linear,
}
