"""``E8PLinear``: an ``nn.Linear`` whose weight is QuIP#-style E8P12 codes (2, 3 or 4 bits per weight)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops import hadamard_transform
from ..quant import quipsharp


class E8PLinear(nn.Module):
    """``y = diag(SV * Wscale) U_m W^ U_n^T diag(SU) x + b`` with ``W^`` held as E8P12 codes (QuIP#'s
    ``Qidxs`` layouts) and ``U_k`` the orthonormal Hadamard transform (tersor.hadamard_transform).

    The forward here is the reference path: the Hadamard transforms run as tersor ops, the codes are
    decoded to an fp32 ``W^`` and multiplied with ``torch.matmul``, in fp32, returned in ``x``'s dtype.
    The fused decode-GEMV kernels of issue 4 are not written yet, so this layer saves memory, not time.
    """

    def __init__(self, state: dict[str, torch.Tensor], bias: Optional[torch.Tensor] = None):
        super().__init__()
        self.in_features, self.out_features = state["SU"].numel(), state["SV"].numel()
        self.register_buffer("Qidxs", state["Qidxs"])
        self.register_buffer("SU", state["SU"])
        self.register_buffer("SV", state["SV"])
        self.register_buffer("Wscale", state["Wscale"].reshape(()).float())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.bits = self._bits()

    def _bits(self) -> int:
        if self.Qidxs.shape[0] != self.out_features:
            raise ValueError(f"E8PLinear: Qidxs has {self.Qidxs.shape[0]} rows, SV has {self.out_features}")
        try:
            return quipsharp.qidxs_bits(self.Qidxs, self.in_features)
        except ValueError as e:
            raise ValueError(f"E8PLinear: {e}") from None

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 2, hessian: Optional[torch.Tensor] = None,
                    seed: int = 0) -> "E8PLinear":
        """Quantizes ``linear.weight`` with :func:`tersor.quant.quantize_e8p` (``hessian``: the input second
        moment ``E[x x^T]`` for LDLQ)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear: expected nn.Linear, got {type(linear).__name__}")
        state = quipsharp.quantize_e8p(linear.weight.detach().float(), bits=bits, hessian=hessian, seed=seed)
        return cls(state, linear.bias)

    def decoded_codes(self) -> torch.Tensor:
        """``W^`` (fp32 [m, n]): the codebook values before the rotations and scales."""
        return quipsharp.decode_qidxs(self.Qidxs, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"E8PLinear: x has {x.shape[-1]} features, the layer expects {self.in_features}")
        xr = hadamard_transform(x.float() * self.SU.float(), transpose=True)  # U_n^T diag(SU) x
        z = torch.matmul(xr, self.decoded_codes().t())
        y = hadamard_transform(z) * (self.SV.float() * self.Wscale)  # diag(SV Wscale) U_m z
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, bias={self.bias is not None}"
