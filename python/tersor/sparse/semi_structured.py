"""2:4 semi-structured sparsity: pruning (magnitude, Wanda), the format v1 container and its one loader.

Format v1 (docs/formats.md, "2:4 semi-structured"): ``values [M/16, K/32, 256]`` (float16/bfloat16,
or float32 for the CPU's exact path; ``mma.sp`` A-fragment order) and ``meta [M/16, K/64, 32]`` (int32, one metadata register per lane).
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import ops

FORMAT_VERSION = 1
ROW_ALIGN = 16  # M (out_features) must be a multiple of this
COL_ALIGN = 64  # K (in_features) must be a multiple of this
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def float32_off_cpu(t: torch.Tensor) -> bool:
    """Whether ``t`` holds float32 2:4 values where no kernel takes them (the CUDA ops take 16-bit values):
    the case :func:`compress_2_4`, :func:`decompress_2_4` and :func:`linear_2_4` route around."""
    return t.dtype == torch.float32 and t.device.type != "cpu"


def prune_2_4(weight: torch.Tensor, method: str = "magnitude", act_norm: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A copy of ``weight [M, K]`` with at most 2 non-zeros in every group of 4 consecutive entries along K
    (the input dimension), keeping the 2 entries of highest score:

    * ``method="magnitude"``: score ``|w|``;
    * ``method="wanda"``: score ``|w| * act_norm[k]`` (Wanda, arXiv 2306.11695), ``act_norm [K]`` the
      per-input-channel L2 norms of calibration activations (``x.float().norm(dim=0)`` over the tokens).

    Scores are computed in float32. **Ties** keep the lower column index (a stable descending sort), so the
    result is deterministic on every device. Same dtype, device and shape as ``weight``; ``K % 4 == 0``.
    """
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError(f"prune_2_4: weight must be a floating-point tensor, got {getattr(weight, 'dtype', type(weight))}")
    if weight.dim() != 2 or weight.shape[1] % 4 != 0:
        raise ValueError(f"prune_2_4: weight must be 2-d [out, in] with in % 4 == 0, got shape {tuple(weight.shape)}")
    m, k = weight.shape
    score = weight.detach().float().abs()
    if method == "magnitude":
        if act_norm is not None:
            raise ValueError("prune_2_4: act_norm is only used by method='wanda'")
    elif method == "wanda":
        if act_norm is None:
            raise ValueError("prune_2_4: method='wanda' needs act_norm [in_features] (per-input-channel activation norms)")
        if act_norm.dim() != 1 or act_norm.shape[0] != k:
            raise ValueError(f"prune_2_4: act_norm must be [{k}], got shape {tuple(act_norm.shape)}")
        a = act_norm.detach().to(device=weight.device, dtype=torch.float32)
        if not bool(torch.isfinite(a).all()) or bool((a < 0).any()):
            raise ValueError("prune_2_4: act_norm must be finite and non-negative")
        score = score * a
    else:
        raise ValueError(f"prune_2_4: method must be 'magnitude' or 'wanda', got {method!r}")
    groups = score.view(m, k // 4, 4)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order[..., :2], True)
    return torch.where(keep.view(m, k), weight.detach(), torch.zeros((), dtype=weight.dtype, device=weight.device))


def is_2_4(weight: torch.Tensor) -> bool:
    """Whether every group of 4 consecutive entries along the last dim has at most 2 non-zeros."""
    if weight.shape[-1] % 4 != 0:
        return False
    return bool(((weight != 0).reshape(-1, 4).sum(-1) <= 2).all())


_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


class Sparse24Weight:
    """A 2:4 weight ``W [M, K]`` in format v1. Build it with :func:`compress_2_4` or :func:`load_2_4`."""

    __slots__ = ("values", "meta")

    def __init__(self, values: torch.Tensor, meta: torch.Tensor):
        self.values, self.meta = values, meta

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.values.shape[0] * ROW_ALIGN, self.values.shape[1] * 32))

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def to(self, device) -> "Sparse24Weight":
        return Sparse24Weight(self.values.to(device), self.meta.to(device))

    def decompress(self) -> torch.Tensor:
        """The dense ``[M, K]`` weight (bit-exact)."""
        return decompress_2_4(self)

    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.meta.numel() * 4

    def __repr__(self) -> str:
        return f"Sparse24Weight(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"


def load_2_4(values: torch.Tensor, meta: torch.Tensor, shape: Optional[tuple[int, int]] = None) -> Sparse24Weight:
    """The one loader/validator of format v1: checks dtypes, shapes (and ``shape == (M, K)`` if given) and
    that every metadata nibble is a valid ordered pair ``idx0 < idx1`` (what ``mma.sp::ordered_metadata``
    requires; anything else is undefined behaviour on the GPU). Raises TypeError/ValueError otherwise."""
    if values.dtype not in DTYPES:
        raise TypeError(f"load_2_4: values must be float16, bfloat16 or float32, got {values.dtype}")
    if meta.dtype != torch.int32:
        raise TypeError(f"load_2_4: meta must be int32, got {meta.dtype}")
    if values.dim() != 3 or values.shape[2] != 256 or values.shape[0] == 0 or values.shape[1] == 0 \
            or values.shape[1] % 2:
        raise ValueError(f"load_2_4: values must be [M/16, K/32, 256] with K % 64 == 0, got {tuple(values.shape)}")
    expect_meta = (values.shape[0], values.shape[1] // 2, 32)
    if tuple(meta.shape) != expect_meta:
        raise ValueError(f"load_2_4: meta must be {expect_meta} for values {tuple(values.shape)}, got {tuple(meta.shape)}")
    if values.device != meta.device:
        raise ValueError(f"load_2_4: values and meta on different devices ({values.device}, {meta.device})")
    w = Sparse24Weight(values, meta)
    if shape is not None and tuple(shape) != tuple(w.shape):
        raise ValueError(f"load_2_4: tensors hold a {tuple(w.shape)} weight, expected {tuple(shape)}")
    nib = (meta.unsqueeze(-1) >> _SHIFTS.to(meta.device)) & 0xF
    if not bool(((nib & 3) < (nib >> 2)).all()):
        raise ValueError("load_2_4: corrupt metadata: a nibble is not an ascending pair of distinct indices")
    return w


def compress_2_4(weight: torch.Tensor) -> Sparse24Weight:
    """Packs a dense 2:4 weight ``[M, K]`` (float16/bfloat16/float32, ``M % 16 == 0``, ``K % 64 == 0``) into
    format v1 on the weight's device. Refuses (``ValueError``) a weight with more than 2 non-zeros in any group
    of 4 along K: prune it first with :func:`prune_2_4`. A group with fewer than 2 non-zeros stores
    explicit zeros at its lowest free positions. CPU and CUDA produce identical bytes (the CUDA op
    synchronizes to report a weight that is not 2:4); a float32 weight on a GPU is packed on the CPU (the
    CUDA op takes 16-bit values) and the result moved back."""
    weight = weight.detach()
    if float32_off_cpu(weight):
        values, meta = ops.sparse24_compress(weight.cpu())
        return Sparse24Weight(values.to(weight.device), meta.to(weight.device))
    values, meta = ops.sparse24_compress(weight)
    return Sparse24Weight(values, meta)


def decompress_2_4(w: Sparse24Weight) -> torch.Tensor:
    """The dense ``[M, K]`` weight of ``w`` (zeros at pruned positions); ``decompress_2_4(compress_2_4(W))``
    equals ``W`` bit for bit. (float32 values on a GPU are unpacked on the CPU and moved back.)"""
    if float32_off_cpu(w.values):
        return ops.sparse24_decompress(w.values.cpu(), w.meta.cpu()).to(w.values.device)
    return ops.sparse24_decompress(w.values, w.meta)


def linear_2_4(x: torch.Tensor, w: Sparse24Weight, bias: Optional[torch.Tensor] = None,
               path: str = "auto", cuda_values: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ W.T + bias`` (fp32 accumulation, output in x's dtype = W's dtype). ``path`` forces one CUDA
    kernel (``"gemv"``, ``"gemm"``, ``"sm90"``; default ``"auto"``), see :func:`tersor.ops.sparse24_linear`.

    A float32 ``W`` is exact on the CPU (no operand rounding). On a GPU the 2:4 tensor-core kernels take
    16-bit operands, so a float32 ``W`` runs through the documented conversion: values and x rounded to
    bfloat16 (fp32's range, so nothing overflows), the bfloat16 kernel with fp32 accumulation, output and bias in
    float32. ``cuda_values``: the bfloat16 copy of ``W.values`` to use there (a layer caches it; default:
    converted on every call)."""
    if float32_off_cpu(w.values):
        if x.dtype != torch.float32:
            raise TypeError(f"linear_2_4: x must have the weight's dtype torch.float32, got {x.dtype}")
        if bias is not None and (bias.dtype != torch.float32 or tuple(bias.shape) != (w.shape[0],)):
            raise ValueError(f"linear_2_4: bias must be float32 [{w.shape[0]}], got {bias.dtype} {list(bias.shape)}")
        vb = w.values.to(torch.bfloat16) if cuda_values is None else cuda_values
        y = ops.sparse24_linear(x.to(torch.bfloat16), vb, w.meta, None, path).float()
        return y if bias is None else y + bias
    return ops.sparse24_linear(x, w.values, w.meta, bias, path)


def cuda_path_2_4(rows: int, path: str = "auto", device=None) -> str:
    """The CUDA kernel (``"gemv"``, ``"gemm"`` or ``"sm90"``) :func:`linear_2_4` runs for ``rows`` rows of x on
    ``device`` (default: the current CUDA device), as the op's own routing table decides
    (:func:`tersor.ops.sparse24_route`); raises what the op would (e.g. ``NotImplementedError`` for
    ``path="sm90"`` off compute capability 9.0)."""
    major, minor = torch.cuda.get_device_capability(device)
    return ops.sparse24_route(10 * major + minor, rows, path)
