"""``SageAttention``: an ``nn.Module`` around :func:`tersor.attention.sage_attention`."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..attention import sage_attention


class SageAttention(nn.Module):
    """Quantized scaled-dot-product attention (no parameters): ``forward(q, k, v, is_causal=False, scale=None,
    block_mask=None)`` (``block_mask``: block-sparse, see :func:`tersor.attention.sage_attention`).

    Holds the layout (``"bhsd"``/``"bshd"``), the quantization modes (``qk``, ``pv``; ``"auto"`` picks per
    device) and the CUDA ``kernel`` choice (``"auto"``, ``"sm8x"``, ``"sm90"``). Causal masking is bottom-right
    aligned (see :func:`tersor.attention.sage_attention`).
    """

    def __init__(self, layout: str = "bhsd", qk: str = "auto", pv: str = "auto", smooth_k: bool = True,
                 kernel: str = "auto"):
        super().__init__()
        self.layout, self.qk, self.pv, self.smooth_k, self.kernel = layout, qk, pv, smooth_k, kernel

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = False,
                scale: Optional[float] = None, block_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return sage_attention(q, k, v, is_causal=is_causal, scale=scale, layout=self.layout, qk=self.qk,
                              pv=self.pv, smooth_k=self.smooth_k, kernel=self.kernel, block_mask=block_mask)

    def extra_repr(self) -> str:
        return (f"layout={self.layout!r}, qk={self.qk!r}, pv={self.pv!r}, smooth_k={self.smooth_k}, "
                f"kernel={self.kernel!r}")
