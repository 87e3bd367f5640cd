"""``SparseLinear``: an ``nn.Linear`` whose weight is structurally sparse (2:4 semi-structured)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..sparse import semi_structured as s24

PATTERNS = ("2:4", "bsr")


class SparseLinear(nn.Module):
    """``y = x W^T + b`` with a structurally sparse ``W [out, in]``.

    ``pattern="2:4"``: W is stored in 2:4 format v1 (buffers ``values`` and ``meta``, see
    :mod:`tersor.sparse`), 9/16 of the dense bytes; forward is :func:`tersor.ops.sparse24_linear`
    (fp32 accumulation, output in the weight's dtype, float16/bfloat16). ``state_dict()`` holds only
    tensors (``values``, ``meta``, ``bias``), so it round-trips through safetensors; loading validates the
    metadata (:func:`tersor.sparse.load_2_4`). ``pattern="bsr"`` is reserved for block-sparse weights.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, pattern: str = "2:4",
                 dtype: torch.dtype = torch.float16, device=None):
        super().__init__()
        if pattern not in PATTERNS:
            raise ValueError(f"SparseLinear: pattern must be one of {PATTERNS}, got {pattern!r}")
        if pattern != "2:4":
            raise NotImplementedError("SparseLinear: pattern='bsr' is not available yet (see tersor.sparse.bsr)")
        if dtype not in s24.DTYPES:
            raise TypeError(f"SparseLinear: dtype must be float16 or bfloat16 for pattern '2:4', got {dtype}")
        if out_features <= 0 or out_features % s24.ROW_ALIGN or in_features <= 0 or in_features % s24.COL_ALIGN:
            raise ValueError(f"SparseLinear: 2:4 needs out_features % {s24.ROW_ALIGN} == 0 and in_features % "
                             f"{s24.COL_ALIGN} == 0, got out={out_features}, in={in_features}")
        self.pattern = pattern
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("values", torch.zeros(out_features // 16, in_features // 32, 256, dtype=dtype, device=device))
        # 0x44444444: every nibble keeps positions (0, 1), a valid all-zero weight.
        self.register_buffer("meta", torch.full((out_features // 16, in_features // 64, 32), 0x44444444,
                                                dtype=torch.int32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, pattern: str = "2:4", method: str = "magnitude",
                    act_norm: Optional[torch.Tensor] = None, dtype: Optional[torch.dtype] = None) -> "SparseLinear":
        """Prunes ``linear.weight`` with :func:`tersor.sparse.prune_2_4` (``method`` ``"magnitude"`` or
        ``"wanda"`` with ``act_norm [in]``; scores from the original-precision weight) and packs it; the
        layer then equals ``F.linear(x, pruned_weight.to(dtype), bias.to(dtype))`` up to fp32-accumulation
        rounding. ``dtype`` defaults to the weight's dtype (must then be float16/bfloat16)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"SparseLinear.from_linear: expected nn.Linear, got {type(linear).__name__}")
        if pattern not in PATTERNS:
            raise ValueError(f"SparseLinear: pattern must be one of {PATTERNS}, got {pattern!r}")
        if pattern != "2:4":
            raise NotImplementedError("SparseLinear: pattern='bsr' is not available yet (see tersor.sparse.bsr)")
        w = linear.weight.detach()
        dtype = dtype or w.dtype
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, pattern, dtype, w.device)
        packed = s24.compress_2_4(s24.prune_2_4(w, method, act_norm).to(dtype))
        layer.values.copy_(packed.values)
        layer.meta.copy_(packed.meta)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach().to(dtype))
        return layer

    @property
    def weight_2_4(self) -> s24.Sparse24Weight:
        return s24.Sparse24Weight(self.values, self.meta)

    def dense_weight(self) -> torch.Tensor:
        """The dense ``[out, in]`` weight (zeros at pruned positions)."""
        return s24.decompress_2_4(self.weight_2_4)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        values, meta = state_dict.get(prefix + "values"), state_dict.get(prefix + "meta")
        if values is not None and meta is not None:
            s24.load_2_4(values, meta, (self.out_features, self.in_features))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"SparseLinear: x has {x.shape[-1]} features, the layer expects {self.in_features}")
        return s24.linear_2_4(x, self.weight_2_4, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, pattern={self.pattern!r}, "
                f"dtype={self.values.dtype}, bias={self.bias is not None}")
