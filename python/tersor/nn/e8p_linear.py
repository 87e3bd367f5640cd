"""``E8PLinear``: an ``nn.Linear`` whose weight is QuIP#-style E8P12 codes (2, 3 or 4 bits per weight)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops import _hadamard_size_ok, e8p_decode, e8p_linear, hadamard_factor, hadamard_transform
from ..quant import quipsharp
from ..quant import quipsharp_hadamard as qh
from ._common import FLOATS, bias_param, check_bias, check_tensor, nbytes

_FLOAT32_MIN, _FLOAT32_MAX = torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max

# QuIP#'s codebook_id of each bit width (lib/codebook/__init__.py): E8P12, E8P12RVQ3B, E8P12RVQ4B.
QUIPSHARP_CODEBOOK_ID = {2: 7, 3: 18, 4: 17}


class E8PLinear(nn.Module):
    """``y = diag(SV * Wscale) U_m W^ U_n^T diag(SU) x + b`` with ``W^`` held as E8P12 codes (QuIP#'s
    ``Qidxs`` layouts) and ``U_k`` the orthonormal Hadamard transform (tersor.hadamard_transform).

    Forward: ``x * SU`` and the input Hadamard transform (tersor.hadamard_transform, fp32), the codes'
    GEMV (:func:`tersor.ops.e8p_linear`: fused decode + tensor-core GEMV on CUDA for <= 8 rows, x in
    fp16 there; lookup GEMV or decode + matmul on CPU), the output transform, ``* SV * Wscale`` and bias
    in fp32, returned in ``x``'s dtype. ``resid_scale`` (3/4-bit RVQ) defaults to QuIP#'s 2.04 / 3.45.

    ``hadamard`` chooses ``U_k`` for a dimension ``k = K * 2^j`` that is not a power of two: ``"tersor"`` (the
    default; tersor's own ``H_K``, what tersor's quantizer uses) or ``"quipsharp"`` (QuIP#'s ``H_K`` from
    :mod:`tersor.quant.quipsharp_hadamard`: the FWHT of tersor.hadamard_transform on the 2^j axis, then a dense
    K x K matmul, about K * k extra multiply-adds per row; QuipSharpHadamardUnavailable, a NotImplementedError
    and ValueError, when that matrix is not available). For powers of two both are the same Sylvester transform.

    Every argument is checked here (TypeError for dtypes, ValueError for shapes and values). ``Qidxs``,
    ``SU`` and ``SV`` are kept as given (aliased, no copy); ``Wscale`` becomes an fp32 scalar; ``bias`` is
    always copied.
    """

    tersor_format = "e8p"

    def __init__(self, state: dict[str, torch.Tensor], bias: Optional[torch.Tensor] = None,
                 resid_scale: Optional[float] = None, hadamard: str = "tersor"):
        super().__init__()
        if hadamard not in ("tersor", "quipsharp"):
            raise ValueError(f"E8PLinear: hadamard must be 'tersor' or 'quipsharp', got {hadamard!r}")
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
            if hadamard == "quipsharp":
                try:
                    kk = qh.quipsharp_factor(k)[0]
                except ValueError as err:
                    raise ValueError(f"E8PLinear: {what}: {err}") from None
                if kk > 1 and kk not in qh.available_quipsharp_k():
                    try:
                        qh.quipsharp_hadamard_k(kk)
                    except qh.QuipSharpHadamardUnavailable as err:
                        raise qh.QuipSharpHadamardUnavailable(
                            f"E8PLinear: {what} = {k} = {kk} * {k // kk} is not a power of two; {err}") from None
            elif not _hadamard_size_ok(k):
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
        self.hadamard = hadamard
        # QuIP#'s H_K of each side (None: a power of two, or tersor's own transform). Not saved: like QuIP#'s
        # had_left_T / had_right they follow from the sizes.
        self._k_in = self._k_out = 1
        had = {}
        if hadamard == "quipsharp":
            for side, k in (("in", n), ("out", m)):
                kk = qh.quipsharp_factor(k)[0]
                if kk > 1:
                    had[side] = qh.quipsharp_hadamard_k(kk)
            self._k_in = qh.quipsharp_factor(n)[0]
            self._k_out = qh.quipsharp_factor(m)[0]
        self.register_buffer("had_in", had.get("in"), persistent=False)
        self.register_buffer("had_out", had.get("out"), persistent=False)
        self.bias = bias_param(bias)
        self.bits = self._bits()
        if resid_scale is None and "resid_scale" in state:
            rs = state["resid_scale"]
            if isinstance(rs, torch.Tensor):
                check_tensor(rs, "resid_scale", "E8PLinear", dtypes=FLOATS + (torch.float64,))
                if rs.numel() != 1:
                    raise ValueError(f"E8PLinear: resid_scale must be a scalar, got shape {list(rs.shape)}")
            resid_scale = float(rs)
        # Checked as the kernels use it, a float32: a float64 like 1e-300 or 1e300 would round to 0 or inf there.
        if resid_scale is not None and not (_FLOAT32_MIN <= float(resid_scale) <= _FLOAT32_MAX):
            raise ValueError(f"E8PLinear: resid_scale must be positive, finite and a normal float32 "
                             f"({_FLOAT32_MIN:.3g} .. {_FLOAT32_MAX:.3g}), got {resid_scale}")
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
        ``y = SV Wscale U_m W^ U_n^T (SU x / scaleWH) + bias`` with QuIP#'s transforms (``hadamard="quipsharp"``).
        ``resid_scale_override``: the checkpoint's ``quip_params.resid_scale_override`` when > 0. Fused layers
        (``fuse_scales``: qkv_proj, upgate_proj) are :class:`tersor.api.quipsharp_ckpt.E8PFusedLinear`'s (and
        :func:`tersor.load_quipsharp_layers`'); a dimension K * 2^k that is not a power of two needs QuIP#'s
        ``H_K`` (:mod:`tersor.quant.quipsharp_hadamard`), else QuipSharpHadamardUnavailable."""
        layer = cls(**cls._quipsharp_args(state, resid_scale_override, "from_quipsharp"))
        layer._check_codebook_id(state, "from_quipsharp")
        return layer

    def _check_codebook_id(self, state: dict, what: str) -> None:
        if "codebook_id" in state and int(state["codebook_id"]) != QUIPSHARP_CODEBOOK_ID[self.bits]:
            raise ValueError(f"{what}: codebook_id {int(state['codebook_id'])} does not match the {self.bits}-bit "
                             f"layout of Qidxs (expected {QUIPSHARP_CODEBOOK_ID[self.bits]})")

    @classmethod
    def _quipsharp_args(cls, state: dict, resid_scale_override: Optional[float], what: str,
                        allow_fused: bool = False) -> dict:
        if not isinstance(state, dict):
            raise TypeError(f"{what}: state must be a dict of tensors, got {type(state).__name__}")
        for key in ("Qidxs", "SU", "SV"):
            if key not in state:
                raise ValueError(f"{what}: missing tensor {key!r} (have {sorted(state)})")
        if "fuse_scales" in state and not allow_fused:
            raise ValueError(f"{what}: fused QuIP# layers (fuse_scales: qkv_proj, upgate_proj) are not single "
                             "layers; load them with tersor.load_quipsharp_layers (E8PFusedLinear)")
        for key in ("SU", "SV"):
            check_tensor(state[key], key, what, dtypes=FLOATS, dim=1)
        check_tensor(state["Qidxs"], "Qidxs", what, dtypes=(torch.int64, torch.int32, torch.int16), dim=2)
        su = state["SU"].float()
        if "scaleWH" in state:
            swh = check_tensor(state["scaleWH"], "scaleWH", what, dtypes=FLOATS, shape=(su.numel(),))
            su = su / swh.float()  # QuIP# divides x by scaleWH before the SU multiply
        if "Wscale" in state:
            check_tensor(state["Wscale"], "Wscale", what, dtypes=FLOATS)
        args = {"state": {"Qidxs": state["Qidxs"].to(torch.int64), "SU": su, "SV": state["SV"].float(),
                          "Wscale": state.get("Wscale", torch.ones(())).float()},
                "bias": state.get("bias"), "resid_scale": resid_scale_override if resid_scale_override else None,
                "hadamard": "quipsharp"}
        return args

    def layer_config(self) -> dict:
        """What tersor checkpoints record about this layer (docs/formats.md, tersor checkpoint v1)."""
        cfg = {"bits": self.bits, "resid_scale": self._resid}
        if self.hadamard != "tersor":
            cfg["hadamard"] = self.hadamard
        return cfg

    def _rot_in(self, x: torch.Tensor) -> torch.Tensor:
        # U_n^T x over the last dimension, fp32
        if self.had_in is None:
            return hadamard_transform(x.float(), transpose=True)
        return qh.quipsharp_hadamard(x, self.had_in, transpose=True)

    def _rot_out(self, z: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        # U_m z over the last dimension, fp32
        if self.had_out is None:
            return hadamard_transform(z.float(), transpose=transpose)
        return qh.quipsharp_hadamard(z, self.had_out, transpose=transpose)

    def decoded_codes(self) -> torch.Tensor:
        """``W^`` (fp32 [m, n]): the codebook values before the rotations and scales."""
        return e8p_decode(self.Qidxs, self.in_features, self._resid)

    def dequantize(self) -> torch.Tensor:
        """The dense fp32 weight [m, n] this layer multiplies by."""
        if self.had_in is None and self.had_out is None:
            return quipsharp.unrht(self.decoded_codes() * self.Wscale, self.SU, self.SV)
        a = self.decoded_codes() * self.Wscale
        if self.had_in is None:
            a = hadamard_transform(a)  # rows: W^ U_n^T
        else:
            a = qh.quipsharp_hadamard(a, self.had_in)
        a = self._rot_out(a.t().contiguous()).t()  # U_m (W^ U_n^T)
        return a * self.SU.float()[None, :] * self.SV.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"E8PLinear: x has {x.shape[-1]} features, the layer expects {self.in_features}")
        xr = self._rot_in(x.float() * self.SU.float())  # U_n^T diag(SU) x
        z = e8p_linear(xr, self.Qidxs, self.in_features, self._resid)
        y = self._rot_out(z) * (self.SV.float() * self.Wscale)  # diag(SV Wscale) U_m z
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        had = "" if self.hadamard == "tersor" else f", hadamard='{self.hadamard}'"
        return (f"in_features={self.in_features}, out_features={self.out_features}, format='e8p', bits={self.bits}, "
                f"bias={self.bias is not None}{had}, nbytes={nbytes(self)}")


def tersor_k_sizes() -> str:
    from ..ops import HADAMARD_K_SIZES

    return ", ".join(map(str, HADAMARD_K_SIZES))
