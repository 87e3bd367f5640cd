"""AQLM's data-aware objective (issue 13): ``quantize_aqlm(..., hessian=H)`` minimises the proxy loss
tr((W - W^) H (W - W^)^T) (the layer's output error on the calibration inputs), and ``tersor.quantize_``
with ``calibration`` feeds it each layer's Hessian, block by block."""

from __future__ import annotations

import importlib.util
import itertools

import pytest
import torch

import tersor
from tersor.nn import AQLMLinear
from tersor.quant import aqlm as A
from tersor.quant import aqlm_dequantize_reference, quantize_aqlm

pytestmark = pytest.mark.usefixtures("one_thread")


def correlated(out, inn, seed=0, tokens=None):
    """A Gaussian weight and the second moment of inputs with a decaying spectrum (1 .. 1e-2) in a random basis."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inn, generator=g)
    u, _, v = torch.linalg.svd(torch.randn(inn, inn, generator=g))
    x = torch.randn(tokens or 4 * inn, inn, generator=g) @ (u * torch.logspace(0, -2, inn)) @ v
    return w, x.T @ x / len(x)


def proxy(w, q, h):
    """tr((W - W^) H (W - W^)^T) / tr(W H W^T), in float64."""
    r = (aqlm_dequantize_reference(q["codes"], q["codebooks"], q["scales"]).double() - w.double())
    h = h.double()
    return float(((r @ h) * r).sum() / ((w.double() @ h) * w.double()).sum())


@pytest.mark.parametrize("opts", [dict(iters=1, kmeans_iters=2, beam_size=1), dict(iters=3, beam_size=4)],
                         ids=["fast", "beam4"])
def test_hessian_lowers_the_proxy_loss(opts):
    # measured (128 x 256): fast 0.073 data-free -> 0.030 (sigma_reg 1e-2), 0.04 (default 1.0); beam4 lower still
    w, h = correlated(128, 256)
    free = proxy(w, quantize_aqlm(w, **opts), h)
    aware = proxy(w, quantize_aqlm(w, hessian=h, **opts), h)
    sharp = proxy(w, quantize_aqlm(w, hessian=h, sigma_reg=1e-2, **opts), h)
    assert aware < 0.75 * free, (aware, free)
    assert sharp < 0.6 * free and sharp <= aware * 1.01, (sharp, aware, free)


def test_hessian_rounds_never_raise_the_damped_loss():
    w, h = correlated(64, 256, seed=1)  # 2048 groups of 8 for 2 x 256 entries: not exact
    hd = h + 1.0 * h.diagonal().mean() * torch.eye(256)  # what the quantizer minimises at sigma_reg=1
    init = proxy(w, quantize_aqlm(w, hessian=h, iters=0), hd)
    losses = [proxy(w, quantize_aqlm(w, hessian=h, iters=i), hd) for i in (1, 2, 4)]
    assert losses[0] < init and all(b <= a * (1 + 1e-3) for a, b in zip(losses, losses[1:])), (init, losses)


@pytest.mark.parametrize("span", [1, 2, 16])
def test_code_search_with_a_full_beam_is_exhaustive(monkeypatch, span):
    """With a beam as wide as every code combination, the beam search must find each row's optimum: this
    checks the exact loss change of a step (the groups coupled through H), the lazy gradient update across
    spans of groups and the hypothesis bookkeeping."""
    monkeypatch.setattr(A, "_SPAN", span)
    g = torch.Generator().manual_seed(5)
    out, inn, num_books, k = 6, 24, 2, 3
    w, h = correlated(out, inn, seed=5)
    books = torch.randn(num_books, k, 8, generator=g)
    codes = torch.randint(0, k, (out, inn // 8, num_books), generator=g)
    scales = torch.rand(out, generator=g) + 0.5
    found = A._codes_under_h(w, h, books, codes, scales, beam=k ** (num_books * inn // 8))
    got = A._h_loss(w, A._decode_rows(books, found), scales, h)
    combos = torch.tensor(list(itertools.product(range(k), repeat=num_books * inn // 8)))  # [k^4, 4]
    every = combos.view(-1, 1, inn // 8, num_books).expand(-1, out, -1, -1)
    best = torch.stack([A._h_loss(w, A._decode_rows(books, c), scales, h) for c in every]).min(0).values
    torch.testing.assert_close(got, best, rtol=1e-5, atol=1e-6)
    greedy = A._codes_under_h(w, h, books, codes, scales, beam=1)
    start = A._h_loss(w, A._decode_rows(books, codes), scales, h)
    assert (A._h_loss(w, A._decode_rows(books, greedy), scales, h) <= start * (1 + 1e-6)).all()


def test_codebook_update_is_the_least_squares_solution():
    g = torch.Generator().manual_seed(6)
    out, inn, num_books, k = 8, 32, 2, 8
    w, h = correlated(out, inn, seed=6)
    h = (h + 1e-2 * h.diagonal().mean() * torch.eye(inn)).double()  # damped as the quantizer's smallest default
    codes = torch.randint(0, k, (out, inn // 8, num_books), generator=g)
    scales = (torch.rand(out, generator=g) + 0.5).double()
    books = A._books_under_h(w.double(), h, torch.randn(num_books, k, 8, generator=g).double(), codes, scales)
    # dense least squares: minimise sum_o |(s_o q_o(B) - w_o) L|^2 with H = L L^T, over the stacked entries
    n = num_books * k * 8
    eye = torch.eye(n, dtype=torch.float64)
    a = torch.stack([(scales[:, None] * A._decode_rows(eye[i].view(num_books, k, 8), codes)).reshape(-1)
                     for i in range(n)], 1).view(out, inn, n)
    chol = torch.linalg.cholesky(h)
    al = (a.transpose(1, 2) @ chol).transpose(1, 2).reshape(-1, n)
    best = torch.linalg.lstsq(al, (w.double() @ chol).reshape(-1, 1), driver="gelsd").solution.view(num_books, k, 8)
    got_loss = float(A._h_loss(w.double(), A._decode_rows(books, codes), scales, h).sum())
    best_loss = float(A._h_loss(w.double(), A._decode_rows(best, codes), scales, h).sum())
    assert got_loss <= best_loss * (1 + 1e-3), (got_loss, best_loss)


def test_hessian_argument_errors():
    w, h = correlated(16, 32)
    with pytest.raises(ValueError, match=r"hessian must be \[32, 32\]"):
        quantize_aqlm(w, hessian=h[:16, :16])
    with pytest.raises(TypeError, match="hessian must be a float tensor"):
        quantize_aqlm(w, hessian=h.long())
    with pytest.raises(ValueError, match="non-finite"):
        quantize_aqlm(w, hessian=h * float("nan"))
    with pytest.raises(ValueError, match="non-positive mean diagonal"):
        quantize_aqlm(w, hessian=torch.zeros(32, 32))
    with pytest.raises(ValueError, match="sigma_reg"):
        quantize_aqlm(w, hessian=h, sigma_reg=-1.0)
    with pytest.raises(NotImplementedError, match="out_group_size=2"):
        quantize_aqlm(w, hessian=h, out_group_size=2)
    with pytest.raises(TypeError, match="data_aware must be None or a bool"):
        tersor.AQLMConfig(data_aware=1)
    with pytest.raises(ValueError, match="sigma_reg"):
        tersor.AQLMConfig(sigma_reg=-0.5)


# ----------------------------------------------------------------------------------- through quantize_
needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="needs transformers")
FAST = dict(iters=1, kmeans_iters=2, beam_size=1)


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def calibration():
    return [{"input_ids": torch.randint(0, 96, (1, 48), generator=torch.Generator().manual_seed(i))} for i in range(4)]


def run(tiny, **kw):
    import copy

    m = copy.deepcopy(tiny)
    calib = kw.pop("calibration", None)
    rep = tersor.quantize_(m, tersor.AQLMConfig(2, 8, **FAST, **kw), calibration=calib, progress=False)
    return m, rep


@needs_transformers
def test_quantize_calibrated_aqlm_is_data_aware(tiny):
    free, rep_free = run(tiny, data_aware=False, calibration=calibration())
    aware, rep_aware = run(tiny, calibration=calibration())
    assert "block by block" in rep_aware.calibration and len(rep_aware.layers) == 14
    assert all(isinstance(free.get_submodule(r.fqn), AQLMLinear) for r in rep_aware.layers)
    err_free = sum(r.rel_err for r in rep_free.layers) / len(rep_free.layers)
    err_aware = sum(r.rel_err for r in rep_aware.layers) / len(rep_aware.layers)
    assert err_aware < 0.85 * err_free, (err_aware, err_free)
    # data_aware=False with calibration: the same layers as without any data
    nodata, _ = run(tiny)
    for r in rep_free.layers:
        a, b = free.get_submodule(r.fqn), nodata.get_submodule(r.fqn)
        assert all(torch.equal(getattr(a, t), getattr(b, t)) for t in ("codes", "codebooks", "scales")), r.fqn
    assert any(not torch.equal(aware.get_submodule(r.fqn).codes, nodata.get_submodule(r.fqn).codes)
               for r in rep_free.layers)


@needs_transformers
def test_quantize_data_aware_true_needs_calibration(tiny):
    with pytest.raises(ValueError, match=r"AQLMConfig \(hessian\) needs calibration data.*data_aware"):
        run(tiny, data_aware=True)
