"""``tersor.dequantize_``: tersor layers back to ``nn.Linear`` (the dense weight each one multiplies by)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..nn import AQLMLinear, CompressedLinear, E8PLinear, SparseLinear
from .quipsharp_ckpt import E8PFusedLinear, E8PFusedPart

# What dequantize_ replaces: every tersor linear and each part of a fused QuIP# layer, never the fused layer
# itself (an E8PLinear subclass that returns the parts' tuple; it is removed once its parts are replaced).
_LAYERS = (AQLMLinear, CompressedLinear, E8PLinear, SparseLinear, E8PFusedPart)


def _dense(layer: nn.Module) -> tuple[torch.Tensor, Optional[torch.dtype]]:
    """The layer's dense weight [out, in] and the dtype it computes in, where it has one (E8P and AQLM layers
    serve any input dtype: None)."""
    if isinstance(layer, SparseLinear):
        return layer.dense_weight(), layer.io_dtype
    if isinstance(layer, CompressedLinear):
        w = layer.weight
        return w, w.dtype
    if isinstance(layer, AQLMLinear):
        return layer.dequantize(torch.float32), None
    return layer.dequantize(), None  # E8PLinear, E8PFusedPart: fp32


def dequantize_(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Replaces every tersor linear layer of ``model`` (E8P, AQLM, 2:4, BSR, lossless, and the parts of fused
    QuIP# layers) **in place** by an ``nn.Linear`` holding the dense weight it multiplies by, and returns
    ``model``. ``dtype``: the new layers' dtype (default: the layer's own for 2:4, BSR and lossless layers, which
    have one; float32 for E8P and AQLM layers, which serve any input dtype). The weights are computed in fp32
    and rounded once. Fused QuIP# layers (``qkv_proj``, ``upgate_proj``) are removed once their parts are
    replaced. Lossless layers come back bit-identical; the others give the weight their codes stand for (the
    compression error stays). Attention routing (``SageAttentionConfig``) is not undone."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"dequantize_: model must be an nn.Module, got {type(model).__name__}")
    if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"dequantize_: dtype must be float32, float16 or bfloat16, got {dtype}")
    todo = [(fqn, m) for fqn, m in model.named_modules()
            if fqn and isinstance(m, _LAYERS) and not isinstance(m, E8PFusedLinear)]
    fused = [fqn for fqn, m in model.named_modules() if fqn and isinstance(m, E8PFusedLinear)]
    new_layers = []
    with torch.no_grad():
        for fqn, layer in todo:
            w, own = _dense(layer)
            dt = dtype or own or torch.float32
            bias = getattr(layer, "bias", None)
            if isinstance(layer, E8PFusedPart):  # the bias of its rows, scaled as the fused forward does
                fb = layer.fused.bias
                if fb is not None:
                    start = sum(layer.fused.fuse_sizes[:layer.index])
                    bias = fb[start:start + layer.out_features] * layer.fused.fuse_scales[layer.index]
            lin = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, dtype=dt, device=w.device)
            lin.weight.copy_(w.to(torch.float32).to(dt))
            if bias is not None:
                lin.bias.copy_(bias.to(torch.float32).to(dt))
            new_layers.append((fqn, lin))
    for fqn, lin in new_layers:
        model.set_submodule(fqn, lin)
    for fqn in fused:
        parent, _, leaf = fqn.rpartition(".")
        delattr(model.get_submodule(parent) if parent else model, leaf)
    return model
