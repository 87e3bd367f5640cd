"""Variable-length prefill: :func:`sage_attention_varlen` (FlashAttention's varlen API).

One op call (one kernel launch on CUDA) for the whole batch: :func:`tersor.ops.sage_attention_varlen_fwd` runs the
packed tensors as one sequence in which a row sees only its own sequence's keys, so the kernels walk exactly each
sequence's key tiles (no padding waste) with no per-sequence launches. With per-sequence block masks it calls
:func:`tersor.attention.sage_attention` once per sequence instead.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["sage_attention_varlen"]


def _cu(name: str, t, total: int, device: torch.device) -> list[int]:
    who = "sage_attention_varlen"
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{who}: {name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{who}: {name} must be int32 or int64, got {t.dtype}")
    if t.dim() != 1 or t.numel() < 2:
        raise ValueError(f"{who}: {name} must be [batch + 1], got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{who}: {name} is on {t.device}, q on {device}")
    cu = t.tolist()  # the boundaries drive one call per sequence: read once (a device sync on CUDA)
    if cu[0] != 0 or cu[-1] != total or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"{who}: {name} must rise from 0 to {total} (the packed length), got {cu[:8]}"
                         f"{'...' if len(cu) > 8 else ''}")
    return cu


def sage_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                          cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *,
                          is_causal: bool = False, scale: Optional[float] = None,
                          window: Optional[tuple[int, int]] = None, qk: str = "auto", pv: str = "auto",
                          return_lse: bool = False, block_mask=None):
    """Attention over a packed batch: ``q [total_q, Hq, D]``, ``k``/``v [total_k, Hkv, D]``; sequence ``b``
    is rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` of q and ``cu_seqlens_k[b]:cu_seqlens_k[b+1]`` of k/v.
    ``is_causal`` is bottom-right aligned per sequence. ``max_seqlen_q``/``max_seqlen_k`` bound the lengths
    (FlashAttention's API; checked). Modes as :func:`tersor.attention.sage_attention`. Numerics: those of
    ``sage_attention`` on the packed tensors as one sequence with a block-diagonal mask (K smoothing over all the
    packed keys, quantization groups of the packed rows), so not bit for bit those of a call per sequence. The
    offsets are read on the host once to check them (a device sync on CUDA).
    A sequence with queries and no keys gives 0 (LSE ``-inf``). Returns ``out [total_q, Hq, D]`` (and ``lse``
    float32 ``[Hq, total_q]``, FlashAttention's varlen layout, with ``return_lse=True``). ``window=(left,
    right)``: FlashAttention's sliding window, bottom-right aligned per sequence (as
    :func:`tersor.attention.sage_attention`'s). ``block_mask`` (block-sparse, issue 16): a list with one entry per sequence, ``None``
    (dense) or that sequence's :func:`tersor.attention.sage_attention` mask without the batch dim, bool
    ``[Hq or 1, ceil(Lq_b / 128), ceil(Lk_b / 128)]``."""
    from . import sage_attention

    who = "sage_attention_varlen"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{who}: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{who}: {name} must be packed 3-d [total, heads, head_dim], got {list(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"{who}: k {list(k.shape)} and v {list(v.shape)} must have one shape")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{who}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    from .paged import _check_window

    _check_window(window, who)
    cq = _cu("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    ck = _cu("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
    if len(cq) != len(ck):
        raise ValueError(f"{who}: cu_seqlens_q has {len(cq) - 1} sequences, cu_seqlens_k {len(ck) - 1}")
    lens_q = [b - a for a, b in zip(cq, cq[1:])]
    lens_k = [b - a for a, b in zip(ck, ck[1:])]
    if max(lens_q) > max_seqlen_q or max(lens_k) > max_seqlen_k:
        raise ValueError(f"{who}: max_seqlen_q / max_seqlen_k ({max_seqlen_q}, {max_seqlen_k}) are below the "
                         f"longest sequences ({max(lens_q)}, {max(lens_k)})")
    if block_mask is not None and (not isinstance(block_mask, (list, tuple)) or len(block_mask) != len(lens_q)):
        raise TypeError(f"{who}: block_mask must be a list of {len(lens_q)} per-sequence masks (or None), got "
                        f"{type(block_mask).__name__}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if block_mask is None:
        return _fused(q, k, v, cu_seqlens_q, cu_seqlens_k, is_causal, scale, window, qk, pv, return_lse)
    out = q.new_zeros(q.shape)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    for b in range(len(lens_q)):
        if lens_q[b] == 0 or lens_k[b] == 0:
            continue  # no queries, or queries that see no key: 0 and -inf
        mask = None if block_mask is None or block_mask[b] is None else block_mask[b]
        if mask is not None:
            if not isinstance(mask, torch.Tensor):
                raise TypeError(f"{who}: block_mask[{b}] must be a bool tensor, got {type(mask).__name__}")
            if mask.dim() != 3:
                raise ValueError(f"{who}: block_mask[{b}] must be 3-d [Hq or 1, q_blocks, k_blocks], got "
                                 f"{list(mask.shape)}")
            mask = mask[None]
        o, l = sage_attention(q[cq[b]:cq[b + 1]][None], k[ck[b]:ck[b + 1]][None], v[ck[b]:ck[b + 1]][None],
                              is_causal=is_causal, scale=scale, layout="bshd", qk=qk, pv=pv, return_lse=True,
                              block_mask=mask, window=window)
        out[cq[b]:cq[b + 1]] = o[0]
        lse[:, cq[b]:cq[b + 1]] = l[0]
    return (out, lse) if return_lse else out


def _fused(q, k, v, cu_q, cu_k, is_causal, scale, window, qk, pv, return_lse):
    from .. import ops
    from . import _modes_for, _pad_head_dim
    from .paged import _check_window

    who = "sage_attention_varlen"
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{who}: q, k, v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    qk_bits, pv_mode = _modes_for(q, qk, pv, who)
    d = q.shape[-1]
    if k.shape[-1] != d:
        raise ValueError(f"{who}: q, k, v must share the head dim, got {d}, {k.shape[-1]}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{who}: query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    left, right = _check_window(window, who)
    if k.shape[0] == 0:  # no keys at all: every query sees nothing
        out = q.new_zeros(q.shape)
        lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
        return (out, lse) if return_lse else out
    (q, k, v), dp = _pad_head_dim((q, k, v), q.device)
    out, lse = ops.sage_attention_varlen_fwd(q, k, v, cu_q, cu_k, bool(is_causal), float(scale), qk_bits, pv_mode,
                                             True, qk_bits == 4, "auto", left, right)
    if dp != d:
        out = out[..., :d]
    return (out, lse) if return_lse else out
