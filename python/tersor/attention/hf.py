"""transformers integration: ``attn_implementation="tersor_sage"``.

:func:`register_transformers` adds :func:`tersor_sage_attention` to transformers' ``AttentionInterface`` (and
SDPA's mask builder to ``AttentionMaskInterface``) under the name ``"tersor_sage"``. A model whose attention
goes through that interface (Llama, Mistral, Qwen2, BERT, ... in transformers 5) then runs tersor's quantized
attention with ``model.set_attn_implementation("tersor_sage")`` or
``from_pretrained(..., attn_implementation="tersor_sage")``. ``tersor.quantize_(model, SageAttentionConfig())``
does both steps. Calls tersor's kernel cannot take go to transformers' own SDPA function (see
:func:`tersor_sage_attention`), with a warning once per reason.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from . import SdpaRouteStats, sage_attention, sage_supported, sparse_sage_attention

NAME = "tersor_sage"
stats = SdpaRouteStats()
"""Process-wide counts of the ``tersor_sage`` calls: ``routed`` to tersor, ``fell_back`` to SDPA by reason."""

_warned: set = set()
_registered = False


def _fallback_reason(module, query, key, value, attention_mask, dropout, is_causal, kwargs) -> Optional[str]:
    if kwargs.get("softcap") is not None:
        return "softcap"
    if kwargs.get("position_bias") is not None:
        return "position_bias"
    if kwargs.get("s_aux") is not None:
        return "attention sinks"
    return sage_supported(query, key, value, attention_mask, dropout, is_causal, enable_gqa=True)


def tersor_sage_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                          scaling: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs):
    """The ``AttentionInterface`` function behind ``"tersor_sage"``: transformers' ``sdpa_attention_forward``
    signature (``query [B, Hq, Lq, D]``, ``key``/``value [B, Hkv, Lk, D]``), returns ``(out [B, Lq, Hq, D], None)``.

    Routed to :func:`tersor.attention.sage_attention` (GQA natively, ``scale=scaling``) when: no attention
    mask (transformers passes none for unpadded causal or bidirectional batches) or the 2-d padding mask
    :func:`tersor_sage_mask` passes for padded ones (then ``key_padding_mask``), no dropout, float16/bfloat16,
    head dim <= 128 (padded to 64 or 128 like SageAttention; <= 256 on the CPU), ``Lq == Lk`` when causal, a device with
    validated kernels (the CPU twin; CUDA once ``CUDA_KERNELS_READY``), no autograd, no softcap / position
    bias / sinks. Everything else runs transformers' ``sdpa_attention_forward`` unchanged and warns once per
    reason (``stats`` counts both). Quantization modes: ``module.config.tersor_sage`` (set by
    ``SageAttentionConfig``), else ``qk="auto", pv="auto"``.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    key_padding = None
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.dtype == torch.bool:
        # tersor_sage_mask's padding mask [B, Lk] (True = a real key), with the module's causality
        key_padding, attention_mask = attention_mask, None
    causal = bool(query.shape[2] > 1 and attention_mask is None and causal)  # as sdpa_attention_forward decides
    reason = _fallback_reason(module, query, key, value, attention_mask, dropout, causal, kwargs)
    if reason is None and key_padding is not None and getattr(getattr(module, "config", None), "tersor_sage", {}) \
            .get("sparse_threshold") is not None:
        reason = "padding mask with block-sparse attention"
    if reason is not None:
        if key_padding is not None:  # SDPA needs the 4-d mask sdpa_mask would have built
            attention_mask = _padding_mask_4d(key_padding, query.shape[2], causal)
            is_causal = False
        stats.fell_back[reason] += 1
        if reason not in _warned:
            _warned.add(reason)
            warnings.warn(f"tersor_sage attention: falling back to SDPA for {reason} (shown once per reason; "
                          f"tersor.attention.hf.stats counts the calls)", stacklevel=2)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    modes = getattr(getattr(module, "config", None), "tersor_sage", None) or {}
    stats.routed += 1
    if modes.get("sparse_threshold") is not None:  # SageAttentionConfig(sparse_threshold=...): block-sparse
        out = sparse_sage_attention(query, key, value, threshold=modes["sparse_threshold"],
                                    stride=modes.get("sparse_stride", 8), is_causal=causal, scale=scaling,
                                    qk=modes.get("qk", "auto"), pv=modes.get("pv", "auto"))
        return out.transpose(1, 2).contiguous(), None
    out = sage_attention(query, key, value, is_causal=causal, scale=scaling, qk=modes.get("qk", "auto"),
                         pv=modes.get("pv", "auto"), key_padding_mask=key_padding)
    return out.transpose(1, 2).contiguous(), None


def _padding_mask_4d(key_padding: torch.Tensor, len_q: int, causal: bool) -> torch.Tensor:
    """bool [B, 1, Lq, Lk]: the padding mask [B, Lk] and, if causal, the bottom-right causal mask (what sdpa_mask
    builds for the calls tersor_sage_mask passes a 2-d mask for: Lq == Lk or Lq == 1)."""
    len_k = key_padding.shape[-1]
    m = key_padding.bool()[:, None, None, :].expand(-1, 1, len_q, len_k)
    if causal:
        rows = torch.arange(len_q, device=key_padding.device)[:, None] + (len_k - len_q)
        m = m & (torch.arange(len_k, device=key_padding.device)[None, :] <= rows)
    return m


def tersor_sage_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                     attention_mask=None, local_size=None, allow_is_causal_skip=True,
                     allow_is_bidirectional_skip=False, **kwargs):
    """The ``AttentionMaskInterface`` function behind ``"tersor_sage"``: ``None`` (no mask, the kernel's own
    ``is_causal``) for a plain causal or bidirectional mask with no padding mask and no window; the 2-d padding
    mask bool ``[B, kv_length]`` (as transformers' ``flash_attention_mask`` does; ``tersor_sage_attention`` runs
    it as ``key_padding_mask``, or builds the 4-d mask if it falls back to SDPA) for the same masks with
    padding; else transformers' ``sdpa_mask``.

    Why not ``sdpa_mask`` alone: before torch 2.14, dynamo folds ``torch.compiler.is_exporting()`` to ``True``
    while tracing, so ``sdpa_mask`` materializes the full causal mask under ``torch.compile`` and every layer
    would fall back to SDPA (torch 2.11 is the GPU machine's torch). The decision here reads no tensor values:
    only the mask kind, the shapes (guards under compile) and whether a padding mask was passed at all."""
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function, sdpa_mask

    simple = local_size is None and (attention_mask is None or
                                     (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2))
    causal_ok = simple and allow_is_causal_skip and mask_function is causal_mask_function \
        and not isinstance(q_offset, torch.Tensor) and (q_length == 1 or q_length == kv_length)
    # causal with Lq == Lk (top-left == bottom-right), or one query that sees every key; or bidirectional
    if causal_ok or (simple and allow_is_bidirectional_skip and mask_function is bidirectional_mask_function):
        if attention_mask is None:
            return None
        # the padding mask of the keys [kv_offset, kv_offset + kv_length), as sdpa_mask reads it
        pad = attention_mask.bool()
        if pad.shape[-1] < kv_offset + kv_length:
            pad = torch.nn.functional.pad(pad, (0, kv_offset + kv_length - pad.shape[-1]))
        return pad[:, kv_offset:kv_offset + kv_length]
    return sdpa_mask(batch_size, q_length, kv_length, q_offset=q_offset, kv_offset=kv_offset,
                     mask_function=mask_function, attention_mask=attention_mask, local_size=local_size,
                     allow_is_causal_skip=allow_is_causal_skip,
                     allow_is_bidirectional_skip=allow_is_bidirectional_skip, **kwargs)


def register_transformers() -> str:
    """Registers ``"tersor_sage"`` with transformers' ``AttentionInterface`` and ``AttentionMaskInterface``
    (idempotent; imports transformers) and returns the name. Needed before
    ``from_pretrained(..., attn_implementation="tersor_sage")``; ``import tersor`` calls it when transformers is
    already imported, and ``SageAttentionConfig`` calls it itself."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(NAME, tersor_sage_attention)
        AttentionMaskInterface.register(NAME, tersor_sage_mask)
        _registered = True
    return NAME


def apply(model: nn.Module, qk: str = "auto", pv: str = "auto", sparse_threshold: Optional[float] = None,
          sparse_stride: int = 8) -> str:
    """Sets ``attn_implementation="tersor_sage"`` on a transformers model (and its sub-models) and stores the
    modes in each config as ``config.tersor_sage``. Returns a one-line description. Raises TypeError for a
    model that is not a transformers ``PreTrainedModel`` and ValueError for one whose attention does not go
    through ``AttentionInterface``."""
    try:
        from transformers import PreTrainedModel
    except ImportError as e:
        raise TypeError("SageAttentionConfig: needs transformers (a PreTrainedModel); for other models use "
                        "tersor.attention.route_sdpa") from e
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"SageAttentionConfig: needs a transformers PreTrainedModel, got {type(model).__name__}; "
                        f"for other models use tersor.attention.route_sdpa or tersor.nn.SageAttention")
    register_transformers()
    model.set_attn_implementation(NAME)
    configs = {id(m.config): m.config for m in model.modules() if isinstance(m, PreTrainedModel)}
    for cfg in configs.values():
        if getattr(cfg, "_attn_implementation", None) != NAME:
            raise ValueError(f"SageAttentionConfig: {type(model).__name__} does not take attn_implementation="
                             f"{NAME!r} (its attention does not go through transformers' AttentionInterface)")
        cfg.tersor_sage = {"qk": qk, "pv": pv}
        if sparse_threshold is not None:  # block-sparse (sparse_sage_attention)
            cfg.tersor_sage.update(sparse_threshold=sparse_threshold, sparse_stride=sparse_stride)
    n_attn = sum(1 for m in model.modules() if hasattr(m, "is_causal") and hasattr(m, "config"))
    sparse = "" if sparse_threshold is None else f", block-sparse threshold={sparse_threshold}"
    return (f"attn_implementation={NAME!r} (qk={qk!r}, pv={pv!r}{sparse}) on {type(model).__name__}, "
            f"{n_attn} attention modules")
