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


# ------------------------------------------------------------------ RHT + E8P12 quantization (2/3/4 bits)
OPT_SCALE = {2: 1.03, 3: 0.98, 4: 1.03}  # QuIP#'s opt_scale per bit width: Wscale = RMS(rotated W) / opt_scale
RESID_SCALE = {3: 2.04, 4: 3.45}  # W^ = D(q1) + D2(q2) / resid_scale


def _e81b_table() -> torch.Tensor:
    # QuIP#'s 1-bit "E81B" second stage (docs/research/e8p12.md §5): the E8 points of norm^2 <= 2 with an
    # even sum, integer ones first then half-integer ones, each in ascending lexicographic order
    # (coordinate 0 most significant), then +2e_0..+2e_7 and -2e_0..-2e_6 (QuIP# leaves out -2e_7).
    import itertools

    ints = [p for p in itertools.product((-1, 0, 1), repeat=8) if sum(v * v for v in p) <= 2 and sum(p) % 2 == 0]
    halves = [p for p in itertools.product((-0.5, 0.5), repeat=8) if round(sum(p)) % 2 == 0]
    axes = [tuple(2.0 if k == i else 0.0 for k in range(8)) for i in range(8)]
    axes += [tuple(-2.0 if k == i else 0.0 for k in range(8)) for i in range(7)]  # +0.0 elsewhere, not -0.0
    t = torch.tensor(sorted(ints) + sorted(halves) + axes, dtype=torch.float32)
    assert t.shape == (256, 8)
    return t


E81B = _e81b_table()


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


def _round(t: torch.Tensor, bits: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Codes (one tensor per stage) and the decoded value of t [..., 8] under the bits' codebook: E8P12
    (2), E8P12 + E81B residual (3), E8P12 + E8P12 residual (4), greedy stage by stage as QuIP# does."""
    from .e8p12 import e8p12_decode, e8p12_nearest

    c1 = e8p12_nearest(t)
    d1 = e8p12_decode(c1).to(t.dtype)
    if bits == 2:
        return [c1], d1
    rs = RESID_SCALE[bits]
    r = (t - d1) * rs
    if bits == 4:
        c2 = e8p12_nearest(r)
        return [c1, c2], d1 + e8p12_decode(c2).to(t.dtype) / rs
    table = E81B.to(t.device, t.dtype)
    c2 = torch.cdist(r.reshape(-1, 8), table).argmin(1).reshape(r.shape[:-1]).to(torch.int32)
    return [c1, c2], d1 + table[c2.long()] / rs


TUNE_PASSES = 0  # quantize_e8p's default: off. The passes overfit a Hessian from few calibration tokens
# (fewer than ~4x in_features: MiniLM's embedding cosine dropped); docs/ops.md has the numbers.


def _tune_passes(tgt: torch.Tensor, err: torch.Tensor, h: torch.Tensor, stages: list[torch.Tensor], bits: int,
                 passes: int, guard: bool = True) -> None:
    """Block coordinate descent on the proxy loss ``sum_r e_r H e_r^T`` (e = tgt - W^, one term per row),
    in place on ``err`` [m, n] (float64) and the per-stage codes ``stages`` [m, n/8].

    For block J of a row, the loss as a function of e_J alone is minimised at e_J = -e_rest H_rest,J H_JJ^-1,
    i.e. W^_J = W^_J + g_J H_JJ^-1 with g = e H (QuIP#'s "tune" target). The candidate is the greedy
    multi-stage rounding of that target (:func:`_round`) and changes the row's loss by
    ``2 d.g_J + d H_JJ d^T`` (d = e_J' - e_J). ``guard=True`` keeps it only in the rows where that is < 0
    (so no row's loss ever rises); ``guard=False`` keeps it everywhere (QuIP#'s tune passes, which can
    raise the loss: the Euclidean-nearest codeword is not the H_JJ-nearest one). Blocks go last first, as
    LDLQ does; the running product g = e H is updated by the kept rows' d H_J,: (O(m n) per block)."""
    m, n = tgt.shape
    nb = n // 8
    hb = torch.stack([h[j:j + 8, j:j + 8] for j in range(0, n, 8)])  # [n/8, 8, 8] diagonal blocks
    hinv = torch.linalg.inv(hb)
    g = err @ h  # [m, n]
    cost = (err * g).sum(1)  # each row's proxy loss, kept current for the relative tolerance below
    for _ in range(passes):
        changed = False
        for b in range(nb - 1, -1, -1):
            j = 8 * b
            e_old = err[:, j:j + 8]
            t = tgt[:, j:j + 8] - e_old + g[:, j:j + 8] @ hinv[b]
            cs, dec = _round(t, bits)
            e_new = tgt[:, j:j + 8] - dec
            d = e_new - e_old
            delta = 2 * (d * g[:, j:j + 8]).sum(1) + ((d @ hb[b]) * d).sum(1)
            if guard:
                # Strictly lower by more than float64 noise in the running products: never a rise.
                keep = delta < -1e-12 * cost.abs()
            else:
                keep = d.abs().sum(1) > 0
            if not bool(keep.any()):
                continue
            changed = True
            e_new = torch.where(keep.unsqueeze(1), e_new, e_old)
            d = e_new - e_old  # exactly 0 in the rows not kept
            err[:, j:j + 8] = e_new
            for st, c in zip(stages, cs):
                st[:, b] = torch.where(keep, c, st[:, b])
            g += d @ h[j:j + 8, :]
            cost += torch.where(keep, delta, torch.zeros_like(delta))
        if not changed:
            break


def _pack_e81b(codes: torch.Tensor) -> torch.Tensor:
    # [m, n/8] byte codes -> int64 [m, n/64]: column t, byte j = code of codeword 8t + j (row-major).
    m, k = codes.shape
    c = codes.long().view(m, k // 8, 8)
    return (c << (8 * torch.arange(8, device=codes.device))).sum(-1)


def _unpack_e81b(q: torch.Tensor) -> torch.Tensor:
    m, t = q.shape
    return ((q.unsqueeze(-1) >> (8 * torch.arange(8, device=q.device))) & 0xFF).reshape(m, t * 8)


def quantize_e8p(w: torch.Tensor, bits: int = 2, hessian: torch.Tensor | None = None, seed: int = 0,
                 scale: float | None = None, sigma_reg: float = 1e-2,
                 tune_passes: int = TUNE_PASSES) -> dict[str, torch.Tensor]:
    """E8P12 quantization (2 bits; 3 and 4 bits by residual VQ) with QuIP#'s randomized Hadamard incoherence.

    bits=2: E8P12. bits=4: a second E8P12 stage on the residual times 3.45. bits=3: an E81B (1 bit per
    weight) stage on the residual times 2.04. ``scale`` defaults to QuIP#'s opt_scale (1.03, 0.98 for 3
    bits). Without ``hessian``: greedy rounding. With ``hessian`` (the input second moment ``E[x x^T]``,
    [n, n], e.g. ``X.T @ X / len(X)`` from calibration activations): block LDLQ in blocks of 8 columns,
    last block first, which minimises the proxy loss ``tr((W - W^) H (W - W^)^T)`` one block at a time
    (QuIP#'s order; ``sigma_reg * mean(diag H)`` is added to the diagonal, as QuIP# does). Then
    ``tune_passes`` guarded coordinate-descent passes (:func:`_tune_passes`): each 8-block of each row is
    re-rounded at its conditional optimum given all the other blocks and the new code is kept only where
    that row's proxy loss drops, so the proxy never rises above LDLQ's. ``tune_passes=0`` (the default) is
    plain LDLQ; without ``hessian`` the passes would change nothing (H = I) and are skipped. The proxy is
    only as good as the Hessian: 2 passes lowered the true proxy 9-16% when H came from >= 4x n tokens, and
    raised it up to 10% from <= n tokens (docs/ops.md).

    Returns QuIP#-named tensors: ``Qidxs`` (int64, QuIP#'s layouts: [m, n/32] for 2 bits, [stage 1 |
    stage 2] = [m, n/16] for 4 bits and [m, 3n/64] for 3 bits), ``SU`` [n] and ``SV`` [m] (fp16 random
    signs), ``Wscale`` (fp32 scalar) with ``W ~ diag(SV) U_m (Wscale * W^) U_n^T diag(SU)``.
    Requires m % 16 == 0, n % 64 == 0 and sizes :func:`tersor.hadamard_transform` supports (for K * 2^k
    sizes tersor's H_K is used, which is not QuIP#'s; see docs/ops.md).
    """
    if bits not in (2, 3, 4):
        raise ValueError(f"quantize_e8p: bits must be 2, 3 or 4, got {bits}")
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"quantize_e8p: expected a 2-d float weight, got {w.dtype} {tuple(w.shape)}")
    if isinstance(tune_passes, bool) or not isinstance(tune_passes, int):
        raise TypeError(f"quantize_e8p: tune_passes must be an int, got {type(tune_passes).__name__}")
    if tune_passes < 0:
        raise ValueError(f"quantize_e8p: tune_passes must be >= 0, got {tune_passes}")
    m, n = w.shape
    _check(m, n, "quantize_e8p")
    g = torch.Generator().manual_seed(seed)
    su = (torch.randint(0, 2, (n,), generator=g) * 2 - 1).to(torch.float16).to(w.device)
    sv = (torch.randint(0, 2, (m,), generator=g) * 2 - 1).to(torch.float16).to(w.device)
    wr = rht(w, su, sv)
    wscale = wr.square().mean().sqrt() / (OPT_SCALE[bits] if scale is None else scale)
    target = wr / wscale
    if hessian is None:
        stages, _ = _round(target.reshape(m, n // 8, 8), bits)
    else:
        if hessian.shape != (n, n):
            raise ValueError(f"quantize_e8p: hessian must be [{n}, {n}], got {tuple(hessian.shape)}")
        # The Hessian of the rotated problem, x_r = U_n^T diag(SU) x: U_n^T diag(SU) H diag(SU) U_n = rht(H, SU, SU).
        h = hessian.double().to(w.device)
        h = rht((h + h.t()) / 2, su, su).double()
        h = h + sigma_reg * h.diagonal().mean() * torch.eye(n, dtype=h.dtype, device=h.device)
        lmat = _block_ldl_l(h, 8)
        tgt = target.double()
        err = torch.zeros_like(tgt)
        stages = [torch.empty(m, n // 8, dtype=torch.int32, device=w.device) for _ in range(1 if bits == 2 else 2)]
        for j in range(n - 8, -1, -8):
            # Rounding target: the block plus the feedback of the errors already made to its right.
            t = tgt[:, j:j + 8] + err[:, j + 8:] @ lmat[j + 8:, j:j + 8]
            cs, dec = _round(t, bits)
            for st, c in zip(stages, cs):
                st[:, j // 8] = c
            err[:, j:j + 8] = tgt[:, j:j + 8] - dec
        if tune_passes:
            _tune_passes(tgt, err, h, stages, bits, tune_passes)
    packed = [pack_qidxs_e8p(stages[0])]
    if bits == 4:
        packed.append(pack_qidxs_e8p(stages[1]))
    elif bits == 3:
        packed.append(_pack_e81b(stages[1]))
    return {"Qidxs": torch.cat(packed, 1), "SU": su, "SV": sv, "Wscale": wscale.float(), **_layout_keys(bits)}


def qidxs_bits(qidxs: torch.Tensor, n: int) -> int:
    """Bits per weight (2, 3 or 4) that QuIP#-layout ``Qidxs`` would have for ``n`` input features, from its
    width alone; ValueError otherwise. A low-level helper: the width only fits one bit width *for a given n*,
    and a wrong n (e.g. an SU of half the length) gives another, so layers and :func:`dequantize_e8p` take
    the bit width from ``codebook_id`` (:func:`resolve_bits`), never from this."""
    cols = {n // 32: 2, 3 * n // 64: 3, n // 16: 4}
    if n % 64 or qidxs.dim() != 2 or qidxs.shape[0] % 16 or qidxs.shape[1] not in cols:
        raise ValueError(f"Qidxs {tuple(qidxs.shape)} does not fit n = {n} at 2, 3 or 4 bits")
    return cols[qidxs.shape[1]]


# ------------------------------------------------------------------ the state's declared layout
# QuIP#'s codebook_id of each bit width (lib/codebook/__init__.py): E8P12, E8P12RVQ3B, E8P12RVQ4B.
CODEBOOK_ID = {2: 7, 3: 18, 4: 17}
BITS_OF_CODEBOOK_ID = {v: k for k, v in CODEBOOK_ID.items()}
# Hadamard conventions for a dimension K * 2^k: tersor's own H_K, or QuIP#'s (tersor.quant.quipsharp_hadamard).
HADAMARD_CONVENTIONS = ("tersor", "quipsharp")

STATE_KEYS_DOC = """An E8P state (what :func:`quantize_e8p` returns, :func:`dequantize_e8p` and
:class:`tersor.nn.E8PLinear` read) is a dict:

- ``Qidxs``: int64 [m, n/32] (2 bits), [m, 3n/64] (3 bits) or [m, n/16] (4 bits): QuIP#'s packed codes;
- ``SU`` [n], ``SV`` [m]: float sign vectors (or QuIP#'s fine-tuned scales);
- ``Wscale``: a float scalar (optional, default 1);
- ``codebook_id``: QuIP#'s id of the codebook, hence of the bit width (7: 2 bits, 18: 3 bits, 17: 4 bits),
  an integer or a 0-d integer tensor. Required unless the bit width is given another way (a ``bits``
  argument, a tersor manifest's ``bits``, a QuIP# ``quant_config``'s ``codebook``);
- ``hadamard``: a str, ``"tersor"`` or ``"quipsharp"``: whose ``H_K`` rotates a dimension ``K * 2^k`` that is
  not a power of two (for powers of two both are the same Sylvester transform). Required for such sizes
  unless given as an argument.
"""


def _layout_keys(bits: int) -> dict:
    # The keys quantize_e8p's state declares its layout with (STATE_KEYS_DOC).
    return {"codebook_id": torch.tensor(CODEBOOK_ID[bits]), "hadamard": "tersor"}


def codebook_bits(codebook_id, what: str) -> int:
    """The bit width of QuIP#'s ``codebook_id`` (an int or a one-element integer tensor)."""
    if isinstance(codebook_id, torch.Tensor):
        if codebook_id.numel() != 1 or codebook_id.is_floating_point() or codebook_id.is_complex():
            raise TypeError(f"{what}: codebook_id must be an integer scalar, got {codebook_id.dtype} "
                            f"{list(codebook_id.shape)}")
        codebook_id = int(codebook_id.reshape(()).item())
    elif isinstance(codebook_id, bool) or not isinstance(codebook_id, int):
        raise TypeError(f"{what}: codebook_id must be an int or an integer tensor, got {type(codebook_id).__name__}")
    if codebook_id not in BITS_OF_CODEBOOK_ID:
        raise ValueError(f"{what}: codebook_id {codebook_id} is not a codebook tersor reads (QuIP#'s E8P12 = 7 "
                         f"(2 bits), E8P12RVQ3B = 18 (3 bits), E8P12RVQ4B = 17 (4 bits))")
    return BITS_OF_CODEBOOK_ID[codebook_id]


def resolve_bits(state: dict, bits, what: str):
    """The bit width declared by ``state["codebook_id"]`` and/or ``bits`` (ValueError if they disagree); None
    when neither declares one (:func:`check_layout` then raises)."""
    if bits is not None and (isinstance(bits, bool) or bits not in (2, 3, 4)):
        raise ValueError(f"{what}: bits must be 2, 3 or 4, got {bits!r}")
    cid = state.get("codebook_id")
    if cid is None:
        return bits
    b = codebook_bits(cid, what)
    if bits is not None and b != bits:
        raise ValueError(f"{what}: codebook_id {CODEBOOK_ID[b]} ({b} bits) and bits={bits} disagree")
    return b


def _implied_in_features(bits: int, width: int):
    if bits == 3:
        return 64 * width // 3 if width % 3 == 0 else None
    return width * (32 if bits == 2 else 16)


def check_layout(qidxs: torch.Tensor, n: int, m: int, bits, what: str, codebook_id_given: bool = True) -> int:
    """Checks ``Qidxs`` against ``len(SU) = n`` and ``len(SV) = m`` at the declared ``bits`` and returns the
    bits. The checks run in this order, so that a wrong length is reported as one: SV against Qidxs' rows;
    with no declared bit width, ValueError naming the missing ``codebook_id``; SU against the in_features
    that Qidxs implies at that width; then E8P's m % 16 == 0, n % 64 == 0."""
    rows, width = int(qidxs.shape[0]), int(qidxs.shape[1])
    shape = list(qidxs.shape)
    if m != rows:
        raise ValueError(f"{what}: SV has length {m}, but Qidxs {shape} has {rows} rows (out_features = {rows}): "
                         f"SV and Qidxs do not match")
    fits = [b for b in (2, 3, 4) if n % 64 == 0 and n > 0 and _implied_in_features(b, width) == n]
    if bits is None:
        if not fits:
            _check(m, n, what)
            raise ValueError(f"{what}: Qidxs {shape} does not fit len(SU) = {n} at 2, 3 or 4 bits (Qidxs must be "
                             f"[m, n/32], [m, 3n/64] or [m, n/16])")
        raise ValueError(
            f"{what}: the state has no 'codebook_id' and no bit width was given, so the layout of Qidxs {shape} is "
            f"not declared. tersor does not infer it from the width: it fits {fits[0]} bits for len(SU) = {n}, but "
            f"an SU of another length reads it at another bit width without an error. Add QuIP#'s codebook_id "
            f"(7: 2 bits, 18: 3 bits, 17: 4 bits) to the state or pass bits=")
    nb = _implied_in_features(bits, width)
    if nb != n:
        decl = f"codebook_id {CODEBOOK_ID[bits]}" if codebook_id_given else f"bits={bits}"
        implied = f"implies in_features = {nb}" if nb is not None else f"is not a {bits}-bit width ([m, 3n/64])"
        other = f"; Qidxs would fit {fits[0]} bits for that SU" if fits else ""
        num, den = {2: (1, 32), 3: (3, 64), 4: (1, 16)}[bits]
        want = f"[{m}, {n * num // den}]" if (n * num) % den == 0 else f"[{m}, {num}n/{den}] (n = len(SU))"
        raise ValueError(f"{what}: {decl} does not match the tensors: Qidxs {shape} at {bits} bits {implied}, but "
                         f"SU has length {n} (Qidxs must be {want} for that SU at {bits} bits: Qidxs does not fit"
                         f"{other})")
    _check(m, n, what)
    return bits


def resolve_hadamard(state: dict, hadamard, n: int, m: int, what: str) -> str:
    """The Hadamard convention of a state: ``hadamard`` (an argument) and/or ``state["hadamard"]`` (ValueError
    when they disagree). When neither says: ``"tersor"`` if n and m are powers of two (both conventions are
    the same Sylvester transform there), else ValueError."""
    sh = state.get("hadamard")
    for name, v in (("hadamard", hadamard), ("state['hadamard']", sh)):
        if v is not None and not isinstance(v, str):
            raise TypeError(f"{what}: {name} must be a str ('tersor' or 'quipsharp'), got {type(v).__name__}")
        if v is not None and v not in HADAMARD_CONVENTIONS:
            raise ValueError(f"{what}: {name} must be 'tersor' or 'quipsharp', got {v!r}")
    if hadamard is not None and sh is not None and hadamard != sh:
        raise ValueError(f"{what}: hadamard={hadamard!r}, but the state was made with the {sh!r} Hadamard convention "
                         f"(state['hadamard'] = {sh!r})")
    h = hadamard if hadamard is not None else sh
    if h is None:
        odd = [f"{side} = {k}" for side, k in (("in_features", n), ("out_features", m)) if k < 1 or k & (k - 1)]
        if odd:
            raise ValueError(
                f"{what}: the state does not say which Hadamard convention made it (no 'hadamard' entry or argument) "
                f"and {' and '.join(odd)} {'is' if len(odd) == 1 else 'are'} not a power of two, where tersor's own "
                f"H_K ('tersor': tersor.quant.quantize_e8p) and QuIP#'s ('quipsharp': QuIP#'s checkpoints) are "
                f"different matrices; pass hadamard='tersor' or hadamard='quipsharp'")
        h = "tersor"
    return h


def check_state(state, what: str) -> dict:
    """``state`` after checking it is a dict holding at least ``Qidxs``, ``SU`` and ``SV`` (TypeError /
    ValueError naming what is missing); the one check of E8PLinear, its QuIP# loaders and dequantize_e8p."""
    if not isinstance(state, dict):
        raise TypeError(f"{what}: state must be a dict of tensors (Qidxs, SU, SV, Wscale, codebook_id), got "
                        f"{type(state).__name__}")
    for key in ("Qidxs", "SU", "SV"):
        if key not in state:
            raise ValueError(f"{what}: state is missing tensor {key!r} (have {sorted(state)})")
    return state


def check_qidxs(qidxs, what: str) -> torch.Tensor:
    """``qidxs`` after checking that it is a 2-d int64 tensor: TypeError for any other dtype. E8P's ``Qidxs`` are
    packed 64-bit words (4 abs bytes + 32 sign bits each): a narrower integer or a floating-point tensor
    cannot hold them, and no range check can tell whether a conversion to it was lossless."""
    if not isinstance(qidxs, torch.Tensor):
        raise TypeError(f"{what}: Qidxs must be a torch.Tensor, got {type(qidxs).__name__}")
    if qidxs.dtype != torch.int64:
        raise TypeError(f"{what}: Qidxs must be int64, got {qidxs.dtype}: E8P codes are packed 64-bit words, which "
                        f"a narrower or floating-point tensor cannot hold (and no range check can tell whether a "
                        f"conversion was lossless); load Qidxs as the checkpoint stores it, as int64")
    if qidxs.dim() != 2:
        raise ValueError(f"{what}: Qidxs must be 2-d [out_features, width], got shape {list(qidxs.shape)}")
    return qidxs


def check_wscale(wscale, what: str) -> torch.Tensor:
    """``Wscale`` (default 1) as given, after checking it is a float scalar (shape [] or [1])."""
    if wscale is None:
        return torch.ones(())
    if not isinstance(wscale, torch.Tensor) or wscale.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        got = wscale.dtype if isinstance(wscale, torch.Tensor) else type(wscale).__name__
        raise TypeError(f"{what}: Wscale must be a float32, float16 or bfloat16 tensor, got {got}")
    if wscale.numel() != 1:
        raise ValueError(f"{what}: Wscale must be a scalar (shape [] or [1]), got {list(wscale.shape)}: QuIP#'s "
                         f"Wscale is one number per layer; a per-row scale [out_features] belongs in SV (pass "
                         f"SV * Wscale as SV, as QuIP#'s current checkpoints store it)")
    return wscale


def decode_qidxs(qidxs: torch.Tensor, n: int, bits: int | None = None) -> torch.Tensor:
    """``W^`` (fp32 [m, n]), the codebook values of QuIP#-layout ``Qidxs`` before rotations and scales:
    D(q1), plus D(q2)/3.45 (4 bits) or E81B[q2]/2.04 (3 bits). (QuIP#'s own RVQ decode rounds the sum to
    fp16; this one does not.) ``bits``: the declared width (checked against the shape); None infers it
    from the width (:func:`qidxs_bits`, a low-level helper's convenience)."""
    from .e8p12 import e8p12_decode

    inferred = qidxs_bits(qidxs, n)
    if bits is not None and inferred != bits:
        raise ValueError(f"Qidxs {tuple(qidxs.shape)} does not fit n = {n} at {bits} bits")
    bits = inferred
    m = qidxs.shape[0]
    w_hat = e8p12_decode(unpack_qidxs_e8p(qidxs[:, : n // 32])).reshape(m, n)
    if bits == 4:
        w_hat = w_hat + e8p12_decode(unpack_qidxs_e8p(qidxs[:, n // 32:])).reshape(m, n) / RESID_SCALE[4]
    elif bits == 3:
        w_hat = w_hat + E81B.to(qidxs.device)[_unpack_e81b(qidxs[:, n // 32:])].reshape(m, n) / RESID_SCALE[3]
    return w_hat


def dequantize_e8p(state: dict, bits: int | None = None, hadamard: str | None = None) -> torch.Tensor:
    """The fp32 weight [m, n] an E8P state stands for (a :func:`quantize_e8p` state, or one QuIP# E8P12 / RVQ
    layer with ``codebook_id``): ``diag(SV * Wscale) U_m W^ U_n^T diag(SU)``.

    The layout is read from the state, never guessed (keys: ``STATE_KEYS_DOC`` in this module and
    docs/formats.md): the bit width from ``codebook_id`` (or ``bits``; ValueError naming the missing
    ``codebook_id`` when neither says, or when they disagree), ``U_k`` from ``state["hadamard"]`` (or
    ``hadamard``: ``"tersor"`` or ``"quipsharp"``, QuIP#'s H_K from :mod:`tersor.quant.quipsharp_hadamard`;
    ValueError when neither says and n or m is not a power of two). ``Qidxs`` must be int64 (TypeError)."""
    what = "dequantize_e8p"
    q = check_qidxs(check_state(state, what)["Qidxs"], what)
    for key in ("SU", "SV"):
        t = state[key]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 1:
            got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{what}: {key} must be a 1-d float tensor, got {got}")
    su, sv = state["SU"], state["SV"]
    n, m = su.numel(), sv.numel()
    b = check_layout(q, n, m, resolve_bits(state, bits, what), what, "codebook_id" in state)
    had = resolve_hadamard(state, hadamard, n, m, what)
    wscale = check_wscale(state.get("Wscale"), what)
    a = decode_qidxs(q, n, b) * wscale.float().reshape(())
    if had == "tersor":
        return unrht(a, su, sv)
    from . import quipsharp_hadamard as qh

    hks = []
    for side, k in (("in_features", n), ("out_features", m)):
        kk = qh.quipsharp_factor(k)[0]
        hks.append(qh.quipsharp_hadamard_k(kk) if kk > 1 else None)
    a = qh.quipsharp_hadamard(a, hks[0])  # rows: W^ U_n^T
    a = qh.quipsharp_hadamard(a.t().contiguous(), hks[1]).t()  # U_m (W^ U_n^T)
    return a * su.float()[None, :] * sv.float()[:, None]
