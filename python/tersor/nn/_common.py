"""Helpers shared by the ``tersor.nn`` layers: argument validation (the error contract of docs/usage.md) and
byte accounting."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def nbytes(module: nn.Module) -> int:
    """Bytes of the module's own tensors that ``state_dict()`` saves (parameters and persistent buffers)."""
    total = 0
    for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
        if name in module._non_persistent_buffers_set:
            continue
        total += t.numel() * t.element_size()
    return total


def continuous_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
    """A codebook layer's tensors fine-tuning may train, by name: those ``layer.CONTINUOUS`` names and the bias if
    any (the codes are never among them)."""
    out = {k: getattr(layer, k) for k in layer.CONTINUOUS}
    if layer.bias is not None:
        out["bias"] = layer.bias
    return out


def check_tensor(t, name: str, owner: str, *, dtypes=None, shape: Optional[tuple] = None,
                 dim: Optional[int] = None) -> torch.Tensor:
    """``t`` itself; TypeError unless it is a tensor of one of ``dtypes``, ValueError unless it has ``dim``
    dimensions / the ``shape`` (None entries match any size). Messages name the owner, the tensor and the
    expected shape."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{owner}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{owner}: {name} must be {allowed}, got {str(t.dtype).replace('torch.', '')}")
    if shape is not None:
        ok = t.dim() == len(shape) and all(s is None or int(a) == s for a, s in zip(t.shape, shape))
        if not ok:
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{owner}: {name} must have shape {want}, got {list(t.shape)}")
    elif dim is not None and t.dim() != dim:
        raise ValueError(f"{owner}: {name} must be {dim}-d, got shape {list(t.shape)}")
    return t


def check_bias(bias, out_features: int, owner: str, dtypes=FLOATS) -> Optional[torch.Tensor]:
    """None, or a float bias of shape [out_features] (TypeError / ValueError otherwise)."""
    if bias is None:
        return None
    return check_tensor(bias, "bias", owner, dtypes=dtypes, shape=(out_features,))


def check_int(v, name: str, owner: str, *, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{owner}: {name} must be an int, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"{owner}: {name} must be >= {minimum}, got {v}")
    return v


def bias_param(bias: Optional[torch.Tensor]) -> Optional[nn.Parameter]:
    """The layer's bias parameter: a copy (layers never alias the bias they are given)."""
    return None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
