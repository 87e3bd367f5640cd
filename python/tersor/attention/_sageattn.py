"""``sageattn``: SageAttention's public entry point (thu-ml/SageAttention ``sageattention.sageattn``) on top of
:func:`tersor.attention.sage_attention`, so that code written for SageAttention switches by changing the import:

    from tersor.attention import sageattn      # was: from sageattention import sageattn
"""

from __future__ import annotations

from typing import Optional

import torch

_LAYOUTS = {"HND": "bhsd", "NHD": "bshd"}
# SageAttention's pv_accum_dtype -> tersor's pv mode. "fp32+fp32": FP8 P.V, every 32/64-key tile accumulated
# from zero and added into an fp32 O (SageAttention's sm90 default; tersor's pv="fp8"). "fp32": 16-bit P.V with
# fp32 accumulation (SageAttention's sm80 path; tersor's pv="fp16").
_PV_ACCUM = {"fp32+fp32": "fp8", "fp32": "fp16"}


def sageattn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tensor_layout: str = "HND", is_causal: bool = False,
             sm_scale: Optional[float] = None, return_lse: bool = False, *, qk_quant_gran: str = "per_thread",
             qk_quant_dtype: str = "int8", pv_accum_dtype: Optional[str] = None, smooth_k: bool = True,
             smooth_v: bool = False, attn_mask: Optional[torch.Tensor] = None,
             quantization_backend: Optional[str] = None, qk: Optional[str] = None, pv: Optional[str] = None):
    """Quantized attention with SageAttention's signature; returns ``o`` (or ``(o, lse)``) like theirs.

    ``q [B, Hq, Lq, D]``, ``k``/``v [B, Hkv, Lk, D]`` for ``tensor_layout="HND"``, or ``[B, L, H, D]`` for
    ``"NHD"``; float16/bfloat16; ``Hq % Hkv == 0`` (GQA); ``D <= 128`` (padded to 64 or 128 like
    SageAttention; up to 256 on the CPU twin, padded to 256; larger raises ValueError). ``sm_scale`` defaults to ``1/sqrt(D)``. ``is_causal``: with
    ``Lq == Lk`` as in SageAttention; for ``Lq != Lk`` tersor masks bottom-right aligned (KV-cache convention,
    see :func:`tersor.attention.sage_attention`). ``return_lse``: also the float32 log-sum-exp ``[B, Hq, Lq]``
    (natural log, with the K-smoothing correction applied, as SageAttention returns it).

    SageAttention's keyword arguments, as far as tersor has the numerics (anything else raises
    ``NotImplementedError`` naming what is supported):

    * ``qk_quant_gran``: ``"per_thread"`` (SageAttention's default, tersor's only granularity).
      ``"per_warp"`` is not implemented.
    * ``qk_quant_dtype``: ``"int8"``. (tersor's INT4 Q.K is reached with the tersor keyword ``qk="int4"``.)
    * ``pv_accum_dtype``: ``None`` (per-device default, :func:`tersor.attention.pick_modes`),
      ``"fp32+fp32"`` (FP8 P.V with two-level fp32 accumulation, SageAttention's sm90 mode) or ``"fp32"``
      (16-bit P.V with fp32 accumulation, SageAttention's sm80 mode). ``"fp32+fp16"`` (SageAttention2++)
      and ``"fp16"``/``"fp16+fp32"`` are not implemented.
    * ``smooth_k``: subtract K's token mean (default True, exact for the output; the LSE is corrected).
    * ``smooth_v``: only ``False`` (tersor has no V smoothing).
    * ``attn_mask``: only ``None`` (SageAttention's CUDA kernels take no mask either).
    * ``quantization_backend``: accepted and ignored (``"cuda"``/``"triton"`` choose SageAttention's
      quantization kernels; tersor has one).
    * tersor extensions: ``qk`` (``"int8"``, ``"int4"``, ``"none"``) and ``pv`` (``"fp8"``, ``"fp16"``,
      ``"fp32"``) select tersor's modes directly and win over ``qk_quant_dtype`` / ``pv_accum_dtype``.

    Like :func:`tersor.attention.sage_attention`, a mode without a kernel on the device raises
    ``NotImplementedError``; there is no silent fallback to SDPA (use ``route_sdpa`` or
    ``attn_implementation="tersor_sage"`` for that).
    """
    from . import sage_attention

    if tensor_layout not in _LAYOUTS:
        raise ValueError(f"sageattn: tensor_layout must be 'HND' or 'NHD', got {tensor_layout!r}")
    if qk_quant_gran != "per_thread":
        raise NotImplementedError(f"sageattn: qk_quant_gran={qk_quant_gran!r} is not implemented; tersor quantizes "
                                  f"Q and K per thread group ('per_thread', SageAttention's default)")
    if qk_quant_dtype != "int8":
        raise NotImplementedError(f"sageattn: qk_quant_dtype={qk_quant_dtype!r} is not implemented; use 'int8' "
                                  f"(or the tersor keyword qk='int4')")
    if pv_accum_dtype is not None and pv_accum_dtype not in _PV_ACCUM:
        raise NotImplementedError(f"sageattn: pv_accum_dtype={pv_accum_dtype!r} is not implemented; supported: None "
                                  f"(per-device default), 'fp32+fp32' (FP8 P.V), 'fp32' (16-bit P.V)")
    if smooth_v:
        raise NotImplementedError("sageattn: smooth_v=True is not implemented (tersor has no V smoothing)")
    if attn_mask is not None:
        raise NotImplementedError("sageattn: attn_mask is not implemented; use F.scaled_dot_product_attention")
    if quantization_backend not in (None, "cuda", "triton"):
        raise ValueError(f"sageattn: quantization_backend must be 'cuda' or 'triton', got {quantization_backend!r}")
    if not isinstance(smooth_k, bool):
        raise TypeError(f"sageattn: smooth_k must be a bool, got {type(smooth_k).__name__}")
    qk_mode = qk if qk is not None else "int8"
    pv_mode = pv if pv is not None else (_PV_ACCUM[pv_accum_dtype] if pv_accum_dtype is not None else "auto")
    return sage_attention(q, k, v, is_causal=bool(is_causal), scale=sm_scale, layout=_LAYOUTS[tensor_layout],
                          qk=qk_mode, pv=pv_mode, smooth_k=smooth_k, return_lse=return_lse)
