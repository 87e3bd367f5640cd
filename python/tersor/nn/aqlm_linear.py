"""``AQLMLinear``: an ``nn.Linear`` whose weight is AQLM additive codebooks (1x16, 2x8, ... with groups of 8)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..ops import aqlm_decode, aqlm_linear
from ..quant import aqlm as aqlm_quant
from ._common import FLOATS, bias_param, check_bias, check_tensor, continuous_tensors, nbytes

MAX_CODEBOOKS = 8  # what the CPU and CUDA kernels take (csrc/codebook/codebook_glue.h)
_OWNER = "AQLMLinear"


def _owned(t: torch.Tensor, given: torch.Tensor) -> torch.Tensor:
    """``t`` if it is already a new tensor, else a copy: a layer never shares memory with the caller's tensors."""
    if t.device.type != "meta" and t.untyped_storage().data_ptr() == given.untyped_storage().data_ptr():
        return t.clone(memory_format=torch.contiguous_format)
    return t.contiguous()


def _canonical_codes(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """The codes in the storage the kernels read (int8 for nbits <= 8, int16 above), same entries.

    int8 / int16 (AQLM's own storage): every value is valid and names entry ``code mod 2^nbits`` (AQLM's
    ``unpack_int_data``, and what its kernels read). int32 / int64 (which AQLM never writes): a code must be
    an entry index ``[0, 2^nbits)`` or its signed (``pack_int_data``) form ``[-2^(nbits-1), 0)``, i.e. lie in
    ``[-2^(nbits-1), 2^nbits)``; anything else is a ValueError instead of a silent wrap."""
    entries = 1 << nbits
    if codes.dtype in (torch.int32, torch.int64):
        if codes.device.type != "meta" and codes.numel():
            lo, hi = int(codes.min()), int(codes.max())
            if lo < -(entries >> 1) or hi >= entries:
                raise ValueError(f"{_OWNER}: {str(codes.dtype).replace('torch.', '')} codes of {entries}-entry "
                                 f"codebooks must lie in [{-(entries >> 1)}, {entries}) (an entry index or its "
                                 f"signed form), got range [{lo}, {hi}]")
    elif codes.dtype == torch.int8 or (codes.dtype == torch.int16 and nbits > 8):
        return codes  # already the kernels' storage
    # int16 codes of <= 8-bit codebooks, int32/int64 codes: the same entry, stored signed in int8/int16
    # (AQLM's pack_int_data form: entries >= 2^(nbits-1) stored as entry - 2^nbits)
    idx = codes.to(torch.int32) & (entries - 1)
    return torch.where(idx >= entries >> 1, idx - entries, idx).to(torch.int8 if nbits <= 8 else torch.int16)


def _validate(codes, codebooks, scales, bias):
    """The tensors the layer will hold (converted where the kernels need another layout; always new
    memory, never the caller's) after checking every one of them: TypeError for dtypes, ValueError for
    shapes and values, RuntimeError for devices."""
    check_tensor(codes, "codes", _OWNER, dtypes=(torch.int8, torch.int16, torch.int32, torch.int64), dim=3)
    check_tensor(codebooks, "codebooks", _OWNER, dtypes=FLOATS, dim=4)
    out, groups, num_codebooks = (int(s) for s in codes.shape)
    if out <= 0 or groups <= 0:
        raise ValueError(f"{_OWNER}: codes must be [out_features, in_features / 8, num_codebooks] with positive "
                         f"sizes, got {list(codes.shape)}")
    c, entries, og, ig = (int(s) for s in codebooks.shape)
    if (og, ig) != (1, 8):
        raise ValueError(f"{_OWNER}: codebooks must be [num_codebooks, 2^nbits, 1, 8] (out_group_size 1, "
                         f"in_group_size 8), got {list(codebooks.shape)}")
    if not 1 <= c <= MAX_CODEBOOKS:
        raise ValueError(f"{_OWNER}: codebooks must be [num_codebooks, 2^nbits, 1, 8] with 1 <= num_codebooks <= "
                         f"{MAX_CODEBOOKS}, got {c} codebooks")
    if entries < 2 or entries > 65536 or entries & (entries - 1):
        raise ValueError(f"{_OWNER}: codebooks must be [num_codebooks, 2^nbits, 1, 8] with 1 <= nbits <= 16, got "
                         f"{entries} entries per codebook")
    if num_codebooks != c:
        raise ValueError(f"{_OWNER}: codes must be [{out}, {groups}, {c}] (one column per codebook), got "
                         f"{list(codes.shape)}")
    nbits = entries.bit_length() - 1
    if codes.dtype == torch.int8 and nbits > 8:
        raise TypeError(f"{_OWNER}: codes must be int16, int32 or int64 for {entries}-entry codebooks, got int8")
    check_tensor(scales, "scales", _OWNER, dtypes=FLOATS)
    given_scales = scales
    if tuple(scales.shape) == (1, 1, 1, 1) and out != 1:
        scales = scales.expand(out, 1, 1, 1)  # AQLM's broadcast scale: one per output row, as the kernels read it
    check_tensor(scales, "scales", _OWNER, shape=(out, 1, 1, 1))
    check_bias(bias, out, _OWNER)
    for name, t in (("codebooks", codebooks), ("scales", scales), ("bias", bias)):
        if t is not None and t.device != codes.device:
            raise RuntimeError(f"{_OWNER}: {name} is on {t.device}, codes on {codes.device}")
    new_codes = _canonical_codes(codes, nbits)
    return (_owned(new_codes, codes), _owned(codebooks, codebooks), _owned(scales, given_scales), nbits)


class AQLMLinear(nn.Module):
    """``y = x W^T + b`` with ``W[o, 8j:8j+8] = scales[o] * sum_c codebooks[c][codes[o, j, c] mod 2^b]``, the
    tensors named and shaped as AQLM checkpoints store them (``codes`` [out, in/8, C], ``codebooks``
    [C, 2^b, 1, 8], ``scales`` [out, 1, 1, 1] or AQLM's broadcast [1, 1, 1, 1]). Forward:
    :func:`tersor.ops.aqlm_linear` (a lookup-table / fused decode GEMV for few rows of x, decode + matmul
    otherwise; fp32 accumulation, output in x's dtype, so one layer serves float32, float16 and bfloat16
    models).

    Every argument is checked here (TypeError for dtypes, ValueError for shapes and values): a layer that
    constructs runs.

    **Codes** (what AQLM accepts): int8 or int16 (AQLM's storage; int16 also for <= 8-bit codebooks): every
    value is valid and names entry ``code mod 2^b``, as in AQLM's ``unpack_int_data`` and kernels. int32 or
    int64: each code must be an entry index in ``[0, 2^b)`` or its signed form in ``[-2^(b-1), 0)``
    (what AQLM's ``pack_int_data`` stores); a code outside ``[-2^(b-1), 2^b)`` is a ValueError naming
    ``codes``, never a silent wrap. The layer stores int8 (b <= 8) or int16 codes (the same entries).

    **Copies, no aliasing**: ``codes``, ``codebooks``, ``scales`` and ``bias`` are copied (or converted
    into new memory) at construction, so the layer never shares memory with the caller. AQLM's own CPU
    forward rewrites its ``codes`` in place; a layer built from those tensors keeps the values they had
    when it was built.

    **One difference from AQLM**: the sum over codebooks, the scaling and the matmul run in fp32 and are
    rounded once to x's dtype, so a 2x8 float16 codebook sum that overflows float16 (|sum| > 65504) gives a
    finite result here where AQLM's float16 arithmetic gives inf.

    **Gradients** (issue 18, fine-tuning): ``codebooks``, ``scales`` and ``bias`` are the continuous parameters
    (:meth:`continuous_tensors`); the integer ``codes`` stay fixed. They are buffers (the bias a Parameter)
    with ``requires_grad=False``, so inference is unchanged; ``t.requires_grad_(True)`` on the ones to train.
    ``tersor::aqlm_linear`` has a backward registered in :mod:`tersor.ops`: the forward keeps its fused
    kernels and the backward decodes the weight once (``tersor::aqlm_decode``, CPU and CUDA) for the input
    gradient, forms ``dL/dW = grad^T x`` and reduces it to the scales (a row sum against the unscaled
    weight) and to the codebooks (a scatter-add over the codes). Chosen over a differentiable decode in
    PyTorch (a gather of [out, in/8, C, 8]) because nothing of the weight's size is kept between forward
    and backward.
    """

    tersor_format = "aqlm"
    CONTINUOUS = ("codebooks", "scales")

    def __init__(self, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                 bias: Optional[torch.Tensor] = None):
        super().__init__()
        codes, codebooks, scales, nbits = _validate(codes, codebooks, scales, bias)
        self.register_buffer("codes", codes)
        self.register_buffer("codebooks", codebooks)
        self.register_buffer("scales", scales)
        self.bias = bias_param(bias)
        self.out_features, self.in_features = codes.shape[0], codes.shape[1] * 8
        self.num_codebooks, self.nbits = codebooks.shape[0], nbits

    @classmethod
    def from_aqlm(cls, layer: Any = None, *, codes: Optional[torch.Tensor] = None,
                  codebooks: Optional[torch.Tensor] = None, scales: Optional[torch.Tensor] = None,
                  bias: Optional[torch.Tensor] = None) -> "AQLMLinear":
        """A layer from one AQLM ``QuantizedLinear`` (out_group_size 1, in_group_size 8): either the layer
        object itself (anything with attributes ``codes``, ``codebooks``, ``scales``, ``bias`` and optionally
        ``in_features``, ``out_features``, ``in_group_size``, ``out_group_size``, ``num_codebooks``,
        ``nbits_per_codebook``, which are checked against the tensors), or its tensors as keywords."""
        if layer is not None:
            if any(t is not None for t in (codes, codebooks, scales, bias)):
                raise ValueError("AQLMLinear.from_aqlm: pass either an AQLM layer or codes=/codebooks=/scales=/bias=, "
                                 "not both")
            missing = [a for a in ("codes", "codebooks", "scales") if getattr(layer, a, None) is None]
            if missing:
                raise TypeError(f"AQLMLinear.from_aqlm: expected an AQLM QuantizedLinear-like object, "
                                f"{type(layer).__name__} has no {', '.join(missing)}")

            def plain(t):
                return t.detach() if isinstance(t, torch.Tensor) else t

            codes, codebooks, scales = plain(layer.codes), plain(layer.codebooks), plain(layer.scales)
            bias = plain(getattr(layer, "bias", None))
            out = cls(codes, codebooks, scales, bias)
            expect = {"in_group_size": 8, "out_group_size": 1, "in_features": out.in_features,
                      "out_features": out.out_features, "num_codebooks": out.num_codebooks,
                      "nbits_per_codebook": out.nbits}
            for attr, want in expect.items():
                got = getattr(layer, attr, None)
                if got is not None and int(got) != want:
                    raise ValueError(f"AQLMLinear.from_aqlm: the layer's {attr} is {int(got)}, its tensors (codes "
                                     f"{list(codes.shape)}, codebooks {list(codebooks.shape)}) need {want}")
            return out
        if codes is None or codebooks is None or scales is None:
            raise ValueError("AQLMLinear.from_aqlm: needs an AQLM layer or codes=, codebooks= and scales=")
        return cls(codes, codebooks, scales, bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, num_codebooks: int = 2, nbits: int = 8, **quantize_kwargs) -> "AQLMLinear":
        """Quantizes ``linear.weight`` with :func:`tersor.quant.quantize_aqlm` (1x16: ``num_codebooks=1,
        nbits=16``; 2x8: the default), groups of 8 inputs. ``codebook_dtype`` defaults to bfloat16 for a
        bfloat16 layer, float16 otherwise (AQLM's own choice; the layer still returns x's dtype)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear: expected nn.Linear, got {type(linear).__name__}")
        if linear.weight.dtype not in FLOATS:
            raise TypeError(f"AQLMLinear.from_linear: the weight must be float32, float16 or bfloat16, got "
                            f"{linear.weight.dtype}")
        quantize_kwargs.setdefault("codebook_dtype", torch.bfloat16 if linear.weight.dtype == torch.bfloat16
                                   else torch.float16)
        q = aqlm_quant.quantize_aqlm(linear.weight.detach().float(), num_codebooks=num_codebooks, nbits=nbits,
                                     in_group_size=8, out_group_size=1, **quantize_kwargs)
        return cls(q["codes"], q["codebooks"], q["scales"], linear.bias)

    def continuous_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors fine-tuning may train (``codebooks``, ``scales`` and the bias if any), by name; the
        codes are not among them."""
        return continuous_tensors(self)

    def layer_config(self) -> dict:
        """What tersor checkpoints record about this layer (docs/formats.md, tersor checkpoint v1)."""
        return {"num_codebooks": self.num_codebooks, "nbits": self.nbits, "in_group_size": 8, "out_group_size": 1}

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dense weight [out, in] (fp32 arithmetic, rounded once to ``dtype``; default the codebooks')."""
        return aqlm_decode(self.codes, self.codebooks, self.scales, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"AQLMLinear: x has {x.shape[-1]} features, the layer expects {self.in_features}")
        return aqlm_linear(x, self.codes, self.codebooks, self.scales, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format='aqlm', "
                f"codebooks={self.num_codebooks}x{self.nbits}, bias={self.bias is not None}, nbytes={nbytes(self)}")
