"""tersor.quant E8P12: QuIP#'s codebook index for index, and the exact nearest-codeword search.

The expected values (worked examples, the packed table's SHA-256, counts) come from QuIP#'s own
definitions (quip-sharp @1d8f873), as recorded in docs/research/e8p12.md.
"""

import hashlib
import struct

import pytest
import torch

from tersor.quant import E8P12_ABS, e8p12_codebook, e8p12_decode, e8p12_nearest
from tersor.quant.e8p12 import PERM

WORKED = {
    0x0000: [.75] * 8,
    0x0001: [.25] * 8,
    0x0003: [-.25, .75, -.25, .75, .75, .75, .75, .75],
    0x0080: [-.75, .25, .25, .25, .25, .25, .25, -.75],
    0x0100: [.75] * 7 + [-1.25],
    0x02FF: [-.25] * 7 + [-2.25],
    0xE300: [1.75, .75, .75, .75, 1.75, 1.75, 1.75, -1.25],
    0x1234: [-.75, -.75, .25, -.75, -1.75, .25, .25, 1.25],
    0xFFFF: [-1.25, -1.25, -.25, -.25, -1.25, -1.25, -1.25, .75],
}


@pytest.mark.parametrize("code", sorted(WORKED))
def test_worked_examples(code):
    assert e8p12_decode(torch.tensor(code)).tolist() == WORKED[code]


def test_abs_grid_matches_quipsharp():
    a = E8P12_ABS
    assert a.shape == (256, 8)
    base, extra = a[:227], a[227:]
    norms = (base * base).sum(1)
    assert sorted(map(tuple, base.tolist())) == list(map(tuple, base.tolist()))  # ascending lexicographic
    assert [int((norms == n).sum()) for n in (2, 4, 6, 8, 10)] == [1, 8, 28, 64, 126]
    assert torch.all((extra * extra).sum(1) == 12) and torch.all(extra.sum(1) == 9)
    assert torch.unique(a, dim=0).shape[0] == 256
    # The 1 KiB table QuIP#'s kernel uses: nibble j = 2 u_j + 8, u = A[a][PERM], u_7 negated for odd sums.
    words = []
    for row in a.tolist():
        u = [row[p] for p in PERM]
        if round(sum(row)) % 2:
            u[7] = -u[7]
        words.append(sum((int(2 * v + 8) & 15) << (4 * j) for j, v in enumerate(u)))
    packed = struct.pack("<256I", *words)
    assert hashlib.sha256(packed).hexdigest() == "efc2c03c60acd955dc812ff2bade9ec6cc31259807e48473506161f3a9a230ce"


def test_codebook_structure():
    cb = e8p12_codebook()
    assert cb.shape == (65536, 8) and torch.unique(cb, dim=0).shape[0] == 65536
    sign_bits = (torch.arange(65536)[:, None] >> torch.arange(8)) & 1
    shift = torch.where(sign_bits.sum(1) % 2 == 1, -0.25, 0.25)  # odd parity of the sign byte: -1/4
    v = cb - shift[:, None]
    # v is in D8 + 1/2 (half-integers with an even sum) and |v| is one of the abs vectors of its index.
    assert torch.all((v * 2) % 2 == 1)
    assert torch.all(v.sum(1).round() % 2 == 0)
    assert torch.equal(v.abs(), E8P12_ABS[torch.arange(65536) >> 8])


def test_every_codeword_is_its_own_nearest():
    cb = e8p12_codebook()
    assert torch.equal(e8p12_nearest(cb).long(), torch.arange(65536))


def _brute_force_dist(x, cb):
    out = []
    for xb in x.split(512):
        out.append(((xb[:, None, :] - cb[None]) ** 2).sum(-1).min(1).values)
    return torch.cat(out)


@pytest.mark.parametrize("scale", [0.3, 1.0, 3.0])
def test_nearest_is_exact_against_brute_force(scale):
    cb = e8p12_codebook().double()
    g = torch.Generator().manual_seed(int(scale * 10))
    x = torch.randn(600, 8, generator=g, dtype=torch.float64) * scale
    # Points on decision boundaries too: midpoints of codeword pairs and exact lattice-like values.
    idx = torch.randint(0, 65536, (100, 2), generator=g)
    x = torch.cat([x, (cb[idx[:, 0]] + cb[idx[:, 1]]) / 2, torch.zeros(1, 8), torch.full((1, 8), 0.5)])
    codes = e8p12_nearest(x)
    got = ((x - cb[codes.long()]) ** 2).sum(-1)
    assert torch.equal(got, _brute_force_dist(x, cb))


def test_nearest_shapes_and_errors():
    x = torch.randn(3, 5, 8)
    assert e8p12_nearest(x).shape == (3, 5)
    assert e8p12_nearest(x.half()).dtype == torch.int32
    with pytest.raises(ValueError, match="last dim"):
        e8p12_nearest(torch.randn(4, 7))
    with pytest.raises(TypeError):
        e8p12_nearest(torch.ones(4, 8, dtype=torch.int64))


@pytest.mark.cuda
def test_nearest_on_cuda_matches_cpu():
    x = torch.randn(5000, 8)
    assert torch.equal(e8p12_nearest(x.cuda()).cpu(), e8p12_nearest(x))
    assert torch.equal(e8p12_decode(torch.arange(65536, device="cuda")).cpu(), e8p12_codebook())


# ------------------------------------------------------------------ QuIP#'s packed Qidxs layout
from tersor.quant import pack_qidxs_e8p, unpack_qidxs_e8p  # noqa: E402


def test_qidxs_round_trip():
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 65536, (32, 128 // 8 * 2), generator=g)  # m = 32, n = 256
    q = pack_qidxs_e8p(codes)
    assert q.dtype == torch.int64 and q.shape == (32, 256 // 32)
    assert torch.equal(unpack_qidxs_e8p(q).long(), codes)


def test_qidxs_layout_element_by_element():
    # Every field where docs/research/e8p12.md §4 says it is: word [I, J, g, q] (flat index
    # I*(n/2) + 32J + 4g + q, the CUDA lane's read) covers rows 16I+2g (+1) and columns 64J+16q..+15;
    # abs byte i = slot i's abs index, sign bit j of slot i at hi bit 4j+i.
    m, n = 32, 128
    g = torch.Generator().manual_seed(4)
    codes = torch.randint(0, 65536, (m, n // 8), generator=g)
    flat = pack_qidxs_e8p(codes).flatten().tolist()
    for I in range(m // 16):
        for J in range(n // 64):
            for gg in range(8):
                for q in range(4):
                    word = flat[I * (n // 2) + 32 * J + 4 * gg + q] & (2**64 - 1)
                    lo, hi = word & 0xFFFFFFFF, word >> 32
                    r, k = 16 * I + 2 * gg, (64 * J + 16 * q) // 8
                    slots = [codes[r, k], codes[r + 1, k], codes[r, k + 1], codes[r + 1, k + 1]]
                    for i, c in enumerate(int(s) for s in slots):
                        assert (lo >> (8 * i)) & 0xFF == c >> 8
                        assert all(((hi >> (4 * j + i)) & 1) == ((c >> j) & 1) for j in range(8))


def test_qidxs_shape_errors():
    with pytest.raises(ValueError, match="% 16"):
        pack_qidxs_e8p(torch.zeros(8, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="int64"):
        unpack_qidxs_e8p(torch.zeros(16, 2, dtype=torch.int32))


# ------------------------------------------------------------------ RHT + quantize_e8p (2-bit, no Hessian)
from reference import sylvester  # noqa: E402
from tersor.quant import dequantize_e8p, quantize_e8p, rht, unrht  # noqa: E402


def test_rht_matches_explicit_matrices():
    m, n = 32, 128
    w = torch.randn(m, n, dtype=torch.float64)
    su = (torch.randint(0, 2, (n,)) * 2 - 1).half()
    sv = (torch.randint(0, 2, (m,)) * 2 - 1).half()
    um, un = sylvester(m) / m ** 0.5, sylvester(n) / n ** 0.5
    want = um.T @ torch.diag(sv.double()) @ w @ torch.diag(su.double()) @ un
    assert torch.allclose(rht(w, su, sv).double(), want, atol=1e-5)
    assert torch.allclose(unrht(want.float(), su, sv).double(), w, atol=1e-5)


@pytest.mark.parametrize("m,n", [(64, 256), (48, 768)])  # 768 = 12 * 64: tersor's H_12 path
def test_quantize_e8p_round_trip(m, n):
    w = torch.randn(m, n) * 0.02
    st = quantize_e8p(w, seed=1)
    assert st["Qidxs"].shape == (m, n // 32) and st["Qidxs"].dtype == torch.int64
    assert st["SU"].dtype == torch.float16 and set(st["SU"].unique().tolist()) <= {-1.0, 1.0}
    rel = ((dequantize_e8p(st) - w).norm() / w.norm()).item()
    # Gaussian rows after the RHT: per-coordinate MSE of exact E8P12 rounding at QuIP#'s scale is ~0.0913,
    # so the relative error is ~0.30 (QuIP#'s 2-bit without LDLQ).
    assert 0.28 < rel < 0.32, rel
    assert torch.equal(quantize_e8p(w, seed=1)["Qidxs"], st["Qidxs"])  # deterministic


def test_quantize_e8p_errors():
    with pytest.raises(ValueError, match="% 64"):
        quantize_e8p(torch.randn(16, 100))
    with pytest.raises(ValueError, match="2-d"):
        quantize_e8p(torch.randn(16))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_ldlq_lowers_the_proxy_loss(bits):
    # With correlated inputs, LDLQ trades weight error for output error: tr(E H E^T) must drop well below
    # what nearest rounding gets (0.60x here), and so must the layer's output error on the calibration data.
    g = torch.Generator().manual_seed(0)
    m, n = 64, 256
    w = torch.randn(m, n, generator=g) * 0.02
    x = torch.randn(4096, n, generator=g) @ (torch.randn(n, n, generator=g) / n ** 0.5 + 0.3 * torch.eye(n))
    h = x.T @ x / len(x)

    def proxy(wh):
        e = (wh - w).double()
        return torch.trace(e @ h.double() @ e.T).item()

    near = dequantize_e8p(quantize_e8p(w, bits=bits))
    ldlq = dequantize_e8p(quantize_e8p(w, bits=bits, hessian=h))
    assert proxy(ldlq) < 0.75 * proxy(near)
    assert (x @ (ldlq - w).T).norm() < 0.85 * (x @ (near - w).T).norm()
    with pytest.raises(ValueError, match="hessian"):
        quantize_e8p(w, hessian=torch.eye(n - 1))


def test_e81b_table_matches_quipsharp():
    from tersor.quant.quipsharp import E81B

    assert hashlib.sha256(E81B.half().numpy().tobytes()).hexdigest() == (
        "d65cecfd0258df8b7aaabfe7ce66ac5b0ec9385274c60b83f3fe3714321337eb")
    assert E81B[56].abs().sum() == 0 and E81B[0].tolist()[:3] == [-1, -1, 0]
    assert E81B[113].tolist() == [-0.5] * 8 and E81B[240].tolist() == [0.5] * 8


@pytest.mark.parametrize("bits,cols,max_rel", [(2, 8, 0.32), (3, 12, 0.19), (4, 16, 0.11)])
def test_rvq_layouts_and_error(bits, cols, max_rel):
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(5)) * 0.02
    st = quantize_e8p(w, bits=bits)
    assert st["Qidxs"].shape == (64, cols)  # QuIP#: n/32, 3n/64, n/16
    rel = ((dequantize_e8p(st) - w).norm() / w.norm()).item()
    assert rel < max_rel, rel


def test_rvq_errors():
    with pytest.raises(ValueError, match="bits"):
        quantize_e8p(torch.randn(16, 64), bits=5)
    st = quantize_e8p(torch.randn(16, 64), bits=2)
    st["Qidxs"] = st["Qidxs"][:, :1]
    with pytest.raises(ValueError, match="does not fit"):
        dequantize_e8p(st)


# ------------------------------------------------------------------ E8PLinear (reference forward)
from tersor.nn import E8PLinear  # noqa: E402


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_e8p_linear_matches_its_dequantized_weight(bits, dtype, tmp_path):
    lin = torch.nn.Linear(256, 64)
    layer = E8PLinear.from_linear(lin, bits=bits)
    x = torch.randn(3, 7, 256)
    st = {"Qidxs": layer.Qidxs, "SU": layer.SU, "SV": layer.SV, "Wscale": layer.Wscale, "codebook_id": layer.codebook_id}
    want = x @ dequantize_e8p(st).T + lin.bias.detach()
    got = layer(x.to(dtype))
    assert got.dtype == dtype and got.shape == (3, 7, 64)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert torch.allclose(got.float(), want, atol=tol, rtol=tol)
    # safetensors round trip of the state dict into a fresh layer of the same shape
    from safetensors.torch import load_file, save_file

    save_file(layer.state_dict(), str(tmp_path / "l.safetensors"))
    other = E8PLinear.from_linear(torch.nn.Linear(256, 64), bits=bits, seed=9)
    other.load_state_dict(load_file(str(tmp_path / "l.safetensors")))
    assert torch.equal(other(x), layer(x))


def test_e8p_linear_errors():
    with pytest.raises(TypeError):
        E8PLinear.from_linear(torch.nn.Conv1d(4, 4, 1))
    layer = E8PLinear.from_linear(torch.nn.Linear(64, 16))
    with pytest.raises(ValueError, match="features"):
        layer(torch.randn(2, 63))
    st = {"Qidxs": layer.Qidxs[:, :1], "SU": layer.SU, "SV": layer.SV, "Wscale": layer.Wscale}
    with pytest.raises(ValueError, match="does not fit"):
        E8PLinear(st)
