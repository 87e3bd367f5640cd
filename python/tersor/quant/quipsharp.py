"""QuIP#'s packed code layout for E8P12 weights (``Qidxs``), as its checkpoints store it.

Layout (docs/research/e8p12.md §4; quip-sharp ``maybe_pack_idxs``): an E8P12 weight [m, n] has one 16-bit
code per 8 consecutive weights of a row, ``codes[m, n/8]``. Four codes of a 2-row x 16-column patch share
one int64 = {lo: 4 abs bytes, hi: 32 sign bits}: slot 0 = (r, c..c+7), slot 1 = (r+1, c..c+7),
slot 2 = (r, c+8..c+15), slot 3 = (r+1, c+8..c+15); abs byte i of lo is slot i's abs index, and sign
bit j of slot i is hi bit 4j + i. The [m/2, n/16] array of those words is tiled [m/16, 8, n/64, 4] ->
[m/16, n/64, 8, 4] (a CUDA lane 4g+q of row block I, column block J reads word I*(n/2) + 32J + 4g + q) and
stored as int64 [m, n/32].
"""

from __future__ import annotations

import torch


def _check(m: int, n: int, what: str):
    if m % 16 or n % 64:
        raise ValueError(f"{what}: QuIP#'s E8P layout needs out_features % 16 == 0 and in_features % 64 == 0, "
                         f"got [{m}, {n}]")


def pack_qidxs_e8p(codes: torch.Tensor) -> torch.Tensor:
    """``codes [m, n/8]`` (16-bit codes in any integer dtype) -> QuIP#'s ``Qidxs`` int64 [m, n/32]."""
    if codes.dim() != 2 or codes.is_floating_point():
        raise ValueError(f"pack_qidxs_e8p: expected 2-d integer codes [m, n/8], got {codes.dtype} {tuple(codes.shape)}")
    m, n = codes.shape[0], codes.shape[1] * 8
    _check(m, n, "pack_qidxs_e8p")
    c = codes.long() & 0xFFFF
    # slots [m/2, n/16, 4]: (r, k), (r+1, k), (r, k+1), (r+1, k+1) for r = 2R, k = 2C
    q = c.view(m // 2, 2, n // 16, 2)  # [R, row in pair, C, code in pair]
    slots = torch.stack([q[:, 0, :, 0], q[:, 1, :, 0], q[:, 0, :, 1], q[:, 1, :, 1]], dim=-1)
    absb, sign = slots >> 8, slots & 0xFF
    lo = (absb << (8 * torch.arange(4, device=c.device))).sum(-1)
    bit = (sign.unsqueeze(-1) >> torch.arange(8, device=c.device)) & 1  # [R, C, slot i, bit j]
    shift = 4 * torch.arange(8, device=c.device).view(1, 1, 1, 8) + torch.arange(4, device=c.device).view(1, 1, 4, 1)
    hi = (bit << shift).sum((-1, -2))
    words = lo | (hi << 32)  # both < 2^32: the int64 holds them as unsigned halves
    words = words.view(m // 16, 8, n // 64, 4).permute(0, 2, 1, 3).contiguous()
    return words.view(m, n // 32)


def unpack_qidxs_e8p(qidxs: torch.Tensor) -> torch.Tensor:
    """QuIP#'s ``Qidxs`` int64 [m, n/32] -> ``codes`` int32 [m, n/8] (inverse of :func:`pack_qidxs_e8p`)."""
    if qidxs.dim() != 2 or qidxs.dtype != torch.int64:
        raise ValueError(f"unpack_qidxs_e8p: expected int64 [m, n/32], got {qidxs.dtype} {tuple(qidxs.shape)}")
    m, n = qidxs.shape[0], qidxs.shape[1] * 32
    _check(m, n, "unpack_qidxs_e8p")
    words = qidxs.reshape(m // 16, n // 64, 8, 4).permute(0, 2, 1, 3).reshape(m // 2, n // 16)
    lo, hi = words & 0xFFFFFFFF, (words >> 32) & 0xFFFFFFFF
    dev = qidxs.device
    absb = (lo.unsqueeze(-1) >> (8 * torch.arange(4, device=dev))) & 0xFF  # [R, C, slot]
    shift = 4 * torch.arange(8, device=dev).view(1, 1, 1, 8) + torch.arange(4, device=dev).view(1, 1, 4, 1)
    bit = (hi.view(m // 2, n // 16, 1, 1) >> shift) & 1  # [R, C, slot i, bit j]
    sign = (bit << torch.arange(8, device=dev)).sum(-1)
    slots = (absb << 8) | sign  # [R, C, 4]
    codes = torch.empty(m // 2, 2, n // 16, 2, dtype=torch.long, device=dev)
    codes[:, 0, :, 0], codes[:, 1, :, 0] = slots[..., 0], slots[..., 1]
    codes[:, 0, :, 1], codes[:, 1, :, 1] = slots[..., 2], slots[..., 3]
    return codes.view(m, n // 8).to(torch.int32)


# ------------------------------------------------------------------ RHT + E8P12 (2-bit) quantization
OPT_SCALE_E8P12 = 1.03  # QuIP#'s opt_scale for E8P12: Wscale = RMS(rotated W) / 1.03


def _rht_right(a: torch.Tensor, transpose: bool) -> torch.Tensor:
    # Rows of `a` times U_n (transpose=True) or U_n^T (transpose=False), U_n = H_n / sqrt(n):
    # (a U_n)[r] = U_n^T a[r], one Hadamard transform of each row.
    from ..ops import hadamard_transform

    return hadamard_transform(a, transpose=transpose)


def rht(w: torch.Tensor, su: torch.Tensor, sv: torch.Tensor) -> torch.Tensor:
    """QuIP#'s incoherence rotation: ``U_m^T diag(SV) W diag(SU) U_n`` (fp32), U_k = H_k / sqrt(k)."""
    a = w.float() * su.float()[None, :] * sv.float()[:, None]
    a = _rht_right(a, transpose=True)  # A U_n
    return _rht_right(a.t().contiguous(), transpose=True).t()  # U_m^T (A U_n)


def unrht(wr: torch.Tensor, su: torch.Tensor, sv: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rht`: ``diag(SV) U_m Wr U_n^T diag(SU)`` (fp32)."""
    a = _rht_right(wr.float(), transpose=False)  # Wr U_n^T
    a = _rht_right(a.t().contiguous(), transpose=False).t()  # U_m (Wr U_n^T)
    return a * su.float()[None, :] * sv.float()[:, None]


def _block_ldl_l(h: torch.Tensor, block: int) -> torch.Tensor:
    # L of H = L D L^T, L unit lower block-triangular, D block-diagonal (blocks of `block`), from the
    # Cholesky factor C: L = C blockdiag(C_jj)^-1 (and D_j = C_jj C_jj^T, which LDLQ does not need).
    c = torch.linalg.cholesky(h)
    n = h.shape[0]
    lmat = torch.empty_like(c)
    for j in range(0, n, block):
        cjj = c[j:j + block, j:j + block]
        lmat[:, j:j + block] = torch.linalg.solve_triangular(cjj, c[:, j:j + block], upper=False, left=False)
    return lmat


def quantize_e8p(w: torch.Tensor, hessian: torch.Tensor | None = None, seed: int = 0,
                 scale: float = OPT_SCALE_E8P12, sigma_reg: float = 1e-2) -> dict[str, torch.Tensor]:
    """2-bit E8P12 quantization with QuIP#'s randomized Hadamard incoherence.

    Without ``hessian``: nearest rounding. With ``hessian`` (the input second moment ``E[x x^T]``, [n, n],
    e.g. ``X.T @ X / len(X)`` from calibration activations): block LDLQ in blocks of 8 columns, last block
    first, which minimises the proxy loss ``tr((W - W^) H (W - W^)^T)`` one block at a time (QuIP#'s
    order; ``sigma_reg * mean(diag H)`` is added to the diagonal, as QuIP# does).

    Returns QuIP#-named tensors: ``Qidxs`` (int64 [m, n/32], QuIP#'s packing), ``SU`` [n] and ``SV`` [m]
    (fp16 random signs), ``Wscale`` (fp32 scalar) with ``W ~ diag(SV) U_m (Wscale * D(Qidxs)) U_n^T diag(SU)``.
    Requires m % 16 == 0, n % 64 == 0 and both sizes supported by :func:`tersor.hadamard_transform`
    (for K * 2^k sizes tersor's H_K is used, which is not QuIP#'s; see docs/ops.md).
    Not yet: RVQ 3/4-bit (issue 4).
    """
    from .e8p12 import e8p12_decode, e8p12_nearest

    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"quantize_e8p: expected a 2-d float weight, got {w.dtype} {tuple(w.shape)}")
    m, n = w.shape
    _check(m, n, "quantize_e8p")
    g = torch.Generator().manual_seed(seed)
    su = (torch.randint(0, 2, (n,), generator=g) * 2 - 1).to(torch.float16).to(w.device)
    sv = (torch.randint(0, 2, (m,), generator=g) * 2 - 1).to(torch.float16).to(w.device)
    wr = rht(w, su, sv)
    wscale = wr.square().mean().sqrt() / scale
    target = wr / wscale
    if hessian is None:
        codes = e8p12_nearest(target.reshape(m, n // 8, 8))
    else:
        if hessian.shape != (n, n):
            raise ValueError(f"quantize_e8p: hessian must be [{n}, {n}], got {tuple(hessian.shape)}")
        # The Hessian of the rotated problem: x_r = U_n^T diag(SU) x.
        h = hessian.double().to(w.device)
        h = (h + h.t()) / 2
        h = _rotate_hessian(h, su)
        h = h + sigma_reg * h.diagonal().mean() * torch.eye(n, dtype=h.dtype, device=h.device)
        lmat = _block_ldl_l(h, 8)
        tgt = target.double()
        err = torch.zeros_like(tgt)
        codes = torch.empty(m, n // 8, dtype=torch.int32, device=w.device)
        for j in range(n - 8, -1, -8):
            # Rounding target: the block plus the feedback of the errors already made to its right.
            t = tgt[:, j:j + 8] + err[:, j + 8:] @ lmat[j + 8:, j:j + 8]
            cj = e8p12_nearest(t)
            codes[:, j // 8] = cj
            err[:, j:j + 8] = tgt[:, j:j + 8] - e8p12_decode(cj).double()
    return {"Qidxs": pack_qidxs_e8p(codes), "SU": su, "SV": sv, "Wscale": wscale.float()}


def _rotate_hessian(h: torch.Tensor, su: torch.Tensor) -> torch.Tensor:
    # U_n^T diag(SU) H diag(SU) U_n, in float64 through the float32 transform twice (H is symmetric).
    from ..ops import hadamard_transform

    a = h * su.double()[None, :] * su.double()[:, None]
    a = hadamard_transform(a.float(), transpose=True).double()  # A U_n (row transforms)
    return hadamard_transform(a.t().contiguous().float(), transpose=True).double().t()


def dequantize_e8p(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """The fp32 weight [m, n] a :func:`quantize_e8p` state (or a QuIP# E8P12 layer with power-of-two sizes)
    stands for: ``diag(SV * Wscale) U_m D(Qidxs) U_n^T diag(SU)``."""
    from .e8p12 import e8p12_decode

    q = state["Qidxs"]
    m, n = q.shape[0], q.shape[1] * 32
    w_hat = e8p12_decode(unpack_qidxs_e8p(q)).reshape(m, n)
    wscale = state.get("Wscale", torch.ones(()))
    return unrht(w_hat * wscale.float(), state["SU"], state["SV"])
