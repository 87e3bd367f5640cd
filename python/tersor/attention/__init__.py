"""Quantized attention (SageAttention2 numerics) as a drop-in for ``F.scaled_dot_product_attention``.

* :func:`sage_attention` -- the user entry point (layouts, head-dim padding, per-device defaults).
* :func:`route_sdpa` -- a context manager that sends a model's SDPA calls to :func:`sage_attention` where
  that is supported and to SDPA otherwise, counting both (:class:`SdpaRouteStats`).
* :func:`sageattn` -- SageAttention's public signature (``tensor_layout="HND"|"NHD"``, ``sm_scale``, ...).
* :mod:`tersor.attention.hf` -- ``attn_implementation="tersor_sage"`` for transformers models
  (:func:`register_transformers`).

Numerics, defaults and what differs from thu-ml/SageAttention: docs/research/sage_attention.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections import Counter
from typing import Optional

import torch
import torch.nn.functional as F

from .. import ops

__all__ = ["BLOCK_K", "BLOCK_Q", "PagedKVCache", "SdpaRouteStats", "block_mask_shape", "pick_modes",
           "register_transformers", "route_sdpa", "sage_attention", "sage_attention_varlen", "sage_decode",
           "sage_supported", "sageattn", "sparse_sage_attention", "xattention_mask"]

#: Block-sparse granularity of :func:`sage_attention`'s ``block_mask`` (fixed; not an argument): one mask entry
#: covers ``BLOCK_Q`` query rows by ``BLOCK_K`` keys. They are the kernels' tiles -- 128 query rows are one CTA of
#: every kernel, 128 keys two 64-key tiles of the sm80/sm89 kernel or one stage of the sm90a kernel -- so a
#: masked block is skipped whole (no loads, no MMA).
BLOCK_Q = ops.SAGE_BLOCK_Q
BLOCK_K = ops.SAGE_BLOCK_K

_QK_BITS = {"int8": 8, "int4": 4, "none": 0}
# The CUDA kernels (mma.sync for sm80/sm89, also built for sm90a, and the sm90a wgmma kernel) are compiled
# but have not yet run on a GPU: until a GPU session has passed tests/test_attention.py's CUDA tests,
# route_sdpa keeps CUDA calls on SDPA and the benchmark skips CUDA rows. Direct sage_attention calls on CUDA
# do use them; a mode without a kernel on the device raises NotImplementedError (see cuda_path_name).
CUDA_KERNELS_READY = False
_SDPA = F.scaled_dot_product_attention  # the original, kept even while route_sdpa patches F


def _has_kernel(device: torch.device) -> bool:
    return _KERNEL_FOR.get(device.type, False)


# Which device types this build has sage_attention_fwd kernels for: a fact of the build, fixed for the process,
# so it is read once at import (tersor._C is loaded by then). A plain dict keeps it a constant to torch.compile
# (the dispatcher query returns a bool dynamo cannot put in a graph; torch.compiler.assume_constant_result
# would do too, but importing it imports torch._dynamo, seconds on every `import tersor`).
_KERNEL_FOR = {t: torch._C._dispatch_has_kernel_for_dispatch_key("tersor::sage_attention_fwd", key)
               for t, key in (("cpu", "CPU"), ("cuda", "CUDA"))}


def cuda_path_name(device: torch.device, qk: str = "int8", pv: str = "fp8", smooth_q: bool = False,
                   kernel: str = "auto") -> str:
    """Names the implementation ``sage_attention_fwd`` runs for these (resolved) modes on ``device``:
    ``"cpu-twin"`` on the CPU; on CUDA what this build's routing table (csrc/attention/sage_route.h, through
    :func:`tersor.ops.sage_route`) says for the device's compute capability and ``kernel``: ``"sm8x-mma"``
    (mma.sync kernels) or ``"sm90a-wgmma"`` (INT8 + FP8 without Q smoothing on compute capability 9.0, unless
    ``kernel="sm8x"``). Raises ``NotImplementedError`` where the call would (no CUDA kernel for the mode on
    this device; the message names the supported modes). For benchmark rows and tests."""
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu-twin"
    if qk not in _QK_BITS:
        raise ValueError(f"sage_attention: qk must be 'int8', 'int4' or 'none', got {qk!r}")
    major, minor = torch.cuda.get_device_capability(device)
    return ops.sage_route(10 * major + minor, _QK_BITS[qk], pv, smooth_q, kernel)


def pick_modes(device: torch.device, qk: str = "auto", pv: str = "auto") -> tuple[str, str]:
    """Resolves ``"auto"`` to the modes :func:`sage_attention` uses on ``device``.

    sm90: int8 + fp8 (Hopper has no INT4 tensor cores). sm89: int8 + fp8 (INT4 is available with
    ``qk="int4"`` but misses the accuracy target, see the research note). sm80-sm88: int8 + fp16 (no FP8
    tensor cores). CPU: int8 + fp8 -- the CPU twin then reproduces the sm89/sm90 default numerics.
    """
    if qk not in ("auto", "int8", "int4", "none"):
        raise ValueError(f"sage_attention: qk must be 'auto', 'int8', 'int4' or 'none', got {qk!r}")
    if pv not in ("auto", "fp8", "fp16", "fp32"):
        raise ValueError(f"sage_attention: pv must be 'auto', 'fp8', 'fp16' or 'fp32', got {pv!r}")
    auto_pv = "fp8"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            auto_pv = "fp16"
    return ("int8" if qk == "auto" else qk), (auto_pv if pv == "auto" else pv)


def block_mask_shape(batch: int, heads: int, len_q: int, len_k: int) -> tuple[int, int, int, int]:
    """The shape of a :func:`sage_attention` ``block_mask``: ``(batch, heads, ceil(len_q / BLOCK_Q),
    ceil(len_k / BLOCK_K))`` (``heads`` is ``Hq``, or 1 for one mask shared by every head)."""
    return (batch, heads, -(-len_q // BLOCK_Q), -(-len_k // BLOCK_K))


def _check_block_mask(block_mask, q: torch.Tensor, len_k: int) -> None:
    b, hq, lq = q.shape[0], q.shape[1], q.shape[2]
    if not isinstance(block_mask, torch.Tensor):
        raise TypeError(f"sage_attention: block_mask must be a bool tensor, got {type(block_mask).__name__}")
    if block_mask.dtype != torch.bool:
        raise TypeError(f"sage_attention: block_mask must be bool, got {block_mask.dtype}")
    want = block_mask_shape(b, hq, lq, len_k)
    if block_mask.dim() != 4 or block_mask.shape[0] != b or block_mask.shape[1] not in (1, hq) or \
            tuple(block_mask.shape[2:]) != want[2:]:
        raise ValueError(f"sage_attention: block_mask must be [{b}, {hq} or 1, {want[2]}, {want[3]}] "
                         f"([B, Hq or 1, ceil(Lq / {BLOCK_Q}), ceil(Lk / {BLOCK_K})]), got {list(block_mask.shape)}")
    if block_mask.device != q.device:
        raise ValueError(f"sage_attention: block_mask must be on {q.device}, got {block_mask.device}")


#: The largest head dim of the CUDA kernels (256, Gemma's, runs on the CPU twin only: csrc/attention/
#: sage_cuda_glue.cpp has the register budget that rules it out of the current kernels).
CUDA_MAX_HEAD_DIM = 128


def _check_key_padding_mask(mask, q: torch.Tensor, len_k: int) -> None:
    # q is bhsd here
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"sage_attention: key_padding_mask must be a bool tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"sage_attention: key_padding_mask must be bool (True = a real key), got {mask.dtype}")
    if tuple(mask.shape) != (q.shape[0], len_k):
        raise ValueError(f"sage_attention: key_padding_mask must be [{q.shape[0]}, {len_k}] ([B, Lk]), got "
                         f"{list(mask.shape)}")
    if mask.device != q.device:
        raise ValueError(f"sage_attention: key_padding_mask must be on {q.device}, got {mask.device}")


def _check_attn_mask(mask, q: torch.Tensor, len_k: int) -> torch.Tensor:
    # q is bhsd here. Returns the mask expanded to 4-d [B or 1, Hq or 1, Lq, Lk] (a view).
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"sage_attention: attn_mask must be a tensor, got {type(mask).__name__}")
    if mask.dtype not in (torch.bool, torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"sage_attention: attn_mask must be bool or float32/float16/bfloat16, got {mask.dtype}")
    if mask.device != q.device:
        raise ValueError(f"sage_attention: attn_mask must be on {q.device}, got {mask.device}")
    b, h, lq = q.shape[:3]
    if mask.dim() > 4:
        raise ValueError(f"sage_attention: attn_mask must broadcast to [{b}, {h}, {lq}, {len_k}], got {list(mask.shape)}")
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    bm = m.shape[0] if m.shape[0] in (1, b) else None
    hm = m.shape[1] if m.shape[1] in (1, h) else None
    if bm is None or hm is None or m.shape[2] not in (1, lq) or m.shape[3] not in (1, len_k):
        raise ValueError(f"sage_attention: attn_mask must broadcast to [{b}, {h}, {lq}, {len_k}], got {list(mask.shape)}")
    return m.expand(bm, hm, lq, len_k)


def _sdpa_masked(q, k, v, is_causal, scale, window, key_padding_mask, attn_mask, block_mask):
    # sage_attention(..., sdpa_fallback=True) with a general mask on a device without a masked kernel: every mask
    # folded into one additive float mask (bottom-right causal and window as sage_attention defines them), SDPA in
    # the inputs' dtype; rows with no visible key give 0 (SDPA would give NaN).
    lq, lk = q.shape[2], k.shape[2]
    rows = torch.arange(lq, device=q.device)[:, None] + (lk - lq)
    keys = torch.arange(lk, device=q.device)[None, :]
    vis = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
    if is_causal:
        vis &= keys <= rows
    if window[0] >= 0:
        vis &= keys >= rows - window[0]
    if window[1] >= 0:
        vis &= keys <= rows + window[1]
    vis = vis[None, None]
    if key_padding_mask is not None:
        vis = vis & key_padding_mask[:, None, None, :]
    if block_mask is not None:
        vis = vis & block_mask.repeat_interleave(BLOCK_Q, 2)[:, :, :lq].repeat_interleave(BLOCK_K, 3)[..., :lk]
    if attn_mask.dtype == torch.bool:
        vis = vis & attn_mask
        bias = None
    else:
        bias = attn_mask.to(torch.float32)
    add = torch.zeros(vis.shape, dtype=torch.float32, device=q.device).masked_fill(~vis, float("-inf"))
    if bias is not None:
        add = add + bias
    dead = torch.isneginf(add).all(-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=add.to(q.dtype), scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return out.masked_fill(dead, 0)


def _modes_for(q: torch.Tensor, qk: str, pv: str, who: str) -> tuple[int, str]:
    """(qk_bits, pv mode) of ``qk`` / ``pv`` on q's device (:func:`pick_modes`); TypeError unless q is float16 or
    bfloat16 (float32 only in the exact mode qk="none", pv="fp32")."""
    qk_mode, pv_mode = pick_modes(q.device, qk, pv)
    qk_bits = _QK_BITS[qk_mode]
    if q.dtype not in (torch.float16, torch.bfloat16) and not (qk_bits == 0 and pv_mode == "fp32"):
        raise TypeError(f"{who}: expected float16 or bfloat16 inputs, got {q.dtype}")
    return qk_bits, pv_mode


def _pad_head_dim(tensors, device: torch.device):
    """``(tensors with the head dim zero-padded to the kernels' size, that size)`` (:func:`_padded_head_dim`)."""
    d = tensors[0].shape[-1]
    dp = _padded_head_dim(d, device)
    return (tuple(F.pad(t, (0, dp - d)) for t in tensors) if dp != d else tuple(tensors)), dp


def _padded_head_dim(d: int, device: torch.device) -> int:
    if d < 1 or d > 256:
        raise ValueError(f"sage_attention: head_dim must be between 1 and 256, got {d}")
    if d > CUDA_MAX_HEAD_DIM and device.type == "cuda":
        raise NotImplementedError(f"sage_attention: head_dim {d} has no CUDA kernel yet (the CUDA kernels take "
                                  f"head dims up to {CUDA_MAX_HEAD_DIM}; up to 256 runs on the CPU)")
    return 64 if d <= 64 else 128 if d <= 128 else 256


def sage_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool = False,
                   scale: Optional[float] = None, layout: str = "bhsd", qk: str = "auto", pv: str = "auto",
                   smooth_k: bool = True, smooth_q: Optional[bool] = None, return_lse: bool = False,
                   kernel: str = "auto", block_mask: Optional[torch.Tensor] = None,
                   window: Optional[tuple[int, int]] = None, key_padding_mask: Optional[torch.Tensor] = None,
                   attn_mask: Optional[torch.Tensor] = None, sdpa_fallback: bool = False):
    """Quantized attention with SageAttention2 numerics; output like ``F.scaled_dot_product_attention``.

    ``q [B, Hq, Lq, D]`` and ``k``/``v [B, Hkv, Lk, D]`` (``layout="bhsd"``) or ``[B, L, H, D]``
    (``layout="bshd"``), float16/bfloat16, ``Hq % Hkv == 0`` (GQA/MQA), ``D <= 256`` (padded with zeros to
    64, 128 or 256, which changes nothing mathematically; the CUDA kernels take ``D <= 128``, 256 runs on the
    CPU twin and raises NotImplementedError on CUDA). ``scale`` defaults to ``1/sqrt(D)`` of the unpadded
    ``D``. ``is_causal`` is **bottom-right aligned** (query ``i`` sees keys ``j <= i + Lk - Lq``, the
    FlashAttention / KV-cache convention); SDPA's ``is_causal`` is top-left. They agree when ``Lq == Lk``.
    Fully masked rows (``Lq > Lk``, causal) give 0 and LSE ``-inf``.

    ``qk``: ``"int8"``, ``"int4"`` (per-fragment-group symmetric quantization; INT4 also smooths Q) or
    ``"none"``; ``pv``: ``"fp8"``, ``"fp16"`` or ``"fp32"``; ``"auto"`` picks per device
    (:func:`pick_modes`). ``qk="none", pv="fp32"`` is the exact fp64 reference mode. ``smooth_k``
    subtracts K's mean over tokens (exact for the softmax; the LSE is corrected). ``smooth_q`` defaults to
    True for INT4 only. Returns ``out`` in the layout and dtype of ``q``, and ``lse`` float32 ``[B, Hq, Lq]``
    (natural log) when ``return_lse``.

    ``kernel`` chooses the CUDA kernel (ignored on the CPU, whose twin reproduces every kernel's numerics):
    ``"auto"`` (the sm90a wgmma kernel where it applies, else the mma.sync kernels), ``"sm8x"`` (the mma.sync
    kernels only) or ``"sm90"`` (the wgmma kernel only: compute capability 9.0, int8 + fp8, no Q smoothing).
    On CUDA a mode without a kernel on the device raises ``NotImplementedError`` naming the supported modes
    (:func:`cuda_path_name`): ``qk="none"`` and ``pv="fp32"`` (so the exact mode) run on the CPU only, INT4 has
    no kernel on compute capability 9.0+ and FP8 P.V none before 8.9. There is no silent CPU fallback.

    ``block_mask`` (block-sparse attention): bool ``[B, Hq or 1, ceil(Lq / BLOCK_Q), ceil(Lk / BLOCK_K)]``
    (:func:`block_mask_shape`; ``BLOCK_Q = BLOCK_K = 128``, fixed constants of this module). Where it is false,
    no query of the block sees any key of the block (as an additive ``-inf`` mask); the kernels skip such tiles
    entirely and the CPU twin skips the same tiles, so an all-true mask gives the dense result bit for bit. It
    composes with ``is_causal`` (a key must pass both) and GQA (the mask is per query head, or shared). A row left
    with no visible key gives 0 and LSE ``-inf``. :func:`xattention_mask` computes such a mask.

    ``window=(left, right)``: FlashAttention's sliding window, bottom-right aligned like ``is_causal``: query
    ``i`` (at key position ``p = i + Lk - Lq``) sees keys ``p - left .. p + right``; a negative side is
    unbounded, so ``window=(W - 1, 0)`` (or ``is_causal=True, window=(W - 1, -1)``) is a causal sliding window of
    ``W`` keys (Mistral's ``sliding_window=W``). It composes with ``is_causal`` and ``block_mask``. Every kernel
    takes it, and walks only the key tiles a CTA's rows reach (the cost grows with ``W``, not with ``Lk``).

    ``key_padding_mask`` (padded batches): bool ``[B, Lk]``, **True for a real key, False for padding**
    (transformers' ``attention_mask`` convention; ``nn.MultiheadAttention``'s ``key_padding_mask`` is the
    opposite). A padded key is hidden from every query of its batch entry, in every kernel; it composes with
    ``is_causal``, ``window`` and ``block_mask``, and a row left with no key gives 0 and LSE ``-inf``. Padded
    keys still enter K's smoothing mean and quantization scales (exact for the softmax; they must be finite).

    ``attn_mask``: any other mask, as SDPA takes it (bool, True = take part, or float added to the scores;
    broadcastable to ``[B, Hq, Lq, Lk]``), composed with everything above. **CPU twin only**: no kernel takes a
    general mask, so on CUDA it raises ``NotImplementedError``, unless ``sdpa_fallback=True``: then the call
    runs ``F.scaled_dot_product_attention`` in the inputs' dtype with every mask above folded into one (no
    quantization; a row with no visible key gives 0 there too; ``return_lse`` is not available).
    """
    if layout not in ("bhsd", "bshd"):
        raise ValueError(f"sage_attention: layout must be 'bhsd' or 'bshd', got {layout!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"sage_attention: {name} must be 4-d ({layout}), got {t.dim()}-d")
    if not (q.device == k.device == v.device):
        raise ValueError(f"sage_attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not _has_kernel(q.device):
        raise NotImplementedError(f"sage_attention: no kernel for device {q.device} in this build; use "
                                  f"F.scaled_dot_product_attention or route_sdpa")
    qk_bits, pv_mode = _modes_for(q, qk, pv, "sage_attention")
    if layout == "bshd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if block_mask is not None:
        _check_block_mask(block_mask, q, k.shape[2])
    left, right = _check_window(window, "sage_attention")
    if key_padding_mask is not None:
        _check_key_padding_mask(key_padding_mask, q, k.shape[2])
    if attn_mask is not None:
        attn_mask = _check_attn_mask(attn_mask, q, k.shape[2])
        if q.device.type != "cpu":
            if not sdpa_fallback:
                raise NotImplementedError(
                    "sage_attention: a general attn_mask runs on the CPU twin only (the kernels take is_causal, "
                    "window, key_padding_mask and block_mask); pass sdpa_fallback=True to run SDPA instead")
            if return_lse:
                raise NotImplementedError("sage_attention: sdpa_fallback=True has no LSE (return_lse=True)")
            out = _sdpa_masked(q, k, v, is_causal, scale, (left, right), key_padding_mask, attn_mask, block_mask)
            return out.transpose(1, 2) if layout == "bshd" else out
    d = q.shape[-1]
    if k.shape[-1] != d or v.shape[-1] != d:
        raise ValueError(f"sage_attention: q, k, v must share the head dim, got {d}, {k.shape[-1]}, {v.shape[-1]}")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    (q, k, v), dp = _pad_head_dim((q, k, v), q.device)
    if smooth_q is None:
        smooth_q = qk_bits == 4
    out, lse = ops.sage_attention_fwd(q, k, v, bool(is_causal), float(scale), qk_bits, pv_mode, bool(smooth_k),
                                      bool(smooth_q), kernel, block_mask, left, right, key_padding_mask, attn_mask)
    if dp != d:
        out = out[..., :d]
    if layout == "bshd":
        out = out.transpose(1, 2)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------------
# Block-sparse attention: XAttention block selection


# Which device types this build has xattention_mask kernels for (read once at import, like _KERNEL_FOR).
_XATTN_KERNEL_FOR = {t: torch._C._dispatch_has_kernel_for_dispatch_key("tersor::xattention_mask", key)
                     for t, key in (("cpu", "CPU"), ("cuda", "CUDA"))}


def _xattn_has_kernel(device: torch.device) -> bool:
    return _XATTN_KERNEL_FOR.get(device.type, False)


def _xattn_qk(qk: str, device: torch.device, block_size: int, stride: int, head_dim: int) -> str:
    if qk not in ("auto", "none", "int8"):
        raise ValueError(f"xattention_mask: qk must be 'auto', 'none' or 'int8', got {qk!r}")
    if qk != "auto":
        return qk
    int8_ok = (block_size // stride) % 8 == 0 and (stride * head_dim) % 32 == 0
    return "int8" if device.type == "cuda" and int8_ok else "none"


def xattention_mask(q: torch.Tensor, k: torch.Tensor, *, block_size: int = BLOCK_K, stride: int = 8,
                    threshold: float = 0.9, is_causal: bool = False, scale: Optional[float] = None,
                    layout: str = "bhsd", return_mass: bool = False, qk: str = "auto"):
    """XAttention's block selection: a bool block mask ``[B, Hq, ceil(Lq / block_size), ceil(Lk / block_size)]``.

    Each block of ``stride`` query rows is scored against each block of ``stride`` keys by the sum of their
    antidiagonal (query rows reversed within the stride, key rows strided: one GEMM over ``stride * D``); the
    scores times ``scale / stride`` go through a softmax over the keys (bottom-right causal if ``is_causal``) and
    are summed per ``block_size`` square. Per query block the mask keeps the fewest, heaviest key blocks whose
    mass reaches ``threshold`` of the row's total, plus the diagonal block (the one aligned with the block's last
    query row) and, when causal, key block 0. A higher threshold keeps a superset; ``threshold=1`` keeps every
    block with any mass. Algorithm and source: docs/research/xattention.md.

    ``q [B, Hq, Lq, D]``, ``k [B, Hkv, Lk, D]`` (``layout="bhsd"``, or ``"bshd"``), ``Hq % Hkv == 0``,
    float16/bfloat16/float32; ``scale`` defaults to ``1/sqrt(D)``; ``block_size`` a multiple of ``stride``. With
    the default ``block_size`` (``BLOCK_K`` = ``BLOCK_Q`` = 128) the mask is :func:`sage_attention`'s
    ``block_mask``. ``return_mass``: also return the float32 block masses (each query block's row sums to its
    number of reduced query rows with a visible key). ``qk``: ``"none"`` (exact scores: fp64 on the CPU, fp32 on
    CUDA), ``"int8"`` (each reduced row of ``stride * D`` values quantized to INT8 with one scale, exact integer
    dot products: the tensor-core path; the CPU computes the same quantized scores), ``"auto"`` (``"int8"`` on
    CUDA where its tiles fit -- ``(block_size / stride) % 8 == 0``, ``(stride * D) % 32 == 0`` -- else
    ``"none"``). The CUDA kernels (**compiled, not yet run on a GPU**) agree with the CPU to float rounding. A
    device without the op raises ``NotImplementedError``.
    """
    if layout not in ("bhsd", "bshd"):
        raise ValueError(f"xattention_mask: layout must be 'bhsd' or 'bshd', got {layout!r}")
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"xattention_mask: {name} must be a 4-d tensor ({layout})")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype:
        raise TypeError(f"xattention_mask: q and k must be float16, bfloat16 or float32 of one dtype, got {q.dtype}, "
                        f"{k.dtype}")
    if q.device != k.device:
        raise ValueError(f"xattention_mask: q and k must be on one device, got {q.device}, {k.device}")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"xattention_mask: stride must be a positive int, got {stride!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < stride or \
            block_size % stride:
        raise ValueError(f"xattention_mask: block_size must be a positive multiple of stride ({stride}), got "
                         f"{block_size!r}")
    if not 0 < threshold <= 1:
        raise ValueError(f"xattention_mask: threshold must be in (0, 1], got {threshold!r}")
    if layout == "bshd":
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1] or q.shape[1] % k.shape[1]:
        raise ValueError(f"xattention_mask: q {list(q.shape)} and k {list(k.shape)} must share batch and head dim, "
                         f"and the query heads must be a multiple of the key heads")
    if k.shape[2] < 1:
        raise ValueError("xattention_mask: needs at least one key")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"xattention_mask: scale must be finite and positive, got {scale}")
    if not _xattn_has_kernel(q.device):
        raise NotImplementedError(f"xattention_mask: no kernel for device {q.device} in this build (CPU only so "
                                  f"far; compute the mask from q.cpu(), k.cpu())")
    qk = _xattn_qk(qk, q.device, block_size, stride, q.shape[-1])
    mask, mass = ops.xattention_mask(q, k, block_size, stride, threshold, is_causal, scale, qk)
    return (mask, mass) if return_mass else mask


def sparse_sage_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, threshold: float, stride: int = 8,
                          is_causal: bool = False, scale: Optional[float] = None, layout: str = "bhsd",
                          qk: str = "auto", pv: str = "auto", smooth_k: bool = True, smooth_q: Optional[bool] = None,
                          return_lse: bool = False, kernel: str = "auto", return_mask: bool = False,
                          score_qk: str = "auto"):
    """Block-sparse quantized attention in one call: :func:`xattention_mask` (``block_size = BLOCK_K``,
    ``stride``, ``threshold``, ``is_causal``, ``scale``) then :func:`sage_attention` with that ``block_mask``.

    The other arguments are :func:`sage_attention`'s. ``threshold`` in (0, 1]: the share of each query block's
    estimated attention mass its kept key blocks must carry (XAttention uses 0.8 to 0.95); 1 keeps every block
    with mass, so the result is dense attention up to blocks the estimate gives no mass at all. Returns what
    :func:`sage_attention` returns, plus the mask last when ``return_mask``. ``score_qk`` is
    :func:`xattention_mask`'s ``qk``.
    """
    mask = xattention_mask(q, k, block_size=BLOCK_K, stride=stride, threshold=threshold, is_causal=is_causal,
                           scale=scale, layout=layout, qk=score_qk)
    res = sage_attention(q, k, v, is_causal=is_causal, scale=scale, layout=layout, qk=qk, pv=pv, smooth_k=smooth_k,
                         smooth_q=smooth_q, return_lse=return_lse, kernel=kernel, block_mask=mask)
    if not return_mask:
        return res
    return (*res, mask) if return_lse else (res, mask)


# ---------------------------------------------------------------------------------------------------
# SDPA routing


@dataclasses.dataclass
class SdpaRouteStats:
    """What :func:`route_sdpa` did: calls sent to sage_attention, and SDPA fallbacks by reason."""

    routed: int = 0
    fell_back: Counter = dataclasses.field(default_factory=Counter)

    @property
    def fallbacks(self) -> int:
        return sum(self.fell_back.values())


def sage_supported(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, enable_gqa=False) -> Optional[str]:
    """``None`` if this SDPA call can run on sage_attention with SDPA's semantics, else the reason it cannot."""
    if attn_mask is not None:
        return "attn_mask"
    if dropout_p != 0.0:
        return "dropout"
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)):
        return "not 4-d"
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {q.dtype}"
    if not (q.device == k.device == v.device) or not _has_kernel(q.device):
        return f"device {q.device}"
    if q.device.type == "cuda" and not CUDA_KERNELS_READY:
        return "CUDA kernels not validated yet"
    max_d = CUDA_MAX_HEAD_DIM if q.device.type == "cuda" else 256
    if q.shape[-1] > max_d or k.shape[-1] != q.shape[-1] or v.shape[-1] != q.shape[-1]:
        return "head dim"
    if q.shape[0] != k.shape[0] or k.shape[:3] != v.shape[:3]:
        return "shape"
    if q.shape[1] != k.shape[1] and not (enable_gqa and q.shape[1] % k.shape[1] == 0):
        return "heads"
    if is_causal and q.shape[2] != k.shape[2]:
        return "causal with Lq != Lk"  # SDPA is top-left aligned, sage_attention bottom-right
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return "autograd"
    return None


@contextlib.contextmanager
def route_sdpa(qk: str = "auto", pv: str = "auto", stats: Optional[SdpaRouteStats] = None):
    """Within the block, ``F.scaled_dot_product_attention`` runs :func:`sage_attention` where supported.

    Supported: no ``attn_mask``, no dropout, fp16/bf16 4-d inputs with head dim <= 128 (<= 256 on the CPU) on a device with a
    kernel, equal heads (or ``enable_gqa``), ``Lq == Lk`` when causal, no autograd. Everything else goes to
    the original SDPA. Yields a :class:`SdpaRouteStats` counting both. Code that bound SDPA to another name
    before the block (``from torch.nn.functional import scaled_dot_product_attention``) is not rerouted.
    """
    stats = SdpaRouteStats() if stats is None else stats

    def routed_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False, **kwargs):
        reason = sage_supported(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
        if reason is None and kwargs:
            reason = "unknown arguments " + ",".join(sorted(kwargs))
        if reason is not None:
            stats.fell_back[reason] += 1
            return _SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                         scale=scale, enable_gqa=enable_gqa, **kwargs)
        stats.routed += 1
        return sage_attention(query, key, value, is_causal=is_causal, scale=scale, qk=qk, pv=pv)

    saved = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = routed_sdpa
    try:
        yield stats
    finally:
        F.scaled_dot_product_attention = saved


from ._sageattn import sageattn  # noqa: E402
from .paged import PagedKVCache, _check_window, sage_decode  # noqa: E402
from .varlen import sage_attention_varlen  # noqa: E402


def register_transformers() -> str:
    """Registers ``attn_implementation="tersor_sage"`` with transformers (see :mod:`tersor.attention.hf`)."""
    from .hf import register_transformers as _register

    return _register()
