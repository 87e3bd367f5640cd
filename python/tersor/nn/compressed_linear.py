"""``CompressedLinear``: an ``nn.Linear`` whose weight is stored losslessly compressed (tersor.codec)."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from .. import codec
from ._common import bias_param, check_bias, nbytes

from tersor.ops import lib as _lib


class CompressedLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` held as a codec v1 stream (about 67% of a bf16 weight's bytes).

    ``fused=False`` (default): the weight is decoded and ``F.linear`` runs on it, so outputs are
    bit-identical to the original ``nn.Linear`` on every device. ``fused=True``: on CUDA, for bf16/fp16
    and at most 8 rows of ``x``, one kernel decodes the weight in on-chip memory and computes the product
    with fp32 accumulation (never materializing ``W``); results then match ``F.linear`` to fp32-accumulate
    rounding, not bitwise. Other cases decode on the GPU and run ``F.linear`` (``tersor.codec.linear_path``
    names the path a call takes).

    The stream and table are buffers, so ``.to(device)``, ``state_dict()`` and safetensors round-trips work.
    """

    tersor_format = "codec"

    def __init__(self, weight: codec.CompressedTensor, bias: Optional[torch.Tensor] = None, fused: bool = False):
        super().__init__()
        if not isinstance(weight, codec.CompressedTensor):
            raise TypeError(f"CompressedLinear: weight must be a tersor.codec.CompressedTensor, got {type(weight).__name__}")
        if len(weight.shape) != 2:
            raise ValueError(f"CompressedLinear: the weight must be 2-d, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.fused = fused
        self.register_buffer("stream", weight.stream)
        self.register_buffer("table", weight.table)
        self._header = list(weight.header)
        self._dtype = weight.dtype
        # F.linear needs the bias in the weight's dtype: refused here rather than at the first forward.
        check_bias(bias, self.out_features, "CompressedLinear", dtypes=(weight.dtype,))
        self.bias = bias_param(bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, fused: bool = False, chunk_elems: int = 0) -> "CompressedLinear":
        """Compresses ``linear.weight`` (float32/float16/bfloat16); the result lives on its device."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear: expected nn.Linear, got {type(linear).__name__}")
        ct = codec.compress(linear.weight.detach(), chunk_elems=chunk_elems)
        return cls(ct, linear.bias, fused=fused)

    @property
    def compressed_weight(self) -> codec.CompressedTensor:
        return codec.CompressedTensor(self.stream, self.table, self._header)

    @property
    def weight(self) -> torch.Tensor:
        """The decoded weight (a fresh tensor each time)."""
        return _lib.codec_decode(self.stream, self.table, self._header, self._dtype, [self.out_features, self.in_features], False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The stream may come from another layer or a file: validate it fully (metadata, CRCs, lanes),
        # re-read its header (its size and chunk layout may differ) and derive the table from it rather
        # than trusting a stored one.
        key = prefix + "stream"
        ct = None
        if key in state_dict:
            ct = codec.CompressedTensor.from_bytes(state_dict[key])
            if list(ct.shape) != [self.out_features, self.in_features] or ct.dtype != self._dtype:
                raise ValueError(f"CompressedLinear: the stream holds {ct.dtype} {list(ct.shape)}, the layer is "
                                 f"{self._dtype} [{self.out_features}, {self.in_features}]")
            self.stream = torch.empty_like(ct.stream, device=self.stream.device)
            self._header = ct.header
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if ct is not None:
            with torch.no_grad():
                self.table.copy_(ct.table)

    def layer_config(self) -> dict:
        """What tersor checkpoints record about this layer (docs/formats.md, tersor checkpoint v1)."""
        return {"dtype": str(self._dtype).replace("torch.", ""), "fused": bool(self.fused)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"CompressedLinear: x has {x.shape[-1] if x.dim() else 0} features, the layer expects "
                             f"{self.in_features}")
        if x.dtype != self._dtype:
            raise TypeError(f"CompressedLinear: x must be {self._dtype} (the weight's dtype), got {x.dtype}")
        shape = [self.out_features, self.in_features]
        if self.fused:
            return _lib.codec_linear(x, self.stream, self.table, self._header, self._dtype, shape, self.bias)
        w = _lib.codec_decode(self.stream, self.table, self._header, self._dtype, shape, False)
        return nn.functional.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format='codec', "
                f"bias={self.bias is not None}, dtype={self._dtype}, fused={self.fused}, nbytes={nbytes(self)}")


def compress_linears(model: nn.Module, fused: bool = False, predicate: Optional[Callable[[str, nn.Linear], bool]] = None,
                     progress: bool = True) -> nn.Module:
    """Replaces every ``nn.Linear`` of ``model`` (in place) by a :class:`CompressedLinear`; returns ``model``.

    ``predicate(name, linear)`` may veto single layers. Shows a tqdm progress bar when ``progress``.
    """
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)
               and m.weight.dtype in (torch.float32, torch.float16, torch.bfloat16)
               and (predicate is None or predicate(n, m))]
    it = targets
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(targets, desc="compressing linears", unit="layer")
    for name, lin in it:
        model.set_submodule(name, CompressedLinear.from_linear(lin, fused=fused))
    return model
