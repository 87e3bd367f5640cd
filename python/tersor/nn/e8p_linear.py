"""``E8PLinear``: an ``nn.Linear`` whose weight is QuIP#-style E8P12 codes (2, 3 or 4 bits per weight)."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..ops import _hadamard_size_ok, e8p_decode, e8p_linear, hadamard_factor, hadamard_transform
from ..quant import quipsharp
from ._common import FLOATS, bias_param, check_bias, check_tensor, nbytes

# QuIP#'s codebook_id of each bit width (lib/codebook/__init__.py): E8P12, E8P12RVQ3B, E8P12RVQ4B.
QUIPSHARP_CODEBOOK_ID = {2: 7, 3: 18, 4: 17}


class E8PLinear(nn.Module):
    """``y = diag(SV * Wscale) U_m W^ U_n^T diag(SU) x + b`` with ``W^`` held as E8P12 codes (QuIP#'s
    ``Qidxs`` layouts) and ``U_k`` the orthonormal Hadamard transform (tersor.hadamard_transform).

    Forward: ``x * SU`` and the input Hadamard transform (tersor.hadamard_transform, fp32), the codes'
    GEMV (:func:`tersor.ops.e8p_linear`: fused decode + tensor-core GEMV on CUDA for <= 8 rows, x in
    fp16 there; lookup GEMV or decode + matmul on CPU), the output transform, ``* SV * Wscale`` and bias
    in fp32, returned in ``x``'s dtype. ``resid_scale`` (3/4-bit RVQ) defaults to QuIP#'s 2.04 / 3.45.

    Every argument is checked here (TypeError for dtypes, ValueError for shapes and values). ``Qidxs``,
    ``SU`` and ``SV`` are kept as given (aliased, no copy); ``Wscale`` becomes an fp32 scalar; ``bias`` is
    always copied.
    """

    tersor_format = "e8p"

    def __init__(self, state: dict[str, torch.Tensor], bias: Optional[torch.Tensor] = None,
                 resid_scale: Optional[float] = None):
        super().__init__()
        if not isinstance(state, dict):
            raise TypeError(f"E8PLinear: state must be a dict of tensors (Qidxs, SU, SV, Wscale), got "
                            f"{type(state).__name__}")
        for key in ("Qidxs", "SU", "SV"):
            if key not in state:
                raise ValueError(f"E8PLinear: state is missing tensor {key!r} (have {sorted(state)})")
        su = check_tensor(state["SU"], "SU", "E8PLinear", dtypes=FLOATS, dim=1)
        sv = check_tensor(state["SV"], "SV", "E8PLinear", dtypes=FLOATS, dim=1)
        self.in_features, self.out_features = su.numel(), sv.numel()
        n, m = self.in_features, self.out_features
        for what, k in (("in_features (len(SU))", n), ("out_features (len(SV))", m)):
            if not _hadamard_size_ok(k):
                raise ValueError(f"E8PLinear: {what} = {k} is not a size tersor.hadamard_transform supports "
                                 f"(2^k or K * 2^k, K in {tersor_k_sizes()})")
        if m % 16 or n % 64:
            raise ValueError(f"E8PLinear: QuIP#'s E8P layout needs out_features % 16 == 0 and in_features % 64 == 0, "
                             f"got out_features = {m}, in_features = {n}")
        check_tensor(state["Qidxs"], "Qidxs", "E8PLinear", dtypes=(torch.int64,), dim=2)
        wscale = state.get("Wscale", torch.ones(()))
        check_tensor(wscale, "Wscale", "E8PLinear", dtypes=FLOATS)
        if wscale.numel() != 1:
            raise ValueError(f"E8PLinear: Wscale must be a scalar (shape [] or [1]), got {list(wscale.shape)}")
        bias = state.get("bias") if bias is None else bias  # a saved state dict carries it
        check_bias(bias, m, "E8PLinear")
        self.register_buffer("Qidxs", state["Qidxs"])
        self.register_buffer("SU", su)
        self.register_buffer("SV", sv)
        self.register_buffer("Wscale", wscale.reshape(()).float())
        self.bias = bias_param(bias)
        self.bits = self._bits()
        if resid_scale is None and "resid_scale" in state:
            resid_scale = float(state["resid_scale"])
        if resid_scale is not None and not (math.isfinite(float(resid_scale)) and float(resid_scale) > 0):
            raise ValueError(f"E8PLinear: resid_scale must be positive and finite, got {resid_scale}")
        default = quipsharp.RESID_SCALE.get(self.bits, 1.0)
        self.register_buffer("resid_scale", torch.tensor(float(default if resid_scale is None else resid_scale)))
        self._resid = float(self.resid_scale)  # a Python float for forward: no device sync, no graph break

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._resid = float(self.resid_scale)

    def _bits(self) -> int:
        m, n = self.out_features, self.in_features
        if self.Qidxs.shape[0] != m or self.Qidxs.shape[1] not in (n // 32, 3 * n // 64, n // 16):
            raise ValueError(f"E8PLinear: Qidxs must be [{m}, {n // 32}] (2 bits), [{m}, {3 * n // 64}] (3 bits) or "
                             f"[{m}, {n // 16}] (4 bits) for len(SV) = {m}, len(SU) = {n}; Qidxs "
                             f"{list(self.Qidxs.shape)} does not fit")
        return quipsharp.qidxs_bits(self.Qidxs, n)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 2, hessian: Optional[torch.Tensor] = None,
                    seed: int = 0) -> "E8PLinear":
        """Quantizes ``linear.weight`` with :func:`tersor.quant.quantize_e8p` (``hessian``: the input second
        moment ``E[x x^T]`` for LDLQ)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear: expected nn.Linear, got {type(linear).__name__}")
        if linear.weight.dtype not in FLOATS:
            raise TypeError(f"E8PLinear.from_linear: the weight must be float32, float16 or bfloat16, got "
                            f"{linear.weight.dtype}")
        state = quipsharp.quantize_e8p(linear.weight.detach().float(), bits=bits, hessian=hessian, seed=seed)
        return cls(state, linear.bias)

    @classmethod
    def from_quipsharp(cls, state: dict[str, torch.Tensor], resid_scale_override: Optional[float] = None) -> "E8PLinear":
        """A layer from one QuIP# ``QuantizedLinear``'s tensors (``Qidxs``, ``SU``, ``SV``, optional ``Wscale``,
        ``bias``, ``scaleWH``, ``codebook_id``; the prefix already stripped), computing QuIP#'s
        ``y = SV Wscale U_m W^ U_n^T (SU x / scaleWH) + bias``. ``resid_scale_override``: the checkpoint's
        ``quip_params.resid_scale_override`` when > 0. Limits, each a clear error: fused layers
        (``fuse_scales``: split them first) and dimensions that are not powers of two (QuIP# then uses its
        own Hadamard matrices H_K, which differ from tersor's)."""
        for key in ("Qidxs", "SU", "SV"):
            if key not in state:
                raise ValueError(f"from_quipsharp: missing tensor {key!r} (have {sorted(state)})")
        if "fuse_scales" in state:
            raise ValueError("from_quipsharp: fused QuIP# layers (fuse_scales: qkv_proj, upgate_proj) are not "
                             "supported; split the output rows per part first")
        n, m = state["SU"].numel(), state["SV"].numel()
        for what, k in (("in_features", n), ("out_features", m)):
            if hadamard_factor(k)[0] != 1:
                raise ValueError(f"from_quipsharp: {what} = {k} is not a power of two; QuIP# rotates such sizes "
                                 "with its own H_K matrices, which tersor.hadamard_transform does not reproduce")
        su = state["SU"].float()
        if "scaleWH" in state:
            su = su / state["scaleWH"].float()  # QuIP# divides x by scaleWH before the SU multiply
        layer = cls({"Qidxs": state["Qidxs"].to(torch.int64), "SU": su, "SV": state["SV"].float(),
                     "Wscale": state.get("Wscale", torch.ones(())).float()},
                    state.get("bias"), resid_scale=resid_scale_override if resid_scale_override else None)
        if "codebook_id" in state and int(state["codebook_id"]) != QUIPSHARP_CODEBOOK_ID[layer.bits]:
            raise ValueError(f"from_quipsharp: codebook_id {int(state['codebook_id'])} does not match the "
                             f"{layer.bits}-bit layout of Qidxs (expected {QUIPSHARP_CODEBOOK_ID[layer.bits]})")
        return layer

    def layer_config(self) -> dict:
        """What tersor checkpoints record about this layer (docs/formats.md, tersor checkpoint v1)."""
        return {"bits": self.bits, "resid_scale": self._resid}

    def decoded_codes(self) -> torch.Tensor:
        """``W^`` (fp32 [m, n]): the codebook values before the rotations and scales."""
        return e8p_decode(self.Qidxs, self.in_features, self._resid)

    def dequantize(self) -> torch.Tensor:
        """The dense fp32 weight [m, n] this layer multiplies by."""
        return quipsharp.unrht(self.decoded_codes() * self.Wscale, self.SU, self.SV)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"E8PLinear: x has {x.shape[-1]} features, the layer expects {self.in_features}")
        xr = hadamard_transform(x.float() * self.SU.float(), transpose=True)  # U_n^T diag(SU) x
        z = e8p_linear(xr, self.Qidxs, self.in_features, self._resid)
        y = hadamard_transform(z) * (self.SV.float() * self.Wscale)  # diag(SV Wscale) U_m z
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format='e8p', bits={self.bits}, "
                f"bias={self.bias is not None}, nbytes={nbytes(self)}")


def tersor_k_sizes() -> str:
    from ..ops import HADAMARD_K_SIZES

    return ", ".join(map(str, HADAMARD_K_SIZES))
