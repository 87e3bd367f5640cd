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

__all__ = ["PagedKVCache", "SdpaRouteStats", "pick_modes", "register_transformers", "route_sdpa", "sage_attention",
           "sage_attention_varlen", "sage_decode", "sage_supported", "sageattn"]

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


def _padded_head_dim(d: int) -> int:
    if d < 1 or d > 128:
        raise ValueError(f"sage_attention: head_dim must be between 1 and 128, got {d}")
    return 64 if d <= 64 else 128


def sage_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool = False,
                   scale: Optional[float] = None, layout: str = "bhsd", qk: str = "auto", pv: str = "auto",
                   smooth_k: bool = True, smooth_q: Optional[bool] = None, return_lse: bool = False,
                   kernel: str = "auto"):
    """Quantized attention with SageAttention2 numerics; output like ``F.scaled_dot_product_attention``.

    ``q [B, Hq, Lq, D]`` and ``k``/``v [B, Hkv, Lk, D]`` (``layout="bhsd"``) or ``[B, L, H, D]``
    (``layout="bshd"``), float16/bfloat16, ``Hq % Hkv == 0`` (GQA/MQA), ``D <= 128`` (padded with zeros to
    64 or 128, which changes nothing mathematically). ``scale`` defaults to ``1/sqrt(D)`` of the unpadded
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
    qk_mode, pv_mode = pick_modes(q.device, qk, pv)
    qk_bits = _QK_BITS[qk_mode]
    if q.dtype not in (torch.float16, torch.bfloat16) and not (qk_bits == 0 and pv_mode == "fp32"):
        raise TypeError(f"sage_attention: expected float16 or bfloat16 inputs, got {q.dtype}")
    if layout == "bshd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    d = q.shape[-1]
    if k.shape[-1] != d or v.shape[-1] != d:
        raise ValueError(f"sage_attention: q, k, v must share the head dim, got {d}, {k.shape[-1]}, {v.shape[-1]}")
    dp = _padded_head_dim(d)
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    if dp != d:
        q, k, v = (F.pad(t, (0, dp - d)) for t in (q, k, v))
    if smooth_q is None:
        smooth_q = qk_bits == 4
    out, lse = ops.sage_attention_fwd(q, k, v, bool(is_causal), float(scale), qk_bits, pv_mode, bool(smooth_k),
                                      bool(smooth_q), kernel)
    if dp != d:
        out = out[..., :d]
    if layout == "bshd":
        out = out.transpose(1, 2)
    return (out, lse) if return_lse else out


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
    if q.shape[-1] > 128 or k.shape[-1] != q.shape[-1] or v.shape[-1] != q.shape[-1]:
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

    Supported: no ``attn_mask``, no dropout, fp16/bf16 4-d inputs with head dim <= 128 on a device with a
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
from .paged import PagedKVCache, sage_decode  # noqa: E402
from .varlen import sage_attention_varlen  # noqa: E402


def register_transformers() -> str:
    """Registers ``attn_implementation="tersor_sage"`` with transformers (see :mod:`tersor.attention.hf`)."""
    from .hf import register_transformers as _register

    return _register()
