"""Gradients of the compressed layers' continuous parameters (issue 18): E8PLinear (SU, SV, Wscale, bias, x)
and AQLMLinear (codebooks, scales, bias, x), against a float64 dense reference built independently (its own
decode of the codes, explicit Hadamard matrices, autograd in float64) and against finite differences of the
layer itself."""

import pytest
import torch

from tersor.nn import AQLMLinear, E8PLinear
from tersor.quant import quipsharp
from tersor.quant.quipsharp import E81B


def sylvester(n):
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n**0.5


def e8p_codes_dense(state, m, n, resid_scale):
    """W^ [m, n] float64 from the codes, with tersor.quant's pure-Python decode (not the C++ op)."""
    from tersor.quant.e8p12 import e8p12_decode

    q = state["Qidxs"]
    bits = quipsharp.qidxs_bits(q, n)
    w_hat = e8p12_decode(quipsharp.unpack_qidxs_e8p(q[:, : n // 32])).reshape(m, n).double()
    if bits == 4:
        w_hat += e8p12_decode(quipsharp.unpack_qidxs_e8p(q[:, n // 32:])).reshape(m, n).double() / resid_scale
    elif bits == 3:
        codes = torch.stack([(q[:, n // 32:] >> (8 * j)) & 0xFF for j in range(8)], -1).reshape(m, n // 8)
        w_hat += E81B[codes].reshape(m, n).double() / resid_scale
    return w_hat


def e8p_layer(bits, m, n, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    st = quipsharp.quantize_e8p(torch.randn(m, n, generator=g), bits=bits)
    # real-valued, float32 scales (what fine-tuning trains), not the quantizer's fp16 signs
    st["SU"] = st["SU"].float() * (1 + 0.3 * torch.rand(n, generator=g))
    st["SV"] = st["SV"].float() * (1 + 0.3 * torch.rand(m, generator=g))
    b = torch.randn(m, generator=g) if bias else None
    return E8PLinear(st, b), st


def train_mode(layer):
    ts = layer.continuous_tensors()
    for t in ts.values():
        t.requires_grad_(True)
    return ts


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("xshape", [(3,), (2, 5)])
def test_e8p_grads_match_float64_dense_reference(bits, bias, xshape):
    m, n = 32, 128
    layer, st = e8p_layer(bits, m, n, bias, seed=bits)
    ts = train_mode(layer)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*xshape, n, generator=g, requires_grad=True)
    r = torch.randn(*xshape, m, generator=g)
    (layer(x) * r).sum().backward()

    su, sv = st["SU"].detach().double().requires_grad_(), st["SV"].detach().double().requires_grad_()
    ws = st["Wscale"].detach().double().reshape(()).clone().requires_grad_()
    b = None if not bias else layer.bias.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    w_hat = e8p_codes_dense(st, m, n, layer._resid)
    w = (sv * ws)[:, None] * (sylvester(m) @ w_hat @ sylvester(n).T) * su[None, :]
    y = x64 @ w.T + (0 if b is None else b)
    (y * r.double()).sum().backward()
    pairs = [(x.grad, x64.grad), (ts["SU"].grad, su.grad), (ts["SV"].grad, sv.grad), (ts["Wscale"].grad, ws.grad)]
    if bias:
        pairs.append((ts["bias"].grad, b.grad))
    for got, want in pairs:
        assert got is not None
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    assert layer.Qidxs.grad is None


@pytest.mark.parametrize("bias", [False, True])
def test_e8p_grads_match_finite_differences(bias):
    # y is linear in each single coordinate of SU, SV, Wscale, bias and x, so a central difference with a
    # large step is exact up to float32 rounding
    m, n = 16, 64
    layer, _ = e8p_layer(2, m, n, bias, seed=7)
    ts = train_mode(layer)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, n, generator=g)
    r = torch.randn(4, m, generator=g)
    (layer(x) * r).sum().backward()

    def loss():
        with torch.no_grad():
            return float((layer(x).double() * r.double()).sum())

    for name, t in ts.items():
        flat = t.data.reshape(-1)
        for i in torch.randperm(flat.numel(), generator=g)[:5].tolist():
            old = flat[i].item()
            flat[i] = old + 0.5
            up = loss()
            flat[i] = old - 0.5
            down = loss()
            flat[i] = old
            fd = (up - down) / 1.0
            assert abs(t.grad.reshape(-1)[i].item() - fd) <= 2e-3 * (1 + abs(fd)), (name, i)


def test_e8p_inference_unchanged_without_grad():
    layer, _ = e8p_layer(2, 32, 128, True)
    x = torch.randn(3, 128)
    y0 = layer(x)
    train_mode(layer)
    with torch.no_grad():
        y1 = layer(x)
    y2 = layer(x)
    assert torch.equal(y0, y1) and torch.equal(y0, y2.detach())
    assert y0.grad_fn is None and y2.grad_fn is not None


def aqlm_layer(ncb, nbits, bias, seed=0, out=24, n=64):
    g = torch.Generator().manual_seed(seed)
    entries = 1 << nbits
    codes = torch.randint(-(entries >> 1), entries >> 1, (out, n // 8, ncb), generator=g)
    codes = codes.to(torch.int8 if nbits <= 8 else torch.int16)
    books = torch.randn(ncb, entries, 1, 8, generator=g)
    scales = torch.rand(out, 1, 1, 1, generator=g) + 0.5
    b = torch.randn(out, generator=g) if bias else None
    return AQLMLinear(codes, books, scales, b)


@pytest.mark.parametrize("ncb,nbits", [(1, 4), (2, 8), (3, 5)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("xshape", [(1,), (3,), (2, 6)])
def test_aqlm_grads_match_float64_dense_reference(ncb, nbits, bias, xshape):
    layer = aqlm_layer(ncb, nbits, bias, seed=ncb * 100 + nbits)
    out, n = layer.out_features, layer.in_features
    ts = train_mode(layer)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(*xshape, n, generator=g, requires_grad=True)
    r = torch.randn(*xshape, out, generator=g)
    (layer(x) * r).sum().backward()

    books = layer.codebooks.detach().double().requires_grad_()
    scales = layer.scales.detach().double().requires_grad_()
    b = None if not bias else layer.bias.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    idx = layer.codes.long() % (1 << nbits)  # an entry index, AQLM's "code mod 2^b"
    u = sum(books[c, idx[:, :, c], 0, :] for c in range(ncb))  # [out, in/8, 8]
    w = scales.reshape(out, 1) * u.reshape(out, n)
    y = x64 @ w.T + (0 if b is None else b)
    (y * r.double()).sum().backward()
    pairs = [(x.grad, x64.grad), (ts["codebooks"].grad, books.grad), (ts["scales"].grad, scales.grad)]
    if bias:
        pairs.append((ts["bias"].grad, b.grad))
    for got, want in pairs:
        assert got is not None and got.shape == want.shape
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * max(1.0, want.abs().max().item()))
    assert layer.codes.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_aqlm_backward_single_decode_is_exact(dtype):
    # the backward decodes U once (unit scales) and forms W = U * scales: that must be bit-identical to
    # aqlm_decode(codes, codebooks, scales), so x's gradient is exactly grad @ W
    from tersor.ops import aqlm_decode

    layer = aqlm_layer(2, 8, False, seed=11)
    layer.codebooks, layer.scales = layer.codebooks.to(dtype), layer.scales.to(dtype)
    out = layer.out_features
    w = aqlm_decode(layer.codes, layer.codebooks, layer.scales, torch.float32)
    u = aqlm_decode(layer.codes, layer.codebooks, torch.ones_like(layer.scales), torch.float32)
    assert torch.equal(u * layer.scales.float().reshape(out, 1), w)
    train_mode(layer)
    g = torch.Generator().manual_seed(12)
    x = torch.randn(4, layer.in_features, generator=g, requires_grad=True)
    r = torch.randn(4, out, generator=g)
    (layer(x) * r).sum().backward()
    assert torch.equal(x.grad, r @ w)


def test_aqlm_grads_match_finite_differences():
    layer = aqlm_layer(2, 4, True, seed=5)
    ts = train_mode(layer)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, layer.in_features, generator=g)
    r = torch.randn(5, layer.out_features, generator=g)
    (layer(x) * r).sum().backward()

    def loss():
        with torch.no_grad():
            return float((layer(x).double() * r.double()).sum())

    for name, t in ts.items():
        flat = t.data.reshape(-1)
        # codebook entries actually used by some code, and a few unused ones (gradient 0)
        for i in torch.randperm(flat.numel(), generator=g)[:8].tolist():
            old = flat[i].item()
            flat[i] = old + 0.5
            up = loss()
            flat[i] = old - 0.5
            down = loss()
            flat[i] = old
            fd = (up - down) / 1.0
            assert abs(t.grad.reshape(-1)[i].item() - fd) <= 2e-3 * (1 + abs(fd)), (name, i)


def test_aqlm_half_precision_grads_keep_dtypes():
    layer = aqlm_layer(2, 8, True)
    layer.codebooks = layer.codebooks.half()
    layer.scales = layer.scales.half()
    ts = train_mode(layer)
    x = torch.randn(3, layer.in_features, dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().sum().backward()
    assert x.grad.dtype == torch.bfloat16
    assert ts["codebooks"].grad.dtype == torch.float16 and ts["scales"].grad.dtype == torch.float16


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_grads_on_cuda_match_cpu():
    # the backward runs the CUDA decode ops there (not run on this project's CPU machines: no GPU)
    for make in (lambda: e8p_layer(2, 32, 128, True)[0], lambda: aqlm_layer(2, 8, True)):
        cpu = make()
        gpu = make().cuda()
        x = torch.randn(5, cpu.in_features)
        grads = []
        for layer, xx in ((cpu, x), (gpu, x.cuda())):
            ts = train_mode(layer)
            xx = xx.clone().requires_grad_(True)
            layer(xx).square().sum().backward()
            grads.append([xx.grad.cpu()] + [t.grad.cpu() for t in ts.values()])
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * max(1.0, a.abs().max().item()))
