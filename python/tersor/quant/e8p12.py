"""QuIP#'s E8P12 codebook, index for index, and its exact nearest-codeword search.

Facts and sources: docs/research/e8p12.md (quip-sharp @1d8f873, codebook version 1). Summary:

* 256 "abs" vectors A: the 227 vectors u in {1/2, 3/2, 5/2}^8 with |u|^2 <= 10 (the distinct |x| of
  D8 + 1/2 points with even coordinate sum and |x|^2 <= 10), ascending lexicographic with coordinate 0
  most significant, then QuIP#'s 29 hand-picked norm^2-12 vectors.
* Code c = (a << 8) | s. With p = parity(s): s' = s ^ p (only bit 0 changes); v = A[a], with v[7] negated
  when sum(A[a]) is odd; bit b of s' negates coordinate PERM[b]; codeword = v + (p ? -1/4 : +1/4).
  The signed vectors v are exactly P = {v : |v| in A, v in D8 + 1/2}, and the codebook is (P + 1/4) u (P - 1/4).

The nearest search uses that structure: for each shift t and each abs vector a, the best signs are
those of (x - t), fixed up by flipping the cheapest coordinate when their parity is wrong; 2 x 256
candidates instead of 65536, and exact.
"""

from __future__ import annotations

import itertools

import torch

# Bit b of the sign byte negates coordinate PERM[b] (the order the CUDA kernel pairs coordinates in).
PERM = (0, 2, 4, 6, 1, 3, 5, 7)

# QuIP#'s 29 extra abs vectors (values x 2), indices 227..255, in their order.
_NORM12_X2 = (
    "31113333 13113333 11313333 11133333 33313311 33313131 33311331 33313113 33311313 33311133 "
    "33133311 33133131 33131331 33133113 33131313 33131133 31333311 31333131 31331331 31333113 "
    "31331313 13331133 13333311 13333131 13331331 13333113 13331313 11331333 33113331"
).split()


def _abs_grid() -> torch.Tensor:
    # Enumerating the 227 patterns directly (3^8 candidates) instead of the 8^8 lattice points: every
    # pattern can be signed to an even coordinate sum (a sign flip changes the sum by an odd integer).
    base = [u for u in itertools.product((0.5, 1.5, 2.5), repeat=8) if sum(c * c for c in u) <= 10]
    base.sort()  # lexicographic, coordinate 0 most significant
    extra = [tuple(int(ch) / 2 for ch in row) for row in _NORM12_X2]
    grid = torch.tensor(base + extra, dtype=torch.float32)
    assert grid.shape == (256, 8)
    return grid


E8P12_ABS: torch.Tensor = _abs_grid()
_ODD = (E8P12_ABS.sum(1).round().long() % 2).bool()  # sum of 8 half-integers is an integer
_PERM_T = torch.tensor(PERM)


def e8p12_decode(codes: torch.Tensor) -> torch.Tensor:
    """Codewords (float32, [..., 8]) of 16-bit codes (any integer dtype; values taken mod 2^16)."""
    c = codes.long() & 0xFFFF
    a, s = c >> 8, c & 0xFF
    bits = (s.unsqueeze(-1) >> torch.arange(8, device=c.device)) & 1
    p = bits.sum(-1) & 1
    bits[..., 0] ^= p
    grid, odd = E8P12_ABS.to(c.device), _ODD.to(c.device)
    v = grid[a].clone()
    v[..., 7] = torch.where(odd[a], -v[..., 7], v[..., 7])
    sign = torch.ones_like(v)
    sign[..., _PERM_T.to(c.device)] = 1.0 - 2.0 * bits.float()
    return v * sign + torch.where(p.bool(), -0.25, 0.25).unsqueeze(-1)


def e8p12_codebook() -> torch.Tensor:
    """All 65536 codewords, float32 [65536, 8], row = code (QuIP#'s index order)."""
    return e8p12_decode(torch.arange(1 << 16))


def _encode(v: torch.Tensor, a: torch.Tensor, minus: torch.Tensor) -> torch.Tensor:
    # Inverse of the decode: sign bits from v (v in P), coordinate 7 relative to the pre-negated table
    # entry, bit 0 toggled so that the byte's parity selects the shift.
    neg = (v < 0).long()
    bits = neg[..., _PERM_T.to(v.device)]
    bits[..., 7] ^= _ODD.to(v.device)[a].long()
    bits[..., 0] ^= minus.long()
    s = (bits << torch.arange(8, device=v.device)).sum(-1)
    return (a << 8) | s


def e8p12_nearest(x: torch.Tensor, block: int = 1 << 15) -> torch.Tensor:
    """Codes (int32 in [0, 65536), shape x.shape[:-1]) of the exact nearest E8P12 codeword to each row of
    ``x [..., 8]`` (squared Euclidean distance; ties broken towards the lower candidate index in the
    search order: +1/4 before -1/4, then abs index). Runs on x's device; computes in float32 (float64 input
    stays float64)."""
    if x.shape[-1] != 8:
        raise ValueError(f"e8p12_nearest: the last dim must be 8, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"e8p12_nearest: expected a floating tensor, got {x.dtype}")
    lead = x.shape[:-1]
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.reshape(-1, 8).to(dt)
    grid = E8P12_ABS.to(x.device, dt)
    odd = _ODD.to(x.device)
    norms = (grid * grid).sum(1)  # [256]
    out = torch.empty(xf.shape[0], dtype=torch.int32, device=x.device)
    for i in range(0, xf.shape[0], block):
        xb = xf[i:i + block]
        best_d = best_code = None
        for t, minus in ((0.25, False), (-0.25, True)):
            y = xb - t
            ay = y.abs()
            score = ay @ grid.T  # <|y|, a> for every abs vector: [n, 256]
            # Parity of the signs of y (a zero counts as +) against each a's required parity.
            negs = (y < 0).sum(1, keepdim=True) % 2  # [n, 1]
            wrong = negs.bool() ^ odd.unsqueeze(0)  # [n, 256]
            cheapest = (ay.unsqueeze(1) * grid.unsqueeze(0)).amin(-1)  # min_i a_i |y_i|: [n, 256]
            score = score - 2 * torch.where(wrong, cheapest, torch.zeros_like(cheapest))
            d = (y * y).sum(1, keepdim=True) - 2 * score + norms.unsqueeze(0)
            dmin, a = d.min(1)
            # Build the winning signed vector: signs of y, with the cheapest coordinate flipped if needed.
            ga = grid[a]
            v = torch.where(y < 0, -ga, ga)
            fix = wrong.gather(1, a.unsqueeze(1)).squeeze(1)
            j = (ay * ga).argmin(1)
            flip = torch.zeros_like(v, dtype=torch.bool)
            flip[torch.arange(v.shape[0], device=v.device), j] = fix
            v = torch.where(flip, -v, v)
            code = _encode(v, a, torch.full_like(a, int(minus)))
            if best_d is None:
                best_d, best_code = dmin, code
            else:
                take = dmin < best_d
                best_d = torch.where(take, dmin, best_d)
                best_code = torch.where(take, code, best_code)
        out[i:i + block] = best_code.to(torch.int32)
    return out.reshape(lead)
