"""One small config class per compression method of :func:`tersor.quantize_` (docs/usage.md)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..quant.quipsharp import TUNE_PASSES as _E8P_TUNE_PASSES  # quantize_e8p's default
from .finetune import FinetuneConfig

FLOATS = (torch.float32, torch.float16, torch.bfloat16)


class Stats:
    """Statistics of one linear's calibration inputs, accumulated batch by batch in float64:
    ``hessian`` (``E[x x^T]``, for LDLQ) and/or ``act_norm`` (per-input-channel L2 norms, for Wanda)."""

    def __init__(self, in_features: int, kinds: tuple[str, ...], device):
        self.kinds, self.count = kinds, 0
        self._xtx = torch.zeros(in_features, in_features, dtype=torch.float64, device=device) \
            if "hessian" in kinds else None
        self._sq = torch.zeros(in_features, dtype=torch.float64, device=device) if "act_norm" in kinds else None

    def add(self, x: torch.Tensor):
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        if self._xtx is not None:
            self._xtx.addmm_(x.t(), x)
        if self._sq is not None:
            self._sq.add_(x.square().sum(0))
        self.count += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        return self._xtx / max(1, self.count)

    @property
    def act_norm(self) -> torch.Tensor:
        return self._sq.sqrt().float()


def _choice(owner, name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{owner}: {name} must be one of {allowed}, got {value!r}")


def _int(owner, name, value, lo, hi=None):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}: {name} must be an int, got {type(value).__name__}")
    if value < lo or (hi is not None and value > hi):
        raise ValueError(f"{owner}: {name} must be in [{lo}, {'...' if hi is None else hi}], got {value}")


class _Config:
    """Common interface: ``stats`` (what calibration data the method needs; empty = data-free),
    ``unsupported(linear)`` (why the format cannot take a layer, or None) and ``convert(linear, stats)``."""

    stats: tuple[str, ...] = ()
    name = "?"

    def unsupported(self, linear: nn.Linear) -> Optional[str]:
        return None

    def convert(self, linear: nn.Linear, stats: Optional[Stats]) -> nn.Module:
        raise NotImplementedError

    def to_dict(self) -> dict:
        return {"config": type(self).__name__, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class E8PConfig(_Config):
    """QuIP#-style E8P12 lattice codes with the randomized Hadamard transform, 2, 3 or 4 bits per weight
    (:class:`tersor.nn.E8PLinear`). ``ldlq=True`` (QuIP#'s default) rounds with block LDLQ against each
    layer's calibration Hessian ``E[x x^T]`` and so needs ``calibration``; ``ldlq=False`` rounds greedily,
    data-free. ``tune_passes`` guarded coordinate-descent passes follow LDLQ (:func:`tersor.quant.quantize_e8p`;
    0 = LDLQ alone; no effect with ``ldlq=False``). Layers need ``out_features % 16 == 0``,
    ``in_features % 64 == 0`` and sizes ``tersor.hadamard_transform`` supports (2^k or K * 2^k).
    ``finetune``: a :class:`tersor.FinetuneConfig` to fine-tune each block's SU, SV, Wscale, norms and biases
    after it is quantized (QuIP#'s block fine-tuning; needs ``calibration``)."""

    bits: int = 2
    ldlq: bool = True
    seed: int = 0
    tune_passes: int = _E8P_TUNE_PASSES
    finetune: Optional[FinetuneConfig] = None
    name = "e8p"

    def __post_init__(self):
        object.__setattr__(self, "finetune", FinetuneConfig.from_value(self.finetune))
        _choice("E8PConfig", "bits", self.bits, (2, 3, 4))
        if not isinstance(self.ldlq, bool):
            raise TypeError(f"E8PConfig: ldlq must be a bool, got {type(self.ldlq).__name__}")
        _int("E8PConfig", "seed", self.seed, 0)
        _int("E8PConfig", "tune_passes", self.tune_passes, 0)

    @property
    def stats(self):
        return ("hessian",) if self.ldlq else ()

    def unsupported(self, linear):
        from ..ops import _hadamard_size_ok

        m, n = linear.out_features, linear.in_features
        if m % 16 or n % 64:
            return f"E8P needs out_features % 16 == 0 and in_features % 64 == 0, got [{m}, {n}]"
        for what, k in (("in_features", n), ("out_features", m)):
            if not _hadamard_size_ok(k):
                return f"{what} = {k} is not a Hadamard size (2^k or K * 2^k)"
        return None

    def convert(self, linear, stats):
        from ..nn import E8PLinear

        return E8PLinear.from_linear(linear, bits=self.bits, hessian=stats.hessian if self.ldlq else None,
                                     seed=self.seed, tune_passes=self.tune_passes)


@dataclass(frozen=True)
class AQLMConfig(_Config):
    """AQLM additive codebooks (:class:`tersor.nn.AQLMLinear`): ``num_codebooks`` codebooks of ``2^nbits``
    entries over groups of ``in_group_size`` = 8 inputs (2x8: 2 bits per weight, 1x16: 2 bits), quantized by
    :func:`tersor.quant.quantize_aqlm`. ``data_aware``: ``None`` (default) uses AQLM's data-aware objective
    (each layer's output error on the calibration inputs, through the Hessian ``E[x x^T]`` captured per
    layer) when ``quantize_`` is given ``calibration`` and minimises the weight error otherwise; ``True``
    requires ``calibration``; ``False`` is data-free even with it (the data then only gives the report's
    errors). ``sigma_reg``: the damping ``sigma_reg * mean(diag H)`` added to H (default 1.0, chosen on
    MiniLM with 12 calibration sentences, see :func:`tersor.quant.quantize_aqlm`; smaller with more data).
    ``iters`` (rounds; the data-aware objective acts in them, so ``iters=0`` is data-free),
    ``kmeans_iters``, ``beam_size`` and ``seed`` go to the quantizer (fewer
    iterations: faster, slightly worse). Data-aware 1x16 is slow (its code search scores 65536 entries per
    group and row). Layers need ``in_features % 8 == 0``. ``finetune``: a :class:`tersor.FinetuneConfig`
    to fine-tune each block's codebooks, scales, norms and biases after it is quantized (the continuous step
    of AQLM's fine-tuning / PV-tuning; with ``discrete_every`` also its discrete step; needs ``calibration``)."""

    num_codebooks: int = 2
    nbits: int = 8
    in_group_size: int = 8
    iters: int = 6
    kmeans_iters: int = 20
    beam_size: int = 4
    seed: int = 0
    data_aware: Optional[bool] = None
    sigma_reg: float = 1.0
    finetune: Optional[FinetuneConfig] = None
    name = "aqlm"

    def __post_init__(self):
        object.__setattr__(self, "finetune", FinetuneConfig.from_value(self.finetune))
        from ..nn.aqlm_linear import MAX_CODEBOOKS

        _int("AQLMConfig", "num_codebooks", self.num_codebooks, 1, MAX_CODEBOOKS)
        _int("AQLMConfig", "nbits", self.nbits, 1, 16)
        _choice("AQLMConfig", "in_group_size", self.in_group_size, (8,))
        _int("AQLMConfig", "iters", self.iters, 0)
        _int("AQLMConfig", "kmeans_iters", self.kmeans_iters, 0)
        _int("AQLMConfig", "beam_size", self.beam_size, 1)
        _int("AQLMConfig", "seed", self.seed, 0)
        if self.data_aware is not None and not isinstance(self.data_aware, bool):
            raise TypeError(f"AQLMConfig: data_aware must be None or a bool, got {type(self.data_aware).__name__}")
        if isinstance(self.sigma_reg, bool) or not isinstance(self.sigma_reg, (int, float)):
            raise TypeError(f"AQLMConfig: sigma_reg must be a float, got {type(self.sigma_reg).__name__}")
        if not self.sigma_reg >= 0 or self.sigma_reg == float("inf"):
            raise ValueError(f"AQLMConfig: sigma_reg must be a finite float >= 0, got {self.sigma_reg}")

    @property
    def stats(self):
        return ("hessian",) if self.data_aware else ()

    @property
    def optional_stats(self):
        """What :func:`tersor.quantize_` captures when calibration is given although ``stats`` is empty."""
        return ("hessian",) if self.data_aware is None else ()

    def unsupported(self, linear):
        if linear.in_features % self.in_group_size:
            return f"AQLM needs in_features % {self.in_group_size} == 0, got {linear.in_features}"
        return None

    def convert(self, linear, stats):
        from ..nn import AQLMLinear

        hessian = None
        if self.data_aware is not False and stats is not None and "hessian" in stats.kinds:
            hessian = stats.hessian
        return AQLMLinear.from_linear(linear, num_codebooks=self.num_codebooks, nbits=self.nbits, iters=self.iters,
                                      kmeans_iters=self.kmeans_iters, beam_size=self.beam_size, seed=self.seed,
                                      hessian=hessian, sigma_reg=float(self.sigma_reg))


_PRUNE_METHODS = ("magnitude", "wanda")


@dataclass(frozen=True)
class Sparse24Config(_Config):
    """2:4 semi-structured sparsity (:class:`tersor.nn.SparseLinear`, pattern ``"2:4"``): half of every 4
    consecutive weights pruned by ``method`` ``"magnitude"`` (data-free) or ``"wanda"`` (``|w| * ||x||``,
    needs ``calibration``). Layers keep their dtype: float16/bfloat16 values, and float32 layers store
    float32 values, exact on the CPU (on a GPU they compute through a bfloat16 copy, see SparseLinear).
    ``compact=True`` stores a float32 layer's values in bfloat16 instead (9/32 of the dense bytes instead of
    17/32; x is then rounded to bfloat16 on every device); it changes nothing for 16-bit layers.
    Layers need ``out_features % 16 == 0`` and ``in_features % 64 == 0``."""

    method: str = "magnitude"
    compact: bool = False
    name = "2:4"

    def __post_init__(self):
        _choice("Sparse24Config", "method", self.method, _PRUNE_METHODS)
        if not isinstance(self.compact, bool):
            raise TypeError(f"Sparse24Config: compact must be a bool, got {type(self.compact).__name__}")

    @property
    def stats(self):
        return ("act_norm",) if self.method == "wanda" else ()

    def unsupported(self, linear):
        m, n = linear.out_features, linear.in_features
        if m % 16 or n % 64:
            return f"2:4 needs out_features % 16 == 0 and in_features % 64 == 0, got [{m}, {n}]"
        return None

    def convert(self, linear, stats):
        from ..nn import SparseLinear

        compact = self.compact and linear.weight.dtype == torch.float32
        return SparseLinear.from_linear(linear, pattern="2:4", method=self.method,
                                        act_norm=stats.act_norm if self.method == "wanda" else None,
                                        values_dtype=torch.bfloat16 if compact else None)


@dataclass(frozen=True)
class BlockSparseConfig(_Config):
    """Block sparsity (:class:`tersor.nn.SparseLinear`, pattern ``"bsr"``): keeps the fraction ``density`` of
    the ``blocksize x blocksize`` blocks (16, 32 or 64) with the highest ``method`` score (``"magnitude"``,
    data-free, or ``"wanda"``, needs ``calibration``); float32, float16 and bfloat16 layers keep their dtype.
    Layers need both dimensions to be multiples of ``blocksize``."""

    blocksize: int = 64
    density: float = 0.5
    method: str = "magnitude"
    name = "bsr"

    def __post_init__(self):
        _choice("BlockSparseConfig", "blocksize", self.blocksize, (16, 32, 64))
        if isinstance(self.density, bool) or not isinstance(self.density, (int, float)):
            raise TypeError(f"BlockSparseConfig: density must be a float, got {type(self.density).__name__}")
        if not 0.0 < float(self.density) <= 1.0:
            raise ValueError(f"BlockSparseConfig: density must be in (0, 1], got {self.density}")
        _choice("BlockSparseConfig", "method", self.method, _PRUNE_METHODS)

    @property
    def stats(self):
        return ("act_norm",) if self.method == "wanda" else ()

    def unsupported(self, linear):
        m, n, bs = linear.out_features, linear.in_features, self.blocksize
        if m % bs or n % bs:
            return f"blocksize {bs} needs both dimensions to be multiples of it, got [{m}, {n}]"
        return None

    def convert(self, linear, stats):
        from ..nn import SparseLinear

        return SparseLinear.from_linear(linear, pattern="bsr", method=self.method, blocksize=self.blocksize,
                                        density=float(self.density),
                                        act_norm=stats.act_norm if self.method == "wanda" else None)


@dataclass(frozen=True)
class LosslessConfig(_Config):
    """Lossless exponent coding (:class:`tersor.nn.CompressedLinear`, codec v1): bit-identical outputs,
    about 67% of a bf16 weight's bytes (less saving for fp32/fp16). Data-free; any float layer.
    ``fused=True``: the fused decode + GEMV on CUDA (fp32-accumulation rounding instead of bit-identical)."""

    fused: bool = False
    name = "lossless"

    def __post_init__(self):
        if not isinstance(self.fused, bool):
            raise TypeError(f"LosslessConfig: fused must be a bool, got {type(self.fused).__name__}")

    def convert(self, linear, stats):
        from ..nn import CompressedLinear

        return CompressedLinear.from_linear(linear, fused=self.fused)


@dataclass(frozen=True)
class SageAttentionConfig(_Config):
    """Routes a transformers model's attention to tersor's quantized attention (SageAttention2 numerics,
    :func:`tersor.attention.sage_attention`): sets ``attn_implementation="tersor_sage"``
    (:mod:`tersor.attention.hf`) on the model and its sub-models. No layer is replaced and no data is needed;
    ``filter_fn`` is not supported (transformers chooses attention per model). ``qk`` (``"auto"``, ``"int8"``,
    ``"int4"``, ``"none"``) and ``pv`` (``"auto"``, ``"fp8"``, ``"fp16"``, ``"fp32"``) are the modes;
    ``"auto"`` picks per device. Calls the kernel cannot take (padding masks, float32, head dim > 128, ...)
    run transformers' SDPA, with a warning once per reason. Not stored by ``tersor.save``: apply it again
    after loading. ``sparse_threshold`` (None = dense; else in (0, 1]) makes the routed calls block-sparse:
    :func:`tersor.attention.sparse_sage_attention` (XAttention block selection with ``sparse_stride``, then the
    block-sparse kernel)."""

    qk: str = "auto"
    pv: str = "auto"
    sparse_threshold: Optional[float] = None
    sparse_stride: int = 8
    name = "sage-attention"

    def __post_init__(self):
        _choice("SageAttentionConfig", "qk", self.qk, ("auto", "int8", "int4", "none"))
        _choice("SageAttentionConfig", "pv", self.pv, ("auto", "fp8", "fp16", "fp32"))
        t = self.sparse_threshold
        if t is not None:
            if isinstance(t, bool) or not isinstance(t, (int, float)):
                raise TypeError(f"SageAttentionConfig: sparse_threshold must be a float or None, got {type(t).__name__}")
            if not 0 < t <= 1:
                raise ValueError(f"SageAttentionConfig: sparse_threshold must be in (0, 1], got {t!r}")
        _int("SageAttentionConfig", "sparse_stride", self.sparse_stride, 1, 128)
        if 128 % self.sparse_stride:
            raise ValueError(f"SageAttentionConfig: sparse_stride must divide the block size 128, got "
                             f"{self.sparse_stride}")

    def apply(self, model: nn.Module) -> str:
        from ..attention.hf import apply

        if self.sparse_threshold is None:
            return apply(model, self.qk, self.pv)
        return apply(model, self.qk, self.pv, sparse_threshold=float(self.sparse_threshold),
                     sparse_stride=self.sparse_stride)


CONFIGS = (E8PConfig, AQLMConfig, Sparse24Config, BlockSparseConfig, LosslessConfig, SageAttentionConfig)


def config_from_dict(d: dict) -> _Config:
    """The config a :meth:`_Config.to_dict` dict describes (``{"config": class name, **fields}``); ValueError for
    an unknown class or fields, TypeError/ValueError from the class's own checks."""
    if not isinstance(d, dict) or not isinstance(d.get("config"), str):
        raise ValueError(f"tersor config: expected a dict with a 'config' class name, got {d!r}")
    by_name = {c.__name__: c for c in CONFIGS}
    cls = by_name.get(d["config"])
    if cls is None:
        raise ValueError(f"tersor config: unknown config {d['config']!r} (one of {sorted(by_name)})")
    fields = {f.name for f in dataclasses.fields(cls)}
    args = {k: v for k, v in d.items() if k != "config"}
    unknown = sorted(set(args) - fields)
    if unknown:
        raise ValueError(f"tersor config: {d['config']} has no field(s) {unknown} (fields: {sorted(fields)})")
    return cls(**args)
