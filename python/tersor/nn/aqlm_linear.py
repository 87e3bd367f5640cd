"""``AQLMLinear``: an ``nn.Linear`` whose weight is AQLM additive codebooks (1x16, 2x8, ... with groups of 8)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops import aqlm_decode, aqlm_linear
from ..quant import aqlm as aqlm_quant


class AQLMLinear(nn.Module):
    """``y = x W^T + b`` with ``W[o, 8j:8j+8] = scales[o] * sum_c codebooks[c][codes[o, j, c] mod 2^b]``, the
    tensors named and shaped as AQLM checkpoints store them (``codes`` int8/int16 [out, in/8, C],
    ``codebooks`` [C, 2^b, 1, 8], ``scales`` [out, 1, 1, 1]). Forward: :func:`tersor.ops.aqlm_linear` (a
    lookup-table / fused decode GEMV for few rows of x, decode + matmul otherwise; fp32 accumulation,
    output in x's dtype)."""

    def __init__(self, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                 bias: Optional[torch.Tensor] = None):
        super().__init__()
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("codebooks", codebooks.contiguous())
        self.register_buffer("scales", scales.contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        # Validates shapes and dtypes once, with the op's own messages (meta tensors: no data touched).
        aqlm_decode(codes.to("meta"), codebooks.to("meta"), scales.to("meta"))
        self.out_features, self.in_features = codes.shape[0], codes.shape[1] * 8
        self.num_codebooks, self.nbits = codebooks.shape[0], codebooks.shape[1].bit_length() - 1

    @classmethod
    def from_aqlm(cls, *, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                  bias: Optional[torch.Tensor] = None) -> "AQLMLinear":
        """A layer from one AQLM ``QuantizedLinear``'s tensors (out_group_size 1, in_group_size 8)."""
        return cls(codes, codebooks, scales, bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, num_codebooks: int = 2, nbits: int = 8, **quantize_kwargs) -> "AQLMLinear":
        """Quantizes ``linear.weight`` with :func:`tersor.quant.quantize_aqlm` (1x16: ``num_codebooks=1,
        nbits=16``; 2x8: the default), groups of 8 inputs."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear: expected nn.Linear, got {type(linear).__name__}")
        q = aqlm_quant.quantize_aqlm(linear.weight.detach().float(), num_codebooks=num_codebooks, nbits=nbits,
                                     in_group_size=8, out_group_size=1, **quantize_kwargs)
        return cls(q["codes"], q["codebooks"], q["scales"], linear.bias)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dense weight [out, in] (fp32 arithmetic, rounded once to ``dtype``; default the codebooks')."""
        return aqlm_decode(self.codes, self.codebooks, self.scales, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"AQLMLinear: x has {x.shape[-1]} features, the layer expects {self.in_features}")
        return aqlm_linear(x, self.codes, self.codebooks, self.scales, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"codebooks={self.num_codebooks}x{self.nbits}, bias={self.bias is not None}")
