"""``SparseLinear``: an ``nn.Linear`` whose weight is structurally sparse (2:4 semi-structured or block-sparse)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..sparse import bsr as bsr_mod
from ..sparse import semi_structured as s24
from ._common import FLOATS, check_bias, check_int, nbytes

PATTERNS = ("2:4", "bsr")


class SparseLinear(nn.Module):
    """``y = x W^T + b`` with a structurally sparse ``W [out, in]``.

    ``pattern="2:4"``: W is stored in 2:4 format v1 (buffers ``values`` and ``meta``, see
    :mod:`tersor.sparse`); forward is :func:`tersor.sparse.linear_2_4` (fp32 accumulation, output in the
    layer's dtype). ``values_dtype`` (default: the layer's ``dtype``) is the dtype of the stored values:
    float16/bfloat16 layers store their own dtype (9/16 of the dense bytes). A **float32** layer stores float32
    values by default (17/32 of the dense bytes) and is **exact on the CPU**: x is not rounded, the product is
    ``F.linear`` with the pruned weight up to fp32 summation order. On a GPU the 2:4 tensor-core kernels take
    16-bit operands, so a float32 layer there computes with a cached bfloat16 copy of its values and x rounded
    to bfloat16 (fp32 accumulation, bias and output; documented conversion, :func:`tersor.sparse.linear_2_4`).
    ``values_dtype=torch.bfloat16`` on a float32 layer stores bfloat16 values (9/32 of the dense bytes; x is
    then rounded to bfloat16 on every device). ``state_dict()`` holds only tensors (``values``, ``meta``,
    ``bias``), so it round-trips through safetensors; loading validates the metadata
    (:func:`tersor.sparse.load_2_4`).

    ``pattern="bsr"``: W is stored as ``blocksize x blocksize`` blocks in BSR v1 (buffers ``crow_indices``,
    ``col_indices``, ``values``, ``schedule``, see :mod:`tersor.sparse.bsr`); forward is
    :func:`tersor.sparse.bsr_linear` (float32/float16/bfloat16, fp32 accumulation). The number of stored blocks
    is data-dependent: a fresh layer holds none (W = 0), and ``load_state_dict`` takes any block count, resizing
    the buffers and validating the weight (:func:`tersor.sparse.load_bsr`).
    """

    tersor_format = "sparse"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, pattern: str = "2:4",
                 dtype: torch.dtype = torch.float16, device=None, blocksize: int = 64,
                 values_dtype: Optional[torch.dtype] = None):
        super().__init__()
        if pattern not in PATTERNS:
            raise ValueError(f"SparseLinear: pattern must be one of {PATTERNS}, got {pattern!r}")
        check_int(in_features, "in_features", "SparseLinear")
        check_int(out_features, "out_features", "SparseLinear")
        if not isinstance(bias, bool):
            raise TypeError(f"SparseLinear: bias must be a bool (whether the layer has one), got {type(bias).__name__}")
        if dtype not in FLOATS:
            raise TypeError(f"SparseLinear: dtype must be float32, float16 or bfloat16, got {dtype}")
        self.pattern = pattern
        self.in_features, self.out_features = in_features, out_features
        self.io_dtype = dtype  # the dtype of x, the output and the bias
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None
        if pattern == "bsr":
            self.compute_dtype = dtype
            self._init_bsr(blocksize, dtype, device)
            return
        if values_dtype is None:
            values_dtype = dtype
        if values_dtype != dtype and not (dtype == torch.float32 and values_dtype == torch.bfloat16):
            raise TypeError(f"SparseLinear: values_dtype must be the layer's dtype {dtype} (or torch.bfloat16 for a "
                            f"float32 layer), got {values_dtype}")
        self.compute_dtype = dtype = values_dtype  # the stored values' dtype
        self._cuda_values = None  # (key, bfloat16 copy) for a float32 layer on a GPU, see forward
        if out_features <= 0 or out_features % s24.ROW_ALIGN or in_features <= 0 or in_features % s24.COL_ALIGN:
            raise ValueError(f"SparseLinear: 2:4 needs out_features % {s24.ROW_ALIGN} == 0 and in_features % "
                             f"{s24.COL_ALIGN} == 0, got out={out_features}, in={in_features}")
        self.register_buffer("values", torch.zeros(out_features // 16, in_features // 32, 256, dtype=dtype, device=device))
        # 0x44444444: every nibble keeps positions (0, 1), a valid all-zero weight.
        self.register_buffer("meta", torch.full((out_features // 16, in_features // 64, 32), 0x44444444,
                                                dtype=torch.int32, device=device))

    def _init_bsr(self, blocksize, dtype, device):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"SparseLinear: dtype must be float32, float16 or bfloat16 for pattern 'bsr', got {dtype}")
        bs = int(blocksize)
        if bs not in bsr_mod.BLOCKSIZES:
            raise ValueError(f"SparseLinear: blocksize must be one of {bsr_mod.BLOCKSIZES}, got {blocksize}")
        if self.out_features <= 0 or self.out_features % bs or self.in_features <= 0 or self.in_features % bs:
            raise ValueError(f"SparseLinear: 'bsr' needs out_features and in_features to be multiples of the "
                             f"blocksize {bs}, got out={self.out_features}, in={self.in_features}")
        self.blocksize = bs
        empty = bsr_mod.to_bsr(torch.zeros(self.out_features, self.in_features, dtype=dtype, device=device), bs)
        self._set_bsr(empty)

    def _set_bsr(self, w: "bsr_mod.BSRWeight"):
        for name in ("crow_indices", "col_indices", "values", "schedule"):
            self.register_buffer(name, getattr(w, name))

    @classmethod
    def from_linear(cls, linear: nn.Linear, pattern: str = "2:4", method: str = "magnitude",
                    act_norm: Optional[torch.Tensor] = None, dtype: Optional[torch.dtype] = None,
                    blocksize: int = 64, density: Optional[float] = None,
                    values_dtype: Optional[torch.dtype] = None) -> "SparseLinear":
        """``pattern="2:4"``: prunes ``linear.weight`` with :func:`tersor.sparse.prune_2_4` (``method`` ``"magnitude"`` or
        ``"wanda"`` with ``act_norm [in]``; scores from the original-precision weight) and packs it; the
        layer then equals ``F.linear(x, pruned_weight.to(dtype), bias.to(dtype))`` up to fp32-accumulation
        rounding. ``dtype`` defaults to the weight's dtype; ``values_dtype`` (float32 layers only:
        ``torch.bfloat16`` for the compact form) as in the class docstring.

        ``pattern="bsr"``: with ``density`` given, keeps that fraction of the ``blocksize x blocksize`` blocks
        (:func:`tersor.sparse.prune_blocks`, ``method``/``act_norm`` as above); with ``density=None`` the
        weight is taken as it is (already block-sparse) and only its all-zero blocks are dropped. The layer
        equals ``F.linear(x, pruned_weight.to(dtype), bias.to(dtype))`` up to fp32-accumulation rounding.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"SparseLinear.from_linear: expected nn.Linear, got {type(linear).__name__}")
        if pattern not in PATTERNS:
            raise ValueError(f"SparseLinear: pattern must be one of {PATTERNS}, got {pattern!r}")
        w = linear.weight.detach()
        dtype = dtype or w.dtype
        if w.dtype not in FLOATS:
            raise TypeError(f"SparseLinear.from_linear: the weight must be float32, float16 or bfloat16, got {w.dtype}")
        if pattern == "bsr":
            if values_dtype is not None:
                raise ValueError("SparseLinear.from_linear: values_dtype is for pattern '2:4'")
            layer = cls(linear.in_features, linear.out_features, linear.bias is not None, pattern, dtype, w.device,
                        blocksize=blocksize)
            if density is not None:
                w = bsr_mod.prune_blocks(w, blocksize, density, method, act_norm)
            elif method != "magnitude" or act_norm is not None:
                raise ValueError("SparseLinear.from_linear: method/act_norm need a density for pattern 'bsr'")
            layer._set_bsr(bsr_mod.to_bsr(w.to(dtype), blocksize))
            if linear.bias is not None:
                layer.bias.data.copy_(linear.bias.detach().to(dtype))
            return layer
        if density is not None:
            raise ValueError("SparseLinear.from_linear: density is for pattern 'bsr' (2:4 keeps exactly half)")
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, pattern, dtype, w.device,
                    values_dtype=values_dtype)
        packed = s24.compress_2_4(s24.prune_2_4(w, method, act_norm).to(layer.compute_dtype))
        layer.values.copy_(packed.values)
        layer.meta.copy_(packed.meta)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach().to(dtype))
        return layer

    @property
    def weight_2_4(self) -> s24.Sparse24Weight:
        if self.pattern != "2:4":
            raise ValueError("SparseLinear.weight_2_4: the layer's pattern is 'bsr' (use weight_bsr)")
        return s24.Sparse24Weight(self.values, self.meta)

    @property
    def weight_bsr(self) -> "bsr_mod.BSRWeight":
        if self.pattern != "bsr":
            raise ValueError("SparseLinear.weight_bsr: the layer's pattern is '2:4' (use weight_2_4)")
        return bsr_mod.BSRWeight(self.crow_indices, self.col_indices, self.values, self.schedule,
                                 (self.out_features, self.in_features))

    def dense_weight(self) -> torch.Tensor:
        """The dense ``[out, in]`` weight (zeros at pruned positions)."""
        if self.pattern == "bsr":
            return self.weight_bsr.to_dense()
        return s24.decompress_2_4(self.weight_2_4)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.pattern == "bsr":
            names = ("crow_indices", "col_indices", "values", "schedule")
            if all(prefix + n in state_dict for n in names):
                got = {n: state_dict[prefix + n] for n in names}
                w = bsr_mod.load_bsr({"format": "tersor.bsr", "version": bsr_mod.BSR_FORMAT_VERSION,
                                      "shape": [self.out_features, self.in_features], **got})
                if w.blocksize != self.blocksize:
                    raise ValueError(f"SparseLinear: state has blocksize {w.blocksize}, the layer {self.blocksize}")
                if w.dtype != self.values.dtype:  # load_state_dict's copy_ would convert it silently
                    raise TypeError(f"SparseLinear: state {prefix}values is {w.dtype}, the layer is {self.values.dtype}")
                # The block count is data-dependent: take the incoming sizes, then let nn.Module copy the data.
                for n in names:
                    self.register_buffer(n, torch.empty_like(getattr(self, n), memory_format=torch.contiguous_format)
                                         .resize_(got[n].shape))
        else:
            values, meta = state_dict.get(prefix + "values"), state_dict.get(prefix + "meta")
            if values is not None and meta is not None:
                s24.load_2_4(values, meta, (self.out_features, self.in_features))
                if values.dtype != self.values.dtype:  # load_state_dict's copy_ would convert it silently
                    raise TypeError(f"SparseLinear: state {prefix}values is {values.dtype}, the layer stores "
                                    f"{self.values.dtype} values (values_dtype)")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"SparseLinear: x has {x.shape[-1]} features, the layer expects {self.in_features}")
        if self.pattern == "bsr":
            return bsr_mod.bsr_linear(x, self.weight_bsr, self.bias)
        if self.io_dtype != self.compute_dtype:  # a float32 layer over bfloat16 values
            if x.dtype != self.io_dtype:
                raise TypeError(f"SparseLinear: x must be {self.io_dtype} (the layer's dtype), got {x.dtype}")
            y = s24.linear_2_4(x.to(self.compute_dtype), self.weight_2_4).to(self.io_dtype)
            return y if self.bias is None else y + self.bias
        if s24.float32_off_cpu(self.values):
            return s24.linear_2_4(x, self.weight_2_4, self.bias, cuda_values=self._bf16_values())
        return s24.linear_2_4(x, self.weight_2_4, self.bias)

    def _apply(self, fn, *args, **kwargs):
        self._cuda_values = None  # .to() / .cuda() / .half(): the cached copy belongs to the old tensor
        return super()._apply(fn, *args, **kwargs)

    def _bf16_values(self) -> torch.Tensor:
        # The bfloat16 copy a float32 layer computes with on a GPU, converted once per (storage, version) of
        # `values` rather than on every forward (a GEMV's worth of memory traffic). Traced code converts inline.
        if torch.compiler.is_compiling():
            return self.values.to(torch.bfloat16)
        key = (self.values.data_ptr(), self.values.device, self.values._version)
        if self._cuda_values is None or self._cuda_values[0] != key:
            self._cuda_values = (key, self.values.to(torch.bfloat16))
        return self._cuda_values[1]

    def layer_config(self) -> dict:
        """What tersor checkpoints record about this layer (docs/formats.md, tersor checkpoint v1)."""
        cfg = {"pattern": self.pattern, "dtype": str(self.io_dtype).replace("torch.", "")}
        if self.pattern == "bsr":
            cfg["blocksize"] = self.blocksize
        else:
            cfg["values_dtype"] = str(self.compute_dtype).replace("torch.", "")
        return cfg

    def extra_repr(self) -> str:
        extra = f", blocksize={self.blocksize}, density={self.weight_bsr.density:.3f}" if self.pattern == "bsr" else ""
        stored = f", values={self.values.dtype}" if self.values.dtype != self.io_dtype else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.pattern!r}"
                f"{extra}, dtype={self.io_dtype}{stored}, bias={self.bias is not None}, nbytes={nbytes(self)}")
