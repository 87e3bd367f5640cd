"""``E8PLinear``: an ``nn.Linear`` whose weight is QuIP#-style E8P12 codes (2, 3 or 4 bits per weight)."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..ops import _hadamard_size_ok, e8p_decode, e8p_linear, hadamard_factor, hadamard_transform
from ..quant import quipsharp
from ..quant import quipsharp_hadamard as qh
from ._common import FLOATS, bias_param, check_bias, check_tensor, continuous_tensors, nbytes

_FLOAT32_MIN, _FLOAT32_MAX = torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max

# QuIP#'s codebook_id of each bit width (lib/codebook/__init__.py): E8P12, E8P12RVQ3B, E8P12RVQ4B.
QUIPSHARP_CODEBOOK_ID = quipsharp.CODEBOOK_ID


class E8PLinear(nn.Module):
    """``y = diag(SV * Wscale) U_m W^ U_n^T diag(SU) x + b`` with ``W^`` held as E8P12 codes (QuIP#'s
    ``Qidxs`` layouts) and ``U_k`` the orthonormal Hadamard transform (tersor.hadamard_transform).

    Forward: ``x * SU`` and the input Hadamard transform (tersor.hadamard_transform, fp32), the codes'
    GEMV (:func:`tersor.ops.e8p_linear`: fused decode + tensor-core GEMV on CUDA for <= 8 rows, x in
    fp16 there; lookup GEMV or decode + matmul on CPU), the output transform, ``* SV * Wscale`` and bias
    in fp32, returned in ``x``'s dtype. ``resid_scale`` (3/4-bit RVQ) defaults to QuIP#'s 2.04 / 3.45; a
    value <= 0 (QuIP#'s saved ``resid_scale_override = -1``) also means the default.

    The state declares its layout (keys: :data:`tersor.quant.quipsharp.STATE_KEYS_DOC`, docs/formats.md):

    - the bit width from ``state["codebook_id"]`` (QuIP#'s ids 7 / 18 / 17 for 2 / 3 / 4 bits) or ``bits``
      (ValueError if they disagree, and one naming the missing ``codebook_id`` if neither is given: the
      width of ``Qidxs`` is not trusted alone, since an SU of the wrong length reads it at another width);
    - ``U_k`` for a dimension ``k = K * 2^j`` that is not a power of two from ``state["hadamard"]`` or
      ``hadamard``: ``"tersor"`` (tersor's own ``H_K``, what tersor's quantizer uses) or ``"quipsharp"``
      (QuIP#'s ``H_K`` from :mod:`tersor.quant.quipsharp_hadamard`: the FWHT on the 2^j axis, then a dense
      K x K matmul, about K * k extra multiply-adds per row). ValueError if the two disagree, and if neither
      says at such a size. For powers of two both are the same Sylvester transform.

    Every argument is checked here (TypeError for dtypes, ValueError for shapes and values); ``Qidxs`` must
    be int64 (QuIP#'s packed 64-bit words). ``Qidxs``, ``SU`` and ``SV`` are kept as given (aliased, no
    copy); ``Wscale`` becomes an fp32 scalar; ``bias`` is always copied. The layer's state dict carries
    ``codebook_id`` (int64 scalar, as QuIP#'s does), so ``E8PLinear(layer.state_dict())`` rebuilds it at
    power-of-two sizes (pass ``hadamard=`` for K * 2^j sizes: the convention is in ``layer_config()``).

    **Gradients** (issue 18, fine-tuning): ``SU``, ``SV``, ``Wscale`` and ``bias`` are the layer's continuous
    parameters (:meth:`continuous_tensors`); the codes ``Qidxs`` stay fixed. They are buffers (and the bias a
    Parameter) with ``requires_grad=False``, so inference is unchanged; call ``t.requires_grad_(True)`` on the
    ones to train (float32 copies are best: ``quantize_``'s block fine-tuning trains float32 copies and
    rounds them back to the stored dtype). The forward is the same code either way: the Hadamard transforms
    have their own backward, and ``tersor::e8p_linear`` has one registered in :mod:`tersor.ops` (the input
    gradient ``grad @ W^`` from ``tersor::e8p_decode``, on the CPU and on CUDA), so the gradients of the
    scales are those of the exact forward with no dense weight kept between the passes. SU and SV train as
    real vectors (QuIP#'s fine-tuning does the same: they start as random signs).
    """

    tersor_format = "e8p"
    CONTINUOUS = ("SU", "SV", "Wscale")

    def __init__(self, state: dict[str, torch.Tensor], bias: Optional[torch.Tensor] = None,
                 resid_scale: Optional[float] = None, hadamard: Optional[str] = None, bits: Optional[int] = None):
        super().__init__()
        what = "E8PLinear"
        if hadamard is not None and hadamard not in quipsharp.HADAMARD_CONVENTIONS:
            raise ValueError(f"E8PLinear: hadamard must be 'tersor' or 'quipsharp' (or None: the state's), got "
                             f"{hadamard!r}")
        qidxs = quipsharp.check_qidxs(quipsharp.check_state(state, what)["Qidxs"], what)
        su = check_tensor(state["SU"], "SU", what, dtypes=FLOATS, dim=1)
        sv = check_tensor(state["SV"], "SV", what, dtypes=FLOATS, dim=1)
        self.in_features, self.out_features = su.numel(), sv.numel()
        n, m = self.in_features, self.out_features
        # consistency first (SV/SU against Qidxs at the declared width), then the transform's sizes
        self.bits = quipsharp.check_layout(qidxs, n, m, quipsharp.resolve_bits(state, bits, what), what,
                                           "codebook_id" in state)
        hadamard = quipsharp.resolve_hadamard(state, hadamard, n, m, what)
        for side, k in (("in_features (len(SU))", n), ("out_features (len(SV))", m)):
            if hadamard == "quipsharp":
                try:
                    kk = qh.quipsharp_factor(k)[0]
                except ValueError as err:
                    raise ValueError(f"E8PLinear: {side}: {err}") from None
                if kk > 1 and kk not in qh.available_quipsharp_k():
                    try:
                        qh.quipsharp_hadamard_k(kk)
                    except qh.QuipSharpHadamardUnavailable as err:
                        raise qh.QuipSharpHadamardUnavailable(
                            f"E8PLinear: {side} = {k} = {kk} * {k // kk} is not a power of two; {err}") from None
            elif not _hadamard_size_ok(k):
                raise ValueError(f"E8PLinear: {side} = {k} is not a size tersor.hadamard_transform supports "
                                 f"(2^k or K * 2^k, K in {tersor_k_sizes()})")
        wscale = quipsharp.check_wscale(state.get("Wscale"), what)
        bias = state.get("bias") if bias is None else bias  # a saved state dict carries it
        check_bias(bias, m, "E8PLinear")
        self.register_buffer("Qidxs", qidxs)
        self.register_buffer("SU", su)
        self.register_buffer("SV", sv)
        self.register_buffer("Wscale", wscale.reshape(()).float())
        self.register_buffer("codebook_id", torch.tensor(QUIPSHARP_CODEBOOK_ID[self.bits], device=qidxs.device))
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
        if resid_scale is None and "resid_scale" in state:
            rs = state["resid_scale"]
            if isinstance(rs, torch.Tensor):
                check_tensor(rs, "resid_scale", "E8PLinear", dtypes=FLOATS + (torch.float64,))
                if rs.numel() != 1:
                    raise ValueError(f"E8PLinear: resid_scale must be a scalar, got shape {list(rs.shape)}")
            resid_scale = float(rs)
        if resid_scale is not None:
            if not math.isfinite(float(resid_scale)):
                raise ValueError(f"E8PLinear: resid_scale must be finite (<= 0: QuIP#'s default), got {resid_scale}")
            if float(resid_scale) <= 0:  # QuIP#'s resid_scale_override = -1: "use the default"
                resid_scale = None
            # Checked as the kernels use it, a float32: a float64 like 1e-300 or 1e300 would round to 0 or inf there.
            elif not (_FLOAT32_MIN <= float(resid_scale) <= _FLOAT32_MAX):
                raise ValueError(f"E8PLinear: resid_scale must be a normal float32 ({_FLOAT32_MIN:.3g} .. "
                                 f"{_FLOAT32_MAX:.3g}; <= 0: QuIP#'s default), got {resid_scale}")
        default = quipsharp.RESID_SCALE.get(self.bits, 1.0)
        self.register_buffer("resid_scale", torch.tensor(float(default if resid_scale is None else resid_scale)))
        self._resid = float(self.resid_scale)  # a Python float for forward: no device sync, no graph break

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "codebook_id"
        if key in state_dict:
            try:
                b = quipsharp.codebook_bits(state_dict[key], f"{type(self).__name__}.load_state_dict")
            except (TypeError, ValueError) as err:
                error_msgs.append(str(err))
            else:
                if b != self.bits:
                    error_msgs.append(f"{key}: codebook_id {QUIPSHARP_CODEBOOK_ID[b]} ({b} bits), but the layer holds "
                                      f"{self.bits}-bit codes")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if key not in state_dict and key in missing_keys:
            # state dicts saved before layers carried codebook_id: Qidxs' shape is this layer's, so is the width
            missing_keys.remove(key)
        self._resid = float(self.resid_scale)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 2, hessian: Optional[torch.Tensor] = None,
                    seed: int = 0, tune_passes: int = quipsharp.TUNE_PASSES) -> "E8PLinear":
        """Quantizes ``linear.weight`` with :func:`tersor.quant.quantize_e8p` (``hessian``: the input second
        moment ``E[x x^T]`` for LDLQ)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear: expected nn.Linear, got {type(linear).__name__}")
        if linear.weight.dtype not in FLOATS:
            raise TypeError(f"E8PLinear.from_linear: the weight must be float32, float16 or bfloat16, got "
                            f"{linear.weight.dtype}")
        state = quipsharp.quantize_e8p(linear.weight.detach().float(), bits=bits, hessian=hessian, seed=seed,
                                       tune_passes=tune_passes)
        return cls(state, linear.bias)

    @classmethod
    def from_quipsharp(cls, state: dict[str, torch.Tensor], resid_scale_override: Optional[float] = None,
                       bits: Optional[int] = None) -> "E8PLinear":
        """A layer from one QuIP# ``QuantizedLinear``'s tensors (``Qidxs``, ``SU``, ``SV``, optional ``Wscale``,
        ``bias``, ``scaleWH``, ``codebook_id``; the prefix already stripped), computing QuIP#'s
        ``y = SV Wscale U_m W^ U_n^T (SU x / scaleWH) + bias`` with QuIP#'s transforms (``hadamard="quipsharp"``).

        - ``Qidxs`` must be int64 (TypeError otherwise: it holds packed 64-bit words).
        - The bit width comes from ``codebook_id`` or ``bits`` (e.g. from quant_config's ``codebook``);
          ValueError naming the missing ``codebook_id`` when neither is given.
        - ``resid_scale_override``: the checkpoint's ``quip_params.resid_scale_override``; any value <= 0
          (QuIP#'s saved -1) means QuIP#'s default.
        - Fused layers (``fuse_scales``: qkv_proj, upgate_proj) are refused here: they are
          :class:`tersor.api.quipsharp_ckpt.E8PFusedLinear`'s (and :func:`tersor.load_quipsharp_layers`').
        - A dimension K * 2^k needs QuIP#'s ``H_K`` (:mod:`tersor.quant.quipsharp_hadamard`)."""
        return cls(**cls._quipsharp_args(state, resid_scale_override, "from_quipsharp", bits=bits))

    @classmethod
    def _quipsharp_args(cls, state: dict, resid_scale_override: Optional[float], what: str,
                        allow_fused: bool = False, bits: Optional[int] = None) -> dict:
        quipsharp.check_state(state, what)
        if "fuse_scales" in state and not allow_fused:
            raise ValueError(
                f"{what}: fused QuIP# layers (a state with fuse_scales: qkv_proj, upgate_proj) are not single "
                "linears. Load the whole fused layer: tersor.load_quipsharp_layers(model, state_dict) registers it as "
                "an E8PFusedLinear and puts an E8PFusedPart in place of each part, or build "
                "tersor.api.quipsharp_ckpt.E8PFusedLinear(state, fuse_sizes), whose forward returns each part's "
                "output times its fuse_scales. Splitting Qidxs/SV by output rows does not work: the output Hadamard "
                "transform mixes all rows of the fused layer")
        for key in ("SU", "SV"):
            check_tensor(state[key], key, what, dtypes=FLOATS, dim=1)
        qidxs = quipsharp.check_qidxs(state["Qidxs"], what)  # int64 only: never cast before checking
        su = state["SU"].float()
        if "scaleWH" in state:
            swh = check_tensor(state["scaleWH"], "scaleWH", what, dtypes=FLOATS, shape=(su.numel(),))
            su = su / swh.float()  # QuIP# divides x by scaleWH before the SU multiply
        wscale = quipsharp.check_wscale(state.get("Wscale"), what)
        new = {"Qidxs": qidxs, "SU": su, "SV": state["SV"].float(), "Wscale": wscale.float()}
        for key in ("codebook_id", "hadamard"):
            if key in state:
                new[key] = state[key]
        rso = resid_scale_override
        if rso is not None and (isinstance(rso, bool) or not isinstance(rso, (int, float))):
            raise TypeError(f"{what}: resid_scale_override must be a number, got {rso!r}")
        rso = float(rso) if rso is not None and rso > 0 else None  # QuIP#'s -1 (any value <= 0): the default
        return {"state": new, "bias": state.get("bias"), "resid_scale": rso, "hadamard": "quipsharp", "bits": bits}

    def continuous_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors fine-tuning may train (``SU``, ``SV``, ``Wscale`` and the bias if any), by name; the
        codes are not among them."""
        return continuous_tensors(self)

    def layer_config(self) -> dict:
        """What tersor checkpoints record about this layer (docs/formats.md, tersor checkpoint v1)."""
        return {"bits": self.bits, "resid_scale": self._resid, "hadamard": self.hadamard}

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
