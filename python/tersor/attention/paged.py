"""Decode over a paged KV cache: :class:`PagedKVCache` and :func:`sage_decode`.

The cache is vLLM's / FlashInfer's paged layout: pages of ``page_size`` tokens, one block-table row of page ids
per sequence. ``quantized=True`` (the default) stores K as INT8 (smoothed by a per-page mean, one scale per
token) and V as FP8 e4m3 (per-page, per-channel scale), quantized once when the tokens are written: decode then
reads about 1 byte per K/V element instead of 2. ``docs/formats.md`` ("Paged KV cache v1") has the layout and
the rule that fixes a page's statistics; ``docs/usage.md`` ("Decode over a paged KV cache") the usage.

Status: CPU twin (exact, tested) and CUDA decode kernels (split-KV over the pages, GQA rows packed into the
MMA's M dimension, LSE merge: sm_80 / sm_89 / sm_90a). The CUDA kernels are compiled and replayed lane by lane on
the CPU against the twin, but have not yet run on a GPU (:data:`CUDA_DECODE_READY` is False until a GPU session
has passed tests/test_paged_decode_cuda.py). Quantize-on-write (``append``) on CUDA runs its own kernels
(bit-identical to the twin by construction; compiled, not run), with the index checks done here first.
``quantized=False`` keeps float16/bfloat16 pages and runs plain PyTorch attention on any device (a reference, not
a tersor kernel).
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

from .. import ops

__all__ = ["PagedKVCache", "sage_decode"]

#: The CUDA decode kernels (csrc/attention/decode_kernel.cuh) are compiled for sm_80 / sm_89 / sm_90a and replayed
#: lane by lane on the CPU, but have not run on a GPU yet: False until tests/test_paged_decode_cuda.py has passed on
#: one. Direct :func:`sage_decode` calls on CUDA do run them; the decode benchmark labels their rows unverified.
CUDA_DECODE_READY = False

PAGE_SIZES = tuple(range(16, 257, 16))


def _as_int32(name: str, t, device: torch.device, batch: Optional[int], dim: int, who: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{who}: {name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{who}: {name} must be int32 or int64, got {t.dtype}")
    if t.dim() != dim or (batch is not None and t.shape[0] != batch):
        want = "[batch]" if dim == 1 else "[batch, max_pages]"
        raise ValueError(f"{who}: {name} must be {want}" + (f" with batch = {batch}" if batch is not None else "")
                         + f", got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{who}: {name} is on {t.device}, the cache on {device}")
    if t.dtype == torch.int64 and t.numel() and (t.min() < -2**31 or t.max() >= 2**31):
        raise ValueError(f"{who}: {name} has values outside int32")
    return t.to(torch.int32).contiguous()


class PagedKVCache:
    """A paged KV cache of ``num_pages`` pages of ``page_size`` tokens (a multiple of 16 in [16, 256]) for
    ``num_kv_heads`` heads of ``head_dim`` (64, 128 or 256) channels.

    ``quantized=True``: tensors ``k_codes`` int8 and ``v_codes`` uint8 (e4m3 bits) ``[P, Hkv, S, D]``,
    ``k_scale`` float32 ``[P, Hkv, S]``, ``page_meta`` float32 ``[P, Hkv, 2, D]`` (each page's K smoothing mean
    and V channel scale). ``quantized=False``: ``k`` and ``v`` ``[P, Hkv, S, D]`` in ``dtype``. ``dtype`` is the
    dtype of the attention inputs and outputs (float16 or bfloat16). Sequences own pages through block tables
    that the caller manages (``block_table[b, i]`` = the page holding tokens ``i*S .. i*S+S-1`` of sequence b).
    """

    def __init__(self, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype = torch.bfloat16, device: Union[str, torch.device] = "cpu",
                 quantized: bool = True):
        who = "PagedKVCache"
        for name, val in (("num_pages", num_pages), ("page_size", page_size), ("num_kv_heads", num_kv_heads),
                          ("head_dim", head_dim)):
            if isinstance(val, bool) or not isinstance(val, int):
                raise TypeError(f"{who}: {name} must be an int, got {type(val).__name__}")
            if val < 1:
                raise ValueError(f"{who}: {name} must be >= 1, got {val}")
        if page_size not in PAGE_SIZES:
            raise ValueError(f"{who}: page_size must be a multiple of 16 in [16, 256], got {page_size}")
        if head_dim not in ops.PAGED_HEAD_DIMS:
            raise ValueError(f"{who}: head_dim must be 64, 128 or 256, got {head_dim}")
        if dtype not in (torch.float16, torch.bfloat16):
            raise TypeError(f"{who}: dtype must be torch.float16 or torch.bfloat16, got {dtype}")
        self.num_pages, self.page_size, self.num_kv_heads, self.head_dim = num_pages, page_size, num_kv_heads, head_dim
        self.dtype, self.device, self.quantized = dtype, torch.device(device), bool(quantized)
        shape = (num_pages, num_kv_heads, page_size, head_dim)
        if self.quantized:
            self.k_codes = torch.zeros(shape, dtype=torch.int8, device=self.device)
            self.v_codes = torch.zeros(shape, dtype=torch.uint8, device=self.device)
            self.k_scale = torch.zeros(shape[:3], dtype=torch.float32, device=self.device)
            self.page_meta = torch.zeros((num_pages, num_kv_heads, 2, head_dim), dtype=torch.float32,
                                         device=self.device)
        else:
            self.k = torch.zeros(shape, dtype=dtype, device=self.device)
            self.v = torch.zeros(shape, dtype=dtype, device=self.device)

    @property
    def nbytes(self) -> int:
        ts = (self.k_codes, self.v_codes, self.k_scale, self.page_meta) if self.quantized else (self.k, self.v)
        return sum(t.numel() * t.element_size() for t in ts)

    def __repr__(self) -> str:
        kind = "int8 K + e4m3 V" if self.quantized else str(self.dtype).replace("torch.", "")
        return (f"PagedKVCache({self.num_pages} pages x {self.page_size} tokens, {self.num_kv_heads} kv heads x "
                f"{self.head_dim}, {kind}, {self.nbytes / 2**20:.1f} MiB on {self.device})")

    def append(self, k: torch.Tensor, v: torch.Tensor, block_table: torch.Tensor, start: torch.Tensor,
               lengths: torch.Tensor) -> None:
        """Writes token ``t < lengths[b]`` of ``k``/``v [B, L, Hkv, D]`` at position ``start[b] + t`` of sequence
        ``b``. Quantized caches quantize on write; the chunk that starts a sequence (``start[b] == 0``, the
        prompt) fixes the K mean and V scales of its pages and every later page of that sequence (see
        docs/formats.md). Raises ValueError for indices out of range (nothing is written then)."""
        who = "PagedKVCache.append"
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{who}: {name} must be a tensor, got {type(t).__name__}")
            if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
                raise TypeError(f"{who}: {name} must be float16, bfloat16 or float32, got {t.dtype}")
            if t.dim() != 4 or t.shape[2:] != (self.num_kv_heads, self.head_dim):
                raise ValueError(f"{who}: {name} must be [batch, len, {self.num_kv_heads}, {self.head_dim}], got "
                                 f"{list(t.shape)}")
            if t.device != self.device:
                raise ValueError(f"{who}: {name} is on {t.device}, the cache on {self.device}")
        if k.shape != v.shape or k.dtype != v.dtype:
            raise ValueError(f"{who}: k {k.dtype} {list(k.shape)} and v {v.dtype} {list(v.shape)} differ")
        b = k.shape[0]
        block_table = _as_int32("block_table", block_table, self.device, b, 2, who)
        start = _as_int32("start", start, self.device, b, 1, who)
        lengths = _as_int32("lengths", lengths, self.device, b, 1, who)
        if self.quantized:
            if self.device.type != "cpu":
                self._check_append_indices(block_table, start, lengths, k.shape[1], who)
            ops.paged_kv_append_(self.k_codes, self.k_scale, self.v_codes, self.page_meta, k.contiguous(),
                                 v.contiguous(), block_table, start, lengths)
            return
        pos, seq, tok = self._positions(block_table, start, lengths, k.shape[1], who)
        page = block_table[seq, pos // self.page_size].long()
        slot = pos % self.page_size
        self.k[page, :, slot] = k[seq, tok].to(self.dtype)
        self.v[page, :, slot] = v[seq, tok].to(self.dtype)

    def _check_append_indices(self, block_table, start, lengths, max_len, who):
        """The quantized append's index checks, with the CPU twin's messages and order (sequence by sequence:
        length, start, block-table row, page ids, slots written twice; then continuations; see
        csrc/attention/paged_cpu.cpp), in tensor ops on the cache's device: on CUDA the op cannot read the
        indices without a sync, so they are checked here (two syncs when all is well) before anything is
        written. Any device (tested on the CPU against the twin)."""
        s, npages, b = self.page_size, self.num_pages, len(lengths)
        dev = block_table.device
        st, ln = start.long(), lengths.long()
        max_pages = block_table.shape[1]
        seqs = torch.arange(b, device=dev)
        act = ln > 0
        last = st + ln - 1
        bad_len = (ln < 0) | (ln > max_len)
        bad_start = st < 0
        bad_row = act & (last // s >= max_pages)
        ok = ~bad_len & ~bad_start & ~bad_row
        cols = torch.arange(max_pages, device=dev)[None, :]
        c0 = torch.where((st > 0) & (st % s == 0), (st - 1) // s, st // s)  # the stats source page is read too
        used = (act & ok)[:, None] & (cols >= c0[:, None]) & (cols <= (last // s)[:, None])
        bad_page = used & ((block_table < 0) | (block_table >= npages))
        # tokens of the sequences whose rows are in range, in the twin's (sequence, token) order
        n_ok = torch.where(ok & act, ln, torch.zeros_like(ln))
        seq = torch.repeat_interleave(seqs, n_ok)
        tok = torch.arange(len(seq), device=dev) - (torch.cumsum(n_ok, 0) - n_ok)[seq]
        pos = st[seq] + tok
        page = block_table[seq, pos // s].long() if len(seq) else pos
        key = page * s + pos % s
        sk, order = torch.sort(key, stable=True)
        again = torch.cat([sk.new_zeros(1, dtype=torch.bool), sk[1:] == sk[:-1]]) if len(sk) else sk.bool()
        run_start = torch.where(again, torch.zeros_like(order), torch.arange(len(sk), device=dev)).cummax(0).values \
            if len(sk) else order
        dup = torch.zeros(len(seq), dtype=torch.bool, device=dev)
        dup[order[again]] = True  # a token writing a slot an earlier token (this or an earlier sequence) writes
        first_writer = torch.empty_like(seq)
        first_writer[order] = seq[order[run_start]] if len(sk) else seq
        bad_dup = torch.zeros(b, dtype=torch.bool, device=dev).index_put_((seq[dup],), torch.tensor(True, device=dev))
        errs = torch.stack([bad_len, bad_start, bad_row, bad_page.any(1), bad_dup], 1)
        per_seq = errs.tolist()  # sync 1
        for i in range(b):
            if per_seq[i][0]:
                raise ValueError(f"{who}: lengths[{i}] = {int(ln[i])} is outside [0, {max_len}]")
            if per_seq[i][1]:
                raise ValueError(f"{who}: start[{i}] = {int(st[i])} is negative")
            if per_seq[i][2]:
                raise ValueError(f"{who}: sequence {i} writes token {int(last[i])}, past its block_table row "
                                 f"({max_pages} pages of {s} tokens)")
            if per_seq[i][3]:
                c = int(bad_page[i].nonzero()[0, 0])
                raise ValueError(f"{who}: block_table[{i}, {c}] = {int(block_table[i, c])} is not a page of this "
                                 f"cache ({npages} pages)")
            if per_seq[i][4]:
                j = int((dup & (seq == i)).nonzero()[0, 0])
                p, t = int(page[j]), int(pos[j])
                raise ValueError(f"{who}: page {p} slot {t % s} is written by sequences {int(first_writer[j])} and "
                                 f"{i} (token {t}) in one call: block_table rows share a page")
        # a continuing sequence that opens a page copies the statistics of the page of token start - 1, which no
        # other sequence may open (write slot 0 of) in the same call
        if max_pages == 0:  # nothing is written (a non-empty chunk failed the row check above)
            return
        opens_page = act & (st > 0) & ((last // s) > ((st - 1) // s))
        src_col = ((st - 1).clamp_min(0) // s).clamp_max(max_pages - 1)  # in range for the sequences that matter
        src = block_table.gather(1, src_col[:, None])[:, 0].long()
        opened = pos % s == 0
        opened_pages, opener = page[opened], seq[opened]
        clash = opens_page[:, None] & (src[:, None] == opened_pages[None, :]) & (opener[None, :] != seqs[:, None])
        if clash.any():  # sync 2
            i, j = (int(x) for x in clash.nonzero()[0])
            raise ValueError(f"{who}: sequence {i} continues from page {int(src[i])}, which sequence "
                             f"{int(opener[j])} opens in the same call")

    def _positions(self, block_table, start, lengths, max_len, who):
        """(position, sequence, token index) of every token to write, checked (plain cache)."""
        if ((lengths < 0) | (lengths > max_len)).any() or (start < 0).any():
            raise ValueError(f"{who}: lengths must be in [0, {max_len}] and start >= 0")
        seq = torch.repeat_interleave(torch.arange(len(lengths), device=self.device), lengths.long())
        first = torch.cumsum(lengths.long(), 0) - lengths.long()
        tok = torch.arange(len(seq), device=self.device) - first[seq]
        pos = start.long()[seq] + tok
        if len(pos) and (pos // self.page_size >= block_table.shape[1]).any():
            raise ValueError(f"{who}: a sequence writes past its block_table row")
        pages = block_table[seq, pos // self.page_size] if len(pos) else block_table.new_empty(0)
        if ((pages < 0) | (pages >= self.num_pages)).any():
            raise ValueError(f"{who}: block_table holds page ids outside [0, {self.num_pages})")
        slots = pages.long() * self.page_size + pos % self.page_size
        if len(slots) and torch.unique(slots).numel() != len(slots):
            raise ValueError(f"{who}: two sequences write one slot in one call (block_table rows share a page)")
        return pos, seq, tok


def _check_window(window, who: str) -> tuple[int, int]:
    if window is None:
        return -1, -1
    if not (isinstance(window, (tuple, list)) and len(window) == 2
            and all(isinstance(w, int) and not isinstance(w, bool) for w in window)):
        raise TypeError(f"{who}: window must be None or a (left, right) pair of ints, got {window!r}")
    left, right = window
    return (left if left >= 0 else -1), (right if right >= 0 else -1)


def sage_decode(q: torch.Tensor, cache: Union[PagedKVCache, torch.Tensor], block_table: torch.Tensor,
                cache_seqlens: Optional[torch.Tensor] = None, *, scale: Optional[float] = None,
                window: Optional[tuple[int, int]] = None, return_lse: bool = False,
                num_workers: Optional[int] = None):
    """Attention of ``q [B, Lq, Hq, D]`` (``Lq <= 16``: the last Lq tokens of each sequence, already appended
    to the cache) over ``cache_seqlens[b]`` cached tokens of sequence ``b``, bottom-right causal: query ``i``
    sees keys ``j <= seqlen - Lq + i``. GQA: ``Hq`` a multiple of the cache's heads. ``window=(left, right)``:
    FlashAttention's sliding window (a negative side is unbounded). ``scale`` defaults to ``1/sqrt(D)``. A query
    that sees no key (a sequence of length 0) gives 0 (LSE ``-inf``). Returns ``out [B, Lq, Hq, D]`` in q's
    dtype (and ``lse float32 [B, Hq, Lq]`` with ``return_lse=True``).

    ``num_workers`` (quantized cache): split-KV as the CUDA kernels run it, the key tiles of the whole call
    shared out in equal chunks over that many work items (one per SM slot), each chunk's softmax merged by its
    LSE; 0 walks each sequence in one pass. ``None`` (the default): one pass on CPU; on CUDA the planner's choice
    for the device's SM count (csrc/attention/decode_cuda_layout.h, ``decode_auto_workers``). The result differs
    from the one-pass walk by the rounding of P~ to e4m3 against each chunk's running max, and fp32 rounding of
    the merge.

    On CUDA the sequence lengths and the block-table entries they reach are checked here (one host sync) before
    the kernels run.

    **Plain-tensor form** ``sage_decode(q, k, v, cache_seqlens)``: an unpaged float16/bfloat16 cache ``k``/``v
    [B, Lk, Hkv, D]`` of which sequence ``b`` uses tokens ``0 .. cache_seqlens[b] - 1`` (the rest may hold
    anything, NaN included: it is never read). Same semantics (bottom-right causal, GQA, window, LSE) and any
    ``Lq``; it runs the prefill kernels' numerics (quantized per call, as SageAttention's own decode does) in one
    :func:`tersor.attention.sage_attention_varlen` call over the used tokens, gathered first (a copy of them).
    ``num_workers`` does not apply."""
    if isinstance(cache, torch.Tensor):
        if num_workers is not None:
            raise ValueError("sage_decode: num_workers applies to a PagedKVCache, not to plain k / v tensors")
        return _decode_tensors(q, cache, block_table, cache_seqlens, scale, window, return_lse)
    who = "sage_decode"
    if not isinstance(cache, PagedKVCache):
        raise TypeError(f"{who}: cache must be a PagedKVCache, got {type(cache).__name__}")
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"{who}: q must be a tensor, got {type(q).__name__}")
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"{who}: q must be float16 or bfloat16, got {q.dtype}")
    if q.dim() != 4 or q.shape[3] != cache.head_dim:
        raise ValueError(f"{who}: q must be [batch, len_q, heads_q, {cache.head_dim}], got {list(q.shape)}")
    b, lq, hq, d = q.shape
    if not 1 <= lq <= ops.DECODE_MAX_Q:
        raise ValueError(f"{who}: len_q must be in [1, {ops.DECODE_MAX_Q}], got {lq}")
    if hq % cache.num_kv_heads:
        raise ValueError(f"{who}: heads_q ({hq}) must be a multiple of the cache's heads_kv ({cache.num_kv_heads})")
    if q.device != cache.device:
        raise ValueError(f"{who}: q is on {q.device}, the cache on {cache.device}")
    block_table = _as_int32("block_table", block_table, cache.device, b, 2, who)
    seqlens = _as_int32("cache_seqlens", cache_seqlens, cache.device, b, 1, who)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"{who}: scale must be finite and positive, got {scale}")
    left, right = _check_window(window, who)
    if num_workers is not None and (isinstance(num_workers, bool) or not isinstance(num_workers, int)
                                    or num_workers < 0):
        raise ValueError(f"{who}: num_workers must be None or an int >= 0, got {num_workers!r}")
    if cache.quantized:
        if q.device.type == "cuda":
            _check_decode_indices(block_table, seqlens, cache, who)
            workers = -1 if num_workers is None else num_workers
        else:
            workers = 0 if num_workers is None else num_workers
        out, lse = ops.sage_decode_paged(q.contiguous(), cache.k_codes, cache.k_scale, cache.v_codes,
                                         cache.page_meta, block_table, seqlens, scale, left, right, workers)
    else:
        out, lse = _plain_decode(q, cache, block_table, seqlens, scale, left, right, who)
    return (out, lse) if return_lse else out


def _check_decode_indices(block_table: torch.Tensor, seqlens: torch.Tensor, cache: PagedKVCache, who: str) -> None:
    """The op's data checks on a device the C++ glue cannot read without a sync, with the CPU twin's messages and
    order (sequence by sequence: its length against the block table, then the page ids that length reaches;
    csrc/attention/paged_glue.h, check_decode_indices). One sync when all is well; any device (tested on the
    CPU against the twin)."""
    s, max_pages = cache.page_size, block_table.shape[1]
    bad_len = (seqlens < 0) | (seqlens > max_pages * s)
    used = torch.arange(max_pages, device=block_table.device)[None, :] < ((seqlens.long() + s - 1) // s)[:, None]
    bad_page = (used & ~bad_len[:, None]) & ((block_table < 0) | (block_table >= cache.num_pages))
    per_seq = torch.stack([bad_len, bad_page.any(1)], 1).tolist()  # the one sync
    for i, (len_bad, page_bad) in enumerate(per_seq):
        if len_bad:
            raise ValueError(f"{who}: seqlens[{i}] = {int(seqlens[i])} is outside [0, {max_pages * s}] (block_table "
                             f"has {max_pages} pages of {s} tokens per sequence)")
        if page_bad:
            c = int(bad_page[i].nonzero()[0, 0])
            raise ValueError(f"{who}: block_table[{i}, {c}] = {int(block_table[i, c])} is not a page of this cache "
                             f"({cache.num_pages} pages)")


def visible_key_mask(len_q: int, seqlen: int, left: int = -1, right: int = -1,
                     device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """bool ``[len_q, seqlen]``: which keys each decode query sees (csrc/attention/paged_format.h,
    ``decode_visible_keys``)."""
    p = torch.arange(len_q, device=device)[:, None] + (seqlen - len_q)
    j = torch.arange(seqlen, device=device)[None, :]
    m = j <= p
    if left >= 0:
        m &= j >= p - left
    if right >= 0:
        m &= j <= p + right
    return m


def _plain_decode(q, cache, block_table, seqlens, scale, left, right, who):
    b, lq, hq, d = q.shape
    s, group = cache.page_size, hq // cache.num_kv_heads
    if ((seqlens < 0) | (seqlens > block_table.shape[1] * s)).any():
        raise ValueError(f"{who}: cache_seqlens must be in [0, {block_table.shape[1] * s}]")
    out = torch.zeros(b, lq, hq, d, dtype=torch.float32, device=q.device)
    lse = torch.full((b, hq, lq), float("-inf"), dtype=torch.float32, device=q.device)
    for i in range(b):
        n = int(seqlens[i])
        if n == 0:
            continue
        pages = block_table[i, : (n + s - 1) // s].long()
        if ((pages < 0) | (pages >= cache.num_pages)).any():
            raise ValueError(f"{who}: block_table row {i} holds page ids outside [0, {cache.num_pages})")
        k = cache.k[pages].transpose(0, 1).reshape(cache.num_kv_heads, -1, d)[:, :n].float()
        v = cache.v[pages].transpose(0, 1).reshape(cache.num_kv_heads, -1, d)[:, :n].float()
        k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
        sc = torch.einsum("qhd,hkd->hqk", q[i].float(), k) * scale
        mask = visible_key_mask(lq, n, left, right, q.device)
        sc = sc.masked_fill(~mask, float("-inf"))
        row_lse = torch.logsumexp(sc, -1)
        p = torch.where(mask, torch.exp(sc - row_lse[..., None].clamp_min(-1e30)), torch.zeros_like(sc))
        out[i] = torch.einsum("hqk,hkd->qhd", p, v)
        lse[i] = row_lse
    return out.to(q.dtype), lse


def _decode_tensors(q, k, v, cache_seqlens, scale, window, return_lse):
    """sage_decode(q, k, v, cache_seqlens): the used tokens gathered and packed, one varlen call."""
    from .varlen import sage_attention_varlen

    who = "sage_decode"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{who}: {name} must be a tensor, got {type(t).__name__}")
        if t.dtype not in (torch.float16, torch.bfloat16):
            raise TypeError(f"{who}: {name} must be float16 or bfloat16, got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{who}: {name} must be 4-d ([B, L, H, D]), got {list(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{who}: q, k, v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"{who}: k {list(k.shape)} and v {list(v.shape)} must have one shape")
    b, lq, hq, d = q.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"{who}: k / v must be [{b}, Lk, Hkv, {d}] for q {list(q.shape)}, got {list(k.shape)}")
    if hq % k.shape[2]:
        raise ValueError(f"{who}: heads_q ({hq}) must be a multiple of heads_kv ({k.shape[2]})")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{who}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if cache_seqlens is None:
        raise TypeError(f"{who}: the plain-tensor form is sage_decode(q, k, v, cache_seqlens)")
    seqlens = _as_int32("cache_seqlens", cache_seqlens, q.device, b, 1, who).long()
    lk = k.shape[1]
    lens = seqlens.tolist()  # the packing needs them on the host (a sync on CUDA)
    if any(n < 0 or n > lk for n in lens):
        raise ValueError(f"{who}: cache_seqlens must be in [0, {lk}] (the cache's length), got {lens[:8]}")
    used = torch.arange(lk, device=q.device)[None, :] < seqlens[:, None]  # [B, Lk]
    kp, vp = k[used], v[used]  # [total, Hkv, D], sequence by sequence
    cu_k = torch.zeros(b + 1, dtype=torch.int32, device=q.device)
    cu_k[1:] = torch.cumsum(seqlens, 0)
    cu_q = torch.arange(0, (b + 1) * lq, lq, dtype=torch.int32, device=q.device)
    out, lse = sage_attention_varlen(q.reshape(b * lq, hq, d), kp, vp, cu_q, cu_k, lq, max(max(lens), 1),
                                     is_causal=True, scale=scale, window=window, return_lse=True)
    out = out.view(b, lq, hq, d)
    lse = lse.view(hq, b, lq).permute(1, 0, 2).contiguous()
    return (out, lse) if return_lse else out
