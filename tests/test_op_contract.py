"""The op contract (docs/ops.md) for every public tersor op: CPU (and, on a CUDA build, CUDA) kernels,
a fake kernel, torch.library.opcheck, and torch.compile(fullgraph=True)."""

import pytest
import torch

import tersor
from conftest import HAS_CUDA
from op_cases import OP_CASES


def public_ops():
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("tersor::")]
    return sorted(n.split("::", 1)[1].split(".")[0] for n in names if not n.split("::", 1)[1].startswith("_"))


def test_every_public_op_has_cases():
    ops = public_ops()
    assert ops, "no tersor ops registered"
    missing = [op for op in ops if op not in OP_CASES]
    assert not missing, f"ops without opcheck/compile cases in tests/op_cases.py: {missing}"


@pytest.mark.parametrize("op", public_ops())
def test_kernels_registered(op):
    q = f"tersor::{op}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(q, "CPU"), f"{q} has no CPU kernel"
    assert torch._library.simple_registry.singleton.find(q).fake_impl.kernel is not None, f"{q} has no fake"
    if tersor.build_info()["cuda"] == "1":
        assert torch._C._dispatch_has_kernel_for_dispatch_key(q, "CUDA"), f"{q} has no CUDA kernel"


def _devices():
    return ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("op", sorted(OP_CASES))
def test_opcheck(op, device):
    overload = getattr(torch.ops.tersor, op).default
    for args, kwargs in OP_CASES[op](device):
        torch.library.opcheck(overload, args, kwargs)


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("op", sorted(OP_CASES))
def test_compile_fullgraph(op, device):
    torch._dynamo.reset()
    overload = getattr(torch.ops.tersor, op).default
    args, kwargs = OP_CASES[op](device)[0]

    def f(*a):
        return overload(*a, **kwargs)

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    out, ref = compiled(*args), f(*args)
    torch.testing.assert_close(out, ref)
