"""AQLM additive-codebook weights, tensor for tensor as AQLM checkpoints store them.

Facts and sources: docs/research/aqlm.md (Vahe1994/AQLM @e79a896, ``aqlm`` inference_lib 1.1.6). Summary,
for a weight [out, in] with C codebooks of 2^nbits entries and [og, ig] groups (1x16: C=1, nbits=16;
2x8: C=2, nbits=8; both with og=1, ig=8):

* ``codes``     [out/og, in/ig, C], signed: int8 for nbits <= 8, int16 for <= 16. Entry index = code mod 2^nbits
  (a stored -1 is entry 2^nbits - 1).
* ``codebooks`` [C, 2^nbits, og, ig], float16 or bfloat16 in checkpoints.
* ``scales``    [out/og, 1, 1, 1], same dtype; one scale per output group.
* ``bias``      [out] or absent; added after the matmul, never part of the weight.

W[o*og + r, i*ig + k] = scales[o] * sum_c codebooks[c, index[o, i, c], r, k], where the sum over codebooks is
accumulated in float32 (for 16-bit codebooks) and rounded once to the codebook dtype, and the product with
the scales is then taken in torch's promoted dtype of the two (float16 for a float16 checkpoint).
"""

from __future__ import annotations

import torch

_CODE_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)


def _storage_dtype(nbits: int) -> torch.dtype:
    # AQLM's get_int_dtype: the narrowest signed type with at least nbits bits
    if nbits <= 8:
        return torch.int8
    if nbits <= 16:
        return torch.int16
    return torch.int32


def _kind(t) -> str:
    return str(t.dtype) if isinstance(t, torch.Tensor) else type(t).__name__


def _check_nbits(nbits, what: str) -> int:
    if isinstance(nbits, bool) or not isinstance(nbits, int) or not 1 <= nbits <= 31:
        raise ValueError(f"{what}: nbits must be an int in [1, 31], got {nbits!r}")
    return nbits


def aqlm_code_indices(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """Stored (signed) AQLM codes -> codebook entry indices in [0, 2^nbits), int64, same shape.

    index = code mod 2^nbits, which is AQLM's ``unpack_int_data`` and what its kernels do by reading the bytes
    as unsigned. Codes may be any signed integer dtype at least nbits wide.
    """
    _check_nbits(nbits, "aqlm_code_indices")
    if not isinstance(codes, torch.Tensor) or codes.dtype not in _CODE_DTYPES:
        raise TypeError(f"aqlm_code_indices: codes must be a signed integer tensor (int8/int16/int32/int64), "
                        f"got {_kind(codes)}")
    if torch.iinfo(codes.dtype).bits < nbits:
        raise ValueError(f"aqlm_code_indices: {codes.dtype} codes cannot hold {nbits}-bit indices")
    return codes.to(torch.int64) & ((1 << nbits) - 1)  # two's complement: same as a non-negative mod 2^nbits


def aqlm_pack_codes(indices: torch.Tensor, nbits: int) -> torch.Tensor:
    """Codebook entry indices in [0, 2^nbits) -> AQLM's stored codes (inverse of :func:`aqlm_code_indices`).

    The storage dtype is int8 for nbits <= 8, int16 for nbits <= 16 (int32 above); indices >= 2^(nbits-1) are
    stored as index - 2^nbits, AQLM's ``pack_int_data`` (which, unlike this function, also rewrites its input).
    """
    _check_nbits(nbits, "aqlm_pack_codes")
    if not isinstance(indices, torch.Tensor) or indices.is_floating_point() or indices.is_complex() \
            or indices.dtype == torch.bool:
        raise TypeError(f"aqlm_pack_codes: indices must be an integer tensor, got {_kind(indices)}")
    idx = indices.to(torch.int64)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= 1 << nbits):
        raise ValueError(f"aqlm_pack_codes: indices must lie in [0, 2^{nbits}), "
                         f"got range [{int(idx.min())}, {int(idx.max())}]")
    packed = torch.where(idx >= 1 << (nbits - 1), idx - (1 << nbits), idx)
    return packed.to(_storage_dtype(nbits))


def _check_tensors(codes, codebooks, scales, what: str) -> int:
    """Validates AQLM's three tensors against each other; returns nbits."""
    if not isinstance(codebooks, torch.Tensor) or not codebooks.is_floating_point():
        raise TypeError(f"{what}: codebooks must be a float tensor, got {_kind(codebooks)}")
    if codebooks.dim() != 4:
        raise ValueError(f"{what}: codebooks must be [num_codebooks, codebook_size, out_group_size, "
                         f"in_group_size], got shape {tuple(codebooks.shape)}")
    num_codebooks, codebook_size = codebooks.shape[:2]
    if codebook_size < 2 or codebook_size & (codebook_size - 1):
        raise ValueError(f"{what}: codebook_size must be a power of two >= 2, got {codebook_size}")
    nbits = codebook_size.bit_length() - 1
    if not isinstance(codes, torch.Tensor) or codes.dtype not in _CODE_DTYPES:
        raise TypeError(f"{what}: codes must be a signed integer tensor (AQLM stores int8 or int16), "
                        f"got {_kind(codes)}")
    if codes.dim() != 3 or codes.shape[2] != num_codebooks:
        raise ValueError(f"{what}: codes must be [out/out_group_size, in/in_group_size, num_codebooks="
                         f"{num_codebooks}], got shape {tuple(codes.shape)}")
    if torch.iinfo(codes.dtype).bits < nbits:
        raise ValueError(f"{what}: {codes.dtype} codes cannot address a {codebook_size}-entry codebook")
    if codes.device != codebooks.device:
        raise ValueError(f"{what}: codes on {codes.device} but codebooks on {codebooks.device}")
    if scales is not None:
        if not isinstance(scales, torch.Tensor) or not scales.is_floating_point():
            raise TypeError(f"{what}: scales must be a float tensor or None, got {_kind(scales)}")
        groups = (codes.shape[0], codes.shape[1], codebooks.shape[2], codebooks.shape[3])
        # 4-d only: a 1-d [out] vector would broadcast against in_group_size and silently scale columns
        if scales.dim() != 4 or any(s not in (1, g) for s, g in zip(scales.shape, groups)):
            raise ValueError(f"{what}: scales must be [out/out_group_size, 1, 1, 1] (or another 4-d shape that "
                             f"broadcasts to {list(groups)}), got shape {tuple(scales.shape)}")
        if scales.device != codebooks.device:
            raise ValueError(f"{what}: scales on {scales.device} but codebooks on {codebooks.device}")
    return nbits


def aqlm_dequantize_reference(codes: torch.Tensor, codebooks: torch.Tensor,
                              scales: torch.Tensor | None = None) -> torch.Tensor:
    """AQLM weight [out, in] from its stored tensors, rounding for rounding as AQLM's ``_dequantize_weight``.

    codes [out/og, in/ig, C] (signed int, read mod 2^nbits), codebooks [C, 2^nbits, og, ig] (float),
    scales [out/og, 1, 1, 1] or None. Per group: the C codebook vectors are summed in codebook order in float32
    (in the codebook dtype when that is float32 or float64) and rounded once to the codebook dtype, then
    multiplied by the scale with torch's type promotion. Output dtype: promote(codebooks, scales).
    """
    nbits = _check_tensors(codes, codebooks, scales, "aqlm_dequantize_reference")
    num_codebooks, codebook_size, og, ig = codebooks.shape
    n_out_groups, n_in_groups = codes.shape[:2]
    index = aqlm_code_indices(codes, nbits)
    acc_dtype = torch.float32 if codebooks.element_size() < 4 else codebooks.dtype
    entries = codebooks.reshape(num_codebooks, codebook_size, og * ig)
    acc = entries[0][index[..., 0]].to(acc_dtype)
    for c in range(1, num_codebooks):
        acc = acc + entries[c][index[..., c]].to(acc_dtype)
    groups = acc.to(codebooks.dtype).view(n_out_groups, n_in_groups, og, ig)
    if scales is not None:
        groups = groups * scales
    return groups.permute(0, 2, 1, 3).reshape(n_out_groups * og, n_in_groups * ig)


# ------------------------------------------------------------------ quantizer
_SCORE_BLOCK = 1 << 20  # score-matrix elements per chunk (4 MiB of float32), whatever the codebook size
_MIN_ROWS = 16  # single-row matmuls against 2^16 entries are ~100x slower per row than 16-row ones
_JOINT_LS_MAX = 2048  # largest C * 2^nbits for the joint least-squares codebook update (a dense C*K square)


def _nearest(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest row of centroids [K, d] for each row of x [N, d], int64 [N]; chunked over N."""
    # argmax of x.c - |c|^2/2 is the argmin of |x - c|^2; |x|^2 is the same for every candidate
    neg_half_norm = -0.5 * (centroids * centroids).sum(1)
    out = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    rows = max(_MIN_ROWS, _SCORE_BLOCK // centroids.shape[0])
    cT = centroids.t().contiguous()
    for s in range(0, x.shape[0], rows):
        out[s:s + rows] = torch.addmm(neg_half_norm, x[s:s + rows], cT).argmax(1)
    return out


def _kmeans(x: torch.Tensor, weight: torch.Tensor, k: int, iters: int,
            gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted Lloyd k-means on x [N, d] (row weights [N]) from k random distinct rows.

    Returns (centroids [k, d], assignment int64 [N]).
    """
    n, d = x.shape
    if n <= k:
        # At least as many entries as vectors (1x16 on a small matrix): each vector gets an entry of its own, so
        # this codebook reproduces its input exactly. The k - n spare entries are copies of random vectors with
        # a little noise, so that they are distinct and in the data's range rather than dead zeros.
        order = torch.randperm(n, generator=gen).to(x.device)
        spare = x[torch.randint(n, (k - n,), generator=gen).to(x.device)]
        noise = torch.randn(k - n, d, generator=gen).to(x.device) * (0.05 * float(x.pow(2).mean().sqrt()) + 1e-8)
        return torch.cat([x[order], spare + noise]), torch.argsort(order)
    centroids = x[torch.randperm(n, generator=gen)[:k].to(x.device)].clone()
    assign = _nearest(x, centroids)
    for _ in range(iters):
        mass = torch.zeros(k, dtype=x.dtype, device=x.device).index_add_(0, assign, weight)
        sums = torch.zeros(k, d, dtype=x.dtype, device=x.device).index_add_(0, assign, x * weight[:, None])
        alive = mass > 0
        centroids[alive] = sums[alive] / mass[alive, None]
        dead = (~alive).nonzero().flatten()
        if dead.numel():  # an empty cluster restarts at a random vector instead of staying useless
            centroids[dead] = x[torch.randint(n, (dead.numel(),), generator=gen).to(x.device)]
        new_assign = _nearest(x, centroids)
        if torch.equal(new_assign, assign):
            break
        assign = new_assign
    return centroids, assign


def _greedy_codes(x: torch.Tensor, books: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """One sweep of exact per-codebook updates: code c becomes the best entry given the other codes (ICM).

    Never increases any vector's error. x [N, d], books [C, K, d], codes [N, C] (updated copy returned).
    """
    codes = codes.clone()
    recon = sum(books[c][codes[:, c]] for c in range(books.shape[0]))
    for c in range(books.shape[0]):
        others = recon - books[c][codes[:, c]]
        codes[:, c] = _nearest(x - others, books[c])
        recon = others + books[c][codes[:, c]]
    return codes


def _beam_codes(x: torch.Tensor, books: torch.Tensor, beam: int) -> torch.Tensor:
    """Beam search over codebooks in order 0..C-1 keeping the `beam` best partial sums per vector; codes [N, C]."""
    num_books, k, _ = books.shape
    book_sq = (books * books).sum(-1)  # [C, K]
    out = torch.empty(x.shape[0], num_books, dtype=torch.int64, device=x.device)
    rows = max(_MIN_ROWS, _SCORE_BLOCK // (beam * k))
    for s in range(0, x.shape[0], rows):
        resid = x[s:s + rows, None, :]  # [n, b, d] residual of each hypothesis
        err = (resid * resid).sum(-1)  # [n, b]
        hyp = torch.empty(resid.shape[0], 1, 0, dtype=torch.int64, device=x.device)
        for c in range(num_books):
            n, b = err.shape
            # |r - e|^2 = |r|^2 - 2 r.e + |e|^2 for every hypothesis r and entry e
            cand = torch.addmm(book_sq[c], resid.reshape(n * b, -1), books[c].t(), alpha=-2).view(n, b, k)
            cand += err[:, :, None]
            keep = 1 if c == num_books - 1 else min(beam, b * k)  # only the best full sum is used
            err, flat = cand.reshape(n, b * k).topk(keep, dim=1, largest=False)
            parent, entry = flat // k, flat % k
            hyp = torch.cat([hyp.gather(1, parent[:, :, None].expand(-1, -1, c)), entry[:, :, None]], dim=2)
            resid = resid.gather(1, parent[:, :, None].expand(-1, -1, resid.shape[2])) - books[c][entry]
        out[s:s + rows] = hyp[:, 0]  # topk is sorted: hypothesis 0 is the best
    return out


def _sq_err(x: torch.Tensor, books: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    recon = sum(books[c][codes[:, c]] for c in range(books.shape[0]))
    return ((x - recon) ** 2).sum(1)


def _update_codebooks(x: torch.Tensor, weight: torch.Tensor, books: torch.Tensor,
                      codes: torch.Tensor) -> torch.Tensor:
    """Weighted least-squares codebooks for fixed codes: min sum_n weight_n |x_n - sum_c books[c, codes_nc]|^2.

    Small C*K: one joint solve. The normal matrix is singular (a constant can move between codebooks, unused
    entries are free), so it is solved with a small proximal term towards the current codebooks, which picks
    the solution nearest to them and keeps unused entries where they were; the objective still cannot grow.
    Otherwise: exact updates one codebook at a time (per-entry weighted means of the residual).
    """
    num_books, k, d = books.shape
    if num_books == 1 or num_books * k > _JOINT_LS_MAX:
        books = books.clone()
        recon = sum(books[c][codes[:, c]] for c in range(num_books))
        for c in range(num_books):
            target = x - (recon - books[c][codes[:, c]])
            mass = torch.zeros(k, dtype=x.dtype, device=x.device).index_add_(0, codes[:, c], weight)
            sums = torch.zeros(k, d, dtype=x.dtype, device=x.device)
            sums.index_add_(0, codes[:, c], target * weight[:, None])
            used = mass > 0
            recon = recon - books[c][codes[:, c]]
            books[c][used] = sums[used] / mass[used, None]
            recon = recon + books[c][codes[:, c]]
        return books
    size = num_books * k
    flat_idx = codes + torch.arange(num_books, device=codes.device) * k  # [N, C] indices into the stacked entries
    w64 = weight.double()
    pairs = (flat_idx[:, :, None] * size + flat_idx[:, None, :]).reshape(-1)
    normal = torch.bincount(pairs, weights=w64[:, None].expand(-1, num_books * num_books).reshape(-1),
                            minlength=size * size).view(size, size)
    rhs = torch.zeros(size, d, dtype=torch.float64, device=x.device)
    for c in range(num_books):
        rhs.index_add_(0, flat_idx[:, c], x.double() * w64[:, None])
    diag = normal.diagonal()
    prox = 1e-4 * float(diag.sum()) / max(1, int((diag > 0).sum()))
    if prox == 0:  # every weight is zero: nothing to fit
        return books
    prev = books.reshape(size, d).double()
    eye = torch.eye(size, dtype=torch.float64, device=x.device)
    sol = torch.linalg.solve(normal + prox * eye, rhs + prox * prev)
    return sol.to(x.dtype).view(num_books, k, d)


# ------------------------------------------------------------------ data-aware (Hessian) refinement
_CG_ITERS = 50  # most preconditioned CG steps of the codebook least squares (stops at 1e-4 relative residual)
_BEAM_SCORES = 1 << 22  # candidate scores alive at once in the Hessian beam search (16 MiB of float32)
_SPAN = 16  # input groups whose gradient columns the Hessian code search updates after every step


def _h_loss(w: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Per-row proxy loss (s_o q_o - w_o) H (s_o q_o - w_o)^T, float64 [out]."""
    r = scales[:, None] * q - w
    return ((r @ h) * r).double().sum(1)


def _decode_rows(books: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """codes [out, n_in, C] -> the unscaled weight [out, n_in * d]."""
    q = books[0][codes[..., 0]]
    for c in range(1, books.shape[0]):
        q = q + books[c][codes[..., c]]
    return q.reshape(codes.shape[0], -1)


def _books_under_h(w, h, books, codes, scales):
    """Codebooks minimising sum_o (s_o q_o(B) - w_o) H (...)^T for fixed codes and scales: the normal equations
    A^T(A(B) H) = A^T(w H) (A(B) = s * decode(B)), solved by Jacobi-preconditioned conjugate gradients from
    the current codebooks, with the data-free update's small proximal term towards them (which keeps
    unused entries where they are and makes the system definite)."""
    num_books, k, d = books.shape
    out = w.shape[0]
    flat = codes.reshape(-1, num_books)

    def adjoint(g):  # [out, in] -> [C, K, d]
        gs = (scales[:, None] * g).reshape(-1, d)
        res = torch.zeros_like(books)
        for c in range(num_books):
            res[c].index_add_(0, flat[:, c], gs)
        return res

    hd = h.diagonal().reshape(1, -1, d) * (scales * scales)[:, None, None]  # [out, n_in, d]
    diag = torch.zeros_like(books)
    for c in range(num_books):
        diag[c].index_add_(0, flat[:, c], hd.expand(out, -1, -1).reshape(-1, d))
    used = diag > 0
    if not bool(used.any()):
        return books
    prox = 1e-4 * float(diag[used].mean())
    precond = 1.0 / (diag + prox)

    def normal(b):
        return adjoint((scales[:, None] * _decode_rows(b, codes)) @ h) + prox * b

    x = books.clone()
    r = adjoint(w @ h) + prox * books - normal(x)
    z = precond * r
    p = z.clone()
    rz = float((r * z).double().sum())
    r0 = float(r.double().norm())
    for _ in range(_CG_ITERS):
        if r0 == 0 or float(r.double().norm()) <= 1e-4 * r0:
            break
        ap = normal(p)
        pap = float((p * ap).double().sum())
        if pap <= 0:
            break
        alpha = rz / pap
        x += alpha * p
        r -= alpha * ap
        z = precond * r
        rz, rz_prev = float((r * z).double().sum()), rz
        p = z + (rz / rz_prev) * p
    return x


def _codes_under_h(w, h, books, codes, scales, beam):
    """Codes minimising the per-row proxy loss for fixed codebooks and scales: a beam search (``beam``
    hypotheses per output row) over the (input group, codebook) positions in order, each step trying every
    entry at one position. The groups of a row are coupled through H: with the row's gradient
    g = (s q - w) H, replacing the entry at group j by one that changes the weight by D (8 values) changes
    the loss by exactly 2 D.g_j + D^T H_jj D; g is kept current (lazily, see below). The current codes are one of
    the hypotheses, so the best loss never grows. Rows are independent and done in chunks."""
    num_books, k, d = books.shape
    out, n_in, _ = codes.shape
    inn = n_in * d
    hjj = h.reshape(n_in, d, n_in, d).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [n_in, d, d]
    hrows = h.reshape(n_in, d, inn)
    # s^2-free part of D^T H_jj D for every entry: e^T H_jj e, [C, n_in, K] (per step when that is too big)
    ehe = None
    if num_books * n_in * k * d <= 1 << 24:
        ehe = torch.stack([((books[c] @ hjj) * books[c]).sum(-1) for c in range(num_books)])
    best = codes.clone()
    rows = max(1, _BEAM_SCORES // (beam * k))
    for s0 in range(0, out, rows):
        sl = slice(s0, min(out, s0 + rows))
        n = sl.stop - sl.start
        s = scales[sl]
        hyp = codes[sl].unsqueeze(1).clone()  # [n, b, n_in, C], one hypothesis to start
        grad = ((s[:, None] * _decode_rows(books, codes[sl]) - w[sl]) @ h).unsqueeze(1)  # [n, b, in]
        loss = _h_loss(w[sl], _decode_rows(books, codes[sl]), s, h).float().unsqueeze(1)  # [n, b]
        s1, s2 = s[:, None, None], (s * s)[:, None, None]
        # The gradient is brought up to date lazily: within a span of groups, only the span's columns are
        # updated after each step (a [d, span] product); the changes made in the span reach the other
        # columns in one product at its end. Hypotheses are re-parented within the span through `origin`.
        for j0 in range(0, n_in, _SPAN):
            j1 = min(n_in, j0 + _SPAN)
            cols = slice(j0 * d, j1 * d)
            local = grad[:, :, cols].clone()  # [n, b, span*d], always current
            pend = torch.zeros_like(local)  # the weight changes (times s) made in this span
            span_codes = hyp[:, :, j0:j1].clone()  # [n, b, span, C]
            origin = torch.arange(hyp.shape[1], device=hyp.device).expand(n, -1)
            h_span = h[cols, cols]
            for j in range(j0, j1):
                jl = slice((j - j0) * d, (j - j0 + 1) * d)
                for c in range(num_books):
                    b = span_codes.shape[1]
                    v = books[c][span_codes[:, :, j - j0, c]]  # [n, b, d] the current entries
                    g = local[:, :, jl]
                    vh = v @ hjj[j]
                    e_he = ehe[c, j] if ehe is not None else ((books[c] @ hjj[j]) * books[c]).sum(-1)
                    # loss change for entry e: s^2 e.H_jj.e + e.(2 s g - 2 s^2 H_jj v) + s^2 v.H_jj.v - 2 s v.g
                    lin = 2 * s1 * g - 2 * s2 * vh
                    const = s2[..., 0] * (vh * v).sum(-1) - 2 * s1[..., 0] * (v * g).sum(-1)
                    total = torch.baddbmm((s2 * e_he).expand(n, b, k), lin, books[c].t().expand(n, d, k))
                    total += (loss + const)[:, :, None]
                    if beam == 1:
                        loss, entry = total.min(-1)
                    else:
                        loss, idx = total.reshape(n, b * k).topk(min(beam, b * k), dim=1, largest=False)
                        parent, entry = idx // k, idx % k
                        span_codes = span_codes.gather(1, parent[:, :, None, None].expand(
                            -1, -1, j1 - j0, num_books))
                        local = local.gather(1, parent[:, :, None].expand(-1, -1, local.shape[2]))
                        pend = pend.gather(1, parent[:, :, None].expand(-1, -1, pend.shape[2]))
                        v = v.gather(1, parent[:, :, None].expand(-1, -1, d))
                        origin = origin.gather(1, parent)
                    span_codes[:, :, j - j0, c] = entry
                    change = s1 * (books[c][entry] - v)
                    pend[:, :, jl] += change
                    local = local + torch.matmul(change, h_span[jl])
            if beam > 1:  # re-parent the hypotheses as the span's steps chose
                hyp = hyp.gather(1, origin[:, :, None, None].expand(-1, -1, n_in, num_books))
                grad = grad.gather(1, origin[:, :, None].expand(-1, -1, inn))
            hyp[:, :, j0:j1] = span_codes
            grad = grad + torch.matmul(pend, hrows[j0:j1].reshape((j1 - j0) * d, inn))
        best[sl] = hyp[torch.arange(n, device=hyp.device), loss.argmin(1)]
    return best


def _refine_with_hessian(w, h, books, codes, scales, iters, beam, stored):
    """``iters`` rounds of the data-free loop's three steps under the proxy loss tr((W - W^) H (W - W^)^T):
    per-row least-squares scales, codebooks by :func:`_books_under_h`, codes by :func:`_codes_under_h`. A
    step's result is kept only where it lowers the loss (after rounding to the stored dtype)."""
    q = _decode_rows(books, codes)
    err = float(_h_loss(w, q, scales, h).sum())
    for _ in range(iters):
        start = err
        qh = q @ h
        den = (q * qh).sum(1)
        new_scales = torch.where(den > 0, stored((w * qh).sum(1) / den.clamp_min(1e-30)), scales)
        new_err = float(_h_loss(w, q, new_scales, h).sum())
        if new_err < err:
            scales, err = new_scales, new_err
        new_books = stored(_books_under_h(w, h, books, codes, scales))
        new_q = _decode_rows(new_books, codes)
        new_err = float(_h_loss(w, new_q, scales, h).sum())
        if new_err < err:
            books, q, err = new_books, new_q, new_err
        new_codes = _codes_under_h(w, h, books, codes, scales, beam)
        new_q = _decode_rows(books, new_codes)
        new_err = float(_h_loss(w, new_q, scales, h).sum())
        if new_err < err:
            codes, q, err = new_codes, new_q, new_err
        if err >= start * (1 - 1e-6):
            break
    return books, codes, scales


def quantize_aqlm(w: torch.Tensor, num_codebooks: int = 2, nbits: int = 8, in_group_size: int = 8,
                  out_group_size: int = 1, iters: int = 6, beam_size: int = 4, seed: int = 0,
                  codebook_dtype: torch.dtype = torch.float16, kmeans_iters: int = 20,
                  hessian: torch.Tensor | None = None, sigma_reg: float = 1.0) -> dict[str, torch.Tensor]:
    """Additive-codebook (AQLM-format) quantization of a weight [out, in]: data-free (plain weight MSE), or,
    with ``hessian``, data-aware (AQLM's objective, the layer's output error on the calibration inputs).

    Returns ``dict(codes=, codebooks=, scales=)`` exactly as AQLM stores them: codes [out/og, in/ig, C] int8
    (nbits <= 8) or int16 (nbits <= 16), codebooks [C, 2^nbits, og, ig] and scales [out/og, 1, 1, 1] in
    ``codebook_dtype``; :func:`aqlm_dequantize_reference` turns them back into the weight.

    Method: scales start at each output group's RMS; the scaled group vectors (og*ig values each) are
    initialised by residual k-means (codebook c clusters what codebooks < c left over; seeded random-vector init,
    ``kmeans_iters`` weighted Lloyd steps). Each of the ``iters`` rounds then refits the scales (per-group
    least squares), the codebooks (least squares for fixed codes) and the codes (an exact sweep over codebooks,
    then, with ``beam_size`` > 1, a beam search over codebooks whose result a vector keeps only where it is
    better). Every step is a minimisation of the same weighted error, so the error never grows apart from the
    rounding to ``codebook_dtype``, which is applied after each step so that codes are chosen for the values
    actually stored. With 2^nbits >= the number of group vectors (e.g. 1x16 on a small matrix) the codebook
    simply holds every vector and the result is exact up to that rounding.

    ``hessian`` (the input second moment ``E[x x^T]`` [in, in], e.g. ``X.T @ X / len(X)``; what
    ``tersor.quantize_`` captures per layer): the rounds minimise AQLM's proxy loss
    ``tr((W - W^) H (W - W^)^T)`` = the output error ``||X W^T - X W^^T||^2 / len(X)`` instead, with
    ``sigma_reg * mean(diag H)`` added to H's diagonal. This is far more damping than :func:`quantize_e8p`'s
    1e-2: AQLM fits its codebooks and codes to H, and with a rank-deficient H (fewer calibration tokens than
    inputs) the directions the calibration never saw were left unconstrained. Measured on all-MiniLM-L6-v2
    with its 12 calibration sentences (2x8, iters=1, embedding cosine on held-out sentences): 0.645 at 1e-2, 0.719
    at 0.1, 0.769 at 0.3, **0.806 at 1**, 0.792 at 3, 0.775 at 10; data-free 0.637. With much more
    calibration data than inputs, a smaller value fits the data more closely. The initialisation is
    the same k-means; each round then refits the per-row scales (least squares under H), the codebooks (the
    least-squares problem under H, by preconditioned conjugate gradients) and the codes (a beam search of
    ``beam_size`` hypotheses per output row over the (input group, codebook) positions, the groups of a
    row coupled through H: each step's loss change is exact). Each step is kept only where it lowers the
    proxy loss. Needs ``out_group_size == 1``. Costs about ``in * 2^nbits`` multiply-adds per weight and
    round for the codes: fine for 2x8, slow for 1x16. Without ``hessian`` the result is unchanged
    (bit-identical to the data-free quantizer).

    Deterministic for a given seed on CPU (on CUDA, index_add_ accumulates in nondeterministic order).
    """
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"quantize_aqlm: expected a 2-d float weight [out, in], got "
                         f"{_kind(w)} {tuple(getattr(w, 'shape', ()))}")
    for name, v in (("num_codebooks", num_codebooks), ("in_group_size", in_group_size),
                    ("out_group_size", out_group_size), ("beam_size", beam_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"quantize_aqlm: {name} must be a positive int, got {v!r}")
    for name, v in (("iters", iters), ("kmeans_iters", kmeans_iters)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"quantize_aqlm: {name} must be a non-negative int, got {v!r}")
    if isinstance(nbits, bool) or not isinstance(nbits, int) or not 1 <= nbits <= 16:
        raise ValueError(f"quantize_aqlm: nbits must be an int in [1, 16] (AQLM stores int8/int16 codes), "
                         f"got {nbits!r}")
    if not isinstance(codebook_dtype, torch.dtype) or not codebook_dtype.is_floating_point:
        raise TypeError(f"quantize_aqlm: codebook_dtype must be a float dtype, got {codebook_dtype!r}")
    out_features, in_features = w.shape
    if out_features % out_group_size or in_features % in_group_size:
        raise ValueError(f"quantize_aqlm: weight [{out_features}, {in_features}] is not divisible into "
                         f"[out_group_size={out_group_size}, in_group_size={in_group_size}] groups")
    w32 = w.detach().float()
    if not torch.isfinite(w32).all():
        raise ValueError("quantize_aqlm: weight has non-finite values")
    h = None
    if hessian is not None:
        if not isinstance(hessian, torch.Tensor) or not hessian.is_floating_point():
            raise TypeError(f"quantize_aqlm: hessian must be a float tensor [in, in] or None, got {_kind(hessian)}")
        if tuple(hessian.shape) != (in_features, in_features):
            raise ValueError(f"quantize_aqlm: hessian must be [{in_features}, {in_features}] (E[x x^T] of the "
                             f"layer's inputs), got {list(hessian.shape)}")
        if out_group_size != 1:
            raise NotImplementedError(f"quantize_aqlm: hessian with out_group_size={out_group_size}; the "
                                      f"data-aware path takes out_group_size 1")
        if isinstance(sigma_reg, bool) or not isinstance(sigma_reg, (int, float)) or not 0 <= sigma_reg < float("inf"):
            raise ValueError(f"quantize_aqlm: sigma_reg must be a finite float >= 0, got {sigma_reg!r}")
        h = hessian.detach().to(device=w.device, dtype=torch.float64)
        if not torch.isfinite(h).all():
            raise ValueError("quantize_aqlm: hessian has non-finite values")
        h = (h + h.t()) / 2
        mean_diag = float(h.diagonal().mean())
        if not mean_diag > 0:
            raise ValueError("quantize_aqlm: hessian has a non-positive mean diagonal (no calibration signal)")
        h = (h + sigma_reg * mean_diag * torch.eye(in_features, dtype=h.dtype, device=h.device)).float()

    og, ig, k = out_group_size, in_group_size, 1 << nbits
    n_out, n_in, d = out_features // og, in_features // ig, og * ig
    device = w.device
    gen = torch.Generator().manual_seed(seed)  # CPU stream: the same samples whatever the device

    def stored(t: torch.Tensor) -> torch.Tensor:
        return t.to(codebook_dtype).float()

    groups = w32.view(n_out, og, n_in, ig).permute(0, 2, 1, 3).reshape(n_out, n_in, d)
    scales = stored(groups.pow(2).mean((1, 2)).sqrt())  # [n_out]
    if not torch.isfinite(scales).all():
        raise ValueError(f"quantize_aqlm: the weight's scale does not fit {codebook_dtype}")

    def targets(scales):
        # |W_o - s_o Q_o|^2 = s_o^2 |W_o / s_o - Q_o|^2: fit the scaled vectors, weighted by s_o^2
        safe = torch.where(scales == 0, torch.ones_like(scales), scales)
        x = torch.where(scales[:, None, None] == 0, torch.zeros_like(groups), groups / safe[:, None, None])
        return x.reshape(n_out * n_in, d), (scales * scales).repeat_interleave(n_in)

    x, weight = targets(scales)
    books = torch.empty(num_codebooks, k, d, device=device)
    codes = torch.empty(x.shape[0], num_codebooks, dtype=torch.int64, device=device)
    resid = x.clone()
    for c in range(num_codebooks):
        centroids, codes[:, c] = _kmeans(resid, weight, k, kmeans_iters, gen)
        books[c] = stored(centroids)
        resid -= books[c][codes[:, c]]

    if h is not None:
        books, codes, scales = _refine_with_hessian(
            w32, h, books, codes.view(n_out, n_in, num_codebooks), scales, iters, beam_size, stored)
        return dict(
            codes=aqlm_pack_codes(codes, nbits),
            codebooks=books.view(num_codebooks, k, og, ig).to(codebook_dtype).contiguous(),
            scales=scales.view(n_out, 1, 1, 1).to(codebook_dtype),
        )

    def total_err(x, weight, books, codes):
        return float((_sq_err(x, books, codes).double() * weight).sum())

    err = total_err(x, weight, books, codes)
    for _ in range(iters):
        q = sum(books[c][codes[:, c]] for c in range(num_codebooks)).view(n_out, n_in * d)
        g = groups.reshape(n_out, n_in * d)
        qq = (q * q).sum(1)
        scales = torch.where(qq > 0, stored((g * q).sum(1) / qq.clamp_min(1e-30)), scales)
        x, weight = targets(scales)
        books = stored(_update_codebooks(x, weight, books, codes))
        codes = _greedy_codes(x, books, codes)
        if beam_size > 1 and num_codebooks > 1:
            beam = _beam_codes(x, books, beam_size)
            better = _sq_err(x, books, beam) < _sq_err(x, books, codes)
            codes = torch.where(better[:, None], beam, codes)
        prev, err = err, total_err(x, weight, books, codes)
        if err >= prev * (1 - 1e-6):  # converged, or exact (1x16 on a small matrix): more rounds change nothing
            break

    return dict(
        codes=aqlm_pack_codes(codes.view(n_out, n_in, num_codebooks), nbits),
        codebooks=books.view(num_codebooks, k, og, ig).to(codebook_dtype).contiguous(),
        scales=scales.view(n_out, 1, 1, 1).to(codebook_dtype),
    )
