"""Loading QuIP# checkpoints (Cornell-RelaxML's "relaxml" layout) into a model with tersor layers.

QuIP# stores, per quantized linear ``P``: ``P.Qidxs`` (int64 E8P12 / RVQ codes), ``P.SU`` [in], ``P.SV`` [out]
(fp16, usually fine-tuned and carrying Wscale), optionally ``P.Wscale`` (legacy), ``P.codebook_id``,
``P.bias`` and ``P.scaleWH``. Fused layers quantize several linears as one matrix, concatenated on the output
dimension, and add ``P.fuse_scales`` [#parts]: QuIP#'s forward splits the fused output and multiplies part
``i`` by ``fuse_scales[i]``. In QuIP#'s Llama these are ``self_attn.qkv_proj`` = (q_proj, k_proj, v_proj) and
``mlp.upgate_proj`` = (up_proj, gate_proj) (docs/research/e8p12.md section 4).

:func:`load_quipsharp_layers` replaces the model's ``nn.Linear`` layers by :class:`~tersor.nn.E8PLinear`
(``hadamard="quipsharp"``) and, for fused layers, registers one :class:`E8PFusedLinear` under QuIP#'s name
(e.g. ``self_attn.qkv_proj``) and puts an :class:`E8PFusedPart` in place of each part.
"""

from __future__ import annotations

import weakref
from typing import Any, Mapping, Optional

import torch
from torch import nn

from ..nn._common import FLOATS, check_tensor
from ..nn.e8p_linear import QUIPSHARP_CODEBOOK_ID, E8PLinear
from ..quant import quipsharp

# QuIP#'s fused layers: the fused module's name -> its parts, in the order of the concatenated rows.
FUSED_LAYERS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "upgate_proj": ("up_proj", "gate_proj"),
}
# Tensors QuIP#'s QuantizedLinear / FusedQuantizedLinear save (had_left_T / had_right are not persistent).
_LAYER_KEYS = {"Qidxs", "SU", "SV", "Wscale", "codebook_id", "bias", "scaleWH", "fuse_scales"}
_CODEBOOKS = {"E8P12": 2, "E8P12RVQ3B": 3, "E8P12RVQ4B": 4}


class E8PFusedLinear(E8PLinear):
    """One QuIP# ``FusedQuantizedLinear``: an :class:`~tersor.nn.E8PLinear` over the concatenated parts whose
    forward returns the tuple ``(fuse_scales[i] * y[rows of part i])``, as QuIP#'s does. ``fuse_sizes``: the
    parts' out_features (summing to out_features). State: E8PLinear's plus ``fuse_scales`` (fp32 [#parts]);
    ``hadamard`` / ``bits`` as E8PLinear's (:func:`load_quipsharp_layers` passes ``hadamard="quipsharp"``).

    The model calls the parts (:class:`E8PFusedPart`) one by one; :meth:`part` runs the fused GEMV once per
    input and hands each part its rows (see there)."""

    tersor_format = "e8p_fused"

    def __init__(self, state: dict[str, torch.Tensor], fuse_sizes, bias: Optional[torch.Tensor] = None,
                 resid_scale: Optional[float] = None, hadamard: Optional[str] = None, bits: Optional[int] = None):
        super().__init__({k: v for k, v in state.items() if k != "fuse_scales"}, bias, resid_scale, hadamard, bits)
        sizes = [int(s) for s in fuse_sizes]
        if not sizes or any(s <= 0 for s in sizes) or sum(sizes) != self.out_features:
            raise ValueError(f"E8PFusedLinear: fuse_sizes {sizes} must be positive and sum to out_features = "
                             f"{self.out_features}")
        fs = state.get("fuse_scales", torch.ones(len(sizes)))
        check_tensor(fs, "fuse_scales", "E8PFusedLinear", dtypes=FLOATS, shape=(len(sizes),))
        self.fuse_sizes = sizes
        self.register_buffer("fuse_scales", fs.float().clone())
        self._part_cache = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = super().forward(x)
        parts = torch.split(y, self.fuse_sizes, dim=-1)
        return tuple((p.float() * self.fuse_scales[i]).to(x.dtype) for i, p in enumerate(parts))

    # ---------------------------------------------------------------- one fused GEMV shared by the parts
    def _cache_key(self, x: torch.Tensor):
        # Everything the cached outputs depend on besides x's identity: x's version counter (bumped by every
        # in-place change of x or of a view of it), the grad mode, and the layer's own tensors and resid.
        ts = [x, self.Qidxs, self.SU, self.SV, self.Wscale, self.fuse_scales]
        if self.bias is not None:
            ts.append(self.bias)
        return (tuple((id(t), t._version) for t in ts), torch.is_grad_enabled(), self._resid)

    def part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Part ``index`` of ``self(x)``. In eager mode the fused output of the last input is kept until every
        part has taken its rows, so a qkv layer runs its GEMV once per input, not 3 times. A cached output is
        used only for the *same* tensor object (held by a weak reference) with the same version counter (no
        in-place change since), the same grad mode and unchanged layer tensors; a part asking twice, another
        input, or any change recomputes. It is dropped when the last part took it, on ``.to()`` /
        ``load_state_dict`` and on ``deepcopy``/pickle. Plain recomputation (each part runs the whole fused
        layer) under ``torch.compile`` tracing, ``torch.jit`` tracing, for inference-mode tensors (they have
        no version counter, so in-place changes could not be seen) and for tensor subclasses / functorch
        transforms."""
        if (torch.compiler.is_compiling() or torch.jit.is_tracing() or type(x) is not torch.Tensor
                or x.is_inference() or _functorch_wrapped(x)):
            return self.forward(x)[index]
        try:
            key = self._cache_key(x)
        except RuntimeError:  # a layer tensor without a version counter (made under inference mode)
            return self.forward(x)[index]
        cache = getattr(self, "_part_cache", None)  # (weakref to x, key, outputs, parts not yet served): one read, then replaced
        if cache is not None and cache[0]() is x and cache[1] == key and index in cache[3]:
            left = cache[3] - {index}
            self._part_cache = (cache[0], key, cache[2], left) if left else None
            return cache[2][index]
        outs = self.forward(x)
        left = frozenset(range(len(outs))) - {index}
        self._part_cache = (weakref.ref(x), key, outs, left) if left else None
        return outs[index]

    def _apply(self, fn, *args, **kwargs):
        self._part_cache = None
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._part_cache = None
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self):
        state = super().__getstate__()
        state["_part_cache"] = None  # outputs of a forward: never copied or pickled
        return state

    def dequantize(self) -> torch.Tensor:
        """The dense fp32 [out_features, in_features] weight, fuse_scales applied to each part's rows."""
        w = super().dequantize()
        rows = torch.repeat_interleave(self.fuse_scales, torch.tensor(self.fuse_sizes, device=w.device))
        return w * rows[:, None]

    def layer_config(self) -> dict:
        return {**super().layer_config(), "fuse_sizes": list(self.fuse_sizes)}

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fuse_sizes={self.fuse_sizes}"


def _functorch_wrapped(x: torch.Tensor) -> bool:
    f = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
    return bool(f(x)) if f is not None else False


class E8PFusedPart(nn.Module):
    """Part ``index`` of an :class:`E8PFusedLinear` standing in for one of the model's linears (e.g. ``q_proj``
    of ``qkv_proj``). It holds no tensors: the fused layer is registered once, on the parent module, under
    QuIP#'s name. Forward: :meth:`E8PFusedLinear.part`, which in eager mode runs the fused GEMV once per input
    for all parts (under ``torch.compile`` each part runs the whole fused layer: qkv 3 times, up/gate 2)."""

    def __init__(self, fused: E8PFusedLinear, index: int, fused_name: str):
        super().__init__()
        self.__dict__["_fused"] = fused  # not a submodule: its tensors belong to the parent's fused entry
        self.index = int(index)
        self.fused_name = fused_name
        self.in_features = fused.in_features
        self.out_features = fused.fuse_sizes[self.index]

    @property
    def fused(self) -> E8PFusedLinear:
        return self.__dict__["_fused"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.part(x, self.index)

    def dequantize(self) -> torch.Tensor:
        start = sum(self.fused.fuse_sizes[:self.index])
        return self.fused.dequantize()[start:start + self.out_features]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format='e8p', "
                f"part {self.index} of {self.fused_name} ({self.fused.bits} bits, shared)")


def _quip_params(quant_config: Optional[Mapping[str, Any]]) -> dict:
    if quant_config is None:
        return {}
    if not isinstance(quant_config, Mapping):
        raise TypeError(f"load_quipsharp_layers: quant_config must be a dict (config.json's quantization_config or "
                        f"quip_params) or None, got {type(quant_config).__name__}")
    cfg = dict(quant_config)
    if isinstance(cfg.get("quip_params"), Mapping):
        cfg = {**cfg, **cfg["quip_params"]}
    if int(cfg.get("lora_rank", 0) or 0) != 0:
        raise NotImplementedError(f"load_quipsharp_layers: lora_rank = {cfg['lora_rank']}: QuIP#'s low-rank "
                                  "correction is not supported (QuIP# itself requires 0)")
    if cfg.get("outlier_channel_split"):
        raise NotImplementedError("load_quipsharp_layers: outlier_channel_split checkpoints are not supported")
    cb = cfg.get("codebook")
    if cb is not None and cb not in _CODEBOOKS:
        raise NotImplementedError(f"load_quipsharp_layers: codebook {cb!r} is not supported (tersor reads "
                                  f"{sorted(_CODEBOOKS)})")
    rso = cfg.get("resid_scale_override")
    if rso is not None and not isinstance(rso, (int, float)):
        raise TypeError(f"load_quipsharp_layers: resid_scale_override must be a number, got {rso!r}")
    return cfg


def _get(model: nn.Module, name: str) -> Optional[nn.Module]:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def load_quipsharp_layers(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                          quant_config: Optional[Mapping[str, Any]] = None) -> dict:
    """Loads a QuIP# checkpoint's ``state_dict`` into ``model`` (built from the checkpoint's config, with
    ``nn.Linear`` layers; weights may be on ``meta``), in place.

    - Every prefix ``P`` with a ``P.Qidxs`` key is a quantized layer. If ``model`` has an ``nn.Linear`` at
      ``P``, it becomes an :class:`~tersor.nn.E8PLinear` (QuIP#'s transforms, ``hadamard="quipsharp"``).
      If ``P`` ends in a fused name of :data:`FUSED_LAYERS` (``qkv_proj``, ``upgate_proj``) and its parent
      has those parts as ``nn.Linear``, an :class:`E8PFusedLinear` is registered at ``P`` and each part
      becomes an :class:`E8PFusedPart`.
    - Every other key is loaded into the model as it is (``load_state_dict``; assigned when the model has
      ``meta`` tensors).
    - ``quant_config``: config.json's ``quantization_config`` and/or QuIP#'s ``quip_params`` (read:
      ``codebook``, which must match each layer's Qidxs; ``resid_scale_override`` when > 0; ``lora_rank``
      must be 0; ``outlier_channel_split`` must be false). None: nothing checked.

    Errors name the layer and the tensor: ValueError for shapes, unknown tensors, layers the model lacks or
    keys the model does not have; TypeError for dtypes; NotImplementedError (also a ValueError) when a
    dimension K * 2^k needs QuIP#'s H_K and this tersor has none (tersor.quant.quipsharp_hadamard).
    ``state_dict`` is not modified; quantized tensors are converted (Qidxs to int64 only if needed, SU/SV
    to fp32 copies).

    Returns ``{"layers": [P, ...], "fused": {P: [part fqns]}, "missing_keys": [...]}``: the quantized prefixes,
    the fused ones with the parts they replaced, and the model's non-quantized keys that ``state_dict`` did
    not hold (e.g. a tied ``lm_head.weight``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_quipsharp_layers: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"load_quipsharp_layers: state_dict must be a mapping of tensors, got "
                        f"{type(state_dict).__name__}")
    cfg = _quip_params(quant_config)
    rso = float(cfg.get("resid_scale_override") or 0)
    rso = rso if rso > 0 else None
    want_bits = _CODEBOOKS.get(cfg.get("codebook"))

    prefixes = sorted(k[: -len(".Qidxs")] for k in state_dict if k.endswith(".Qidxs"))
    groups: dict[str, dict[str, torch.Tensor]] = {p: {} for p in prefixes}
    rest: dict[str, torch.Tensor] = {}
    for key, t in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        if prefix in groups:
            if leaf not in _LAYER_KEYS:
                raise ValueError(f"load_quipsharp_layers: layer {prefix!r}, tensor {key!r}: not a QuIP# "
                                 f"QuantizedLinear tensor (expected {sorted(_LAYER_KEYS)})")
            groups[prefix][leaf] = t
        else:
            rest[key] = t

    built: list[tuple[str, nn.Module, list[tuple[str, nn.Module]]]] = []
    fused_parts: dict[str, list[str]] = {}
    for p in prefixes:
        st = groups[p]
        target = _get(model, p)
        parent_name, _, leaf = p.rpartition(".")
        what = f"load_quipsharp_layers: layer {p!r}"
        if want_bits is not None and "codebook_id" in st:
            b = quipsharp.codebook_bits(st["codebook_id"], f"{what}, tensor {p + '.codebook_id'!r}")
            if b != want_bits:
                raise ValueError(f"{what}: tensor {p + '.codebook_id'!r} declares {b}-bit codes, quant_config says "
                                 f"codebook {cfg['codebook']!r} ({want_bits} bits)")
        if isinstance(target, nn.Linear):
            if "fuse_scales" in st:
                raise ValueError(f"{what}: tensor {p + '.fuse_scales'!r}: a fused QuIP# layer, but the model has a "
                                 f"single nn.Linear at {p!r}")
            args = E8PLinear._quipsharp_args(st, rso, what, bits=want_bits)
            _check_shapes(p, st, target.in_features, target.out_features)
            layer = _named(what, E8PLinear, **args)
            built.append((p, layer, []))
        elif leaf in FUSED_LAYERS and target is None:
            parent = _get(model, parent_name) if parent_name else model
            names = [f"{parent_name}.{n}" if parent_name else n for n in FUSED_LAYERS[leaf]]
            parts = [_get(model, n) for n in names]
            if parent is None or not all(isinstance(m, nn.Linear) for m in parts):
                raise ValueError(f"{what}: QuIP# fuses {list(FUSED_LAYERS[leaf])} into {leaf!r}, but the model has no "
                                 f"nn.Linear at each of {names}")
            ins = {m.in_features for m in parts}
            if len(ins) != 1:
                raise ValueError(f"{what}: the parts {names} have different in_features {sorted(ins)}")
            sizes = [m.out_features for m in parts]
            _check_shapes(p, st, ins.pop(), sum(sizes))
            if "fuse_scales" not in st:
                raise ValueError(f"{what}: tensor {p + '.fuse_scales'!r} is missing (a fused QuIP# layer has one)")
            check_tensor(st["fuse_scales"], f"{p}.fuse_scales", "load_quipsharp_layers", dtypes=FLOATS,
                         shape=(len(sizes),))
            args = E8PLinear._quipsharp_args(st, rso, what, allow_fused=True, bits=want_bits)
            layer = _named(what, E8PFusedLinear, {**args["state"], "fuse_scales": st["fuse_scales"]}, sizes,
                           args["bias"], args["resid_scale"], args["hadamard"], args["bits"])
            built.append((p, layer, [(n, E8PFusedPart(layer, i, leaf)) for i, n in enumerate(names)]))
            fused_parts[p] = names
        else:
            kind = "nothing" if target is None else type(target).__name__
            raise ValueError(f"{what}: the checkpoint has {p + '.Qidxs'!r} but the model has {kind} there (expected "
                             f"an nn.Linear, or for {sorted(FUSED_LAYERS)} the parts "
                             f"{sorted({x for v in FUSED_LAYERS.values() for x in v})})")

    # Every layer is built and checked: only now change the model.
    for p, layer, parts in built:
        if parts:
            for name, part in parts:
                model.set_submodule(name, part)
            model.set_submodule(p, layer)
        else:
            model.set_submodule(p, layer)

    quant_keys = {k for k in model.state_dict() if k.rpartition(".")[0] in groups}
    assign = any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    result = model.load_state_dict(rest, strict=False, assign=assign)
    if result.unexpected_keys:
        raise ValueError(f"load_quipsharp_layers: tensors {sorted(result.unexpected_keys)[:8]} of the checkpoint "
                         f"are not in the model")
    missing = sorted(k for k in result.missing_keys if k not in quant_keys)
    from ..hf import maybe_attach

    maybe_attach(model)  # a transformers model then saves (save_pretrained) with a tersor quantization_config
    return {"layers": prefixes, "fused": fused_parts, "missing_keys": missing}


def _named(what: str, cls, *args, **kwargs):
    # the layer's constructor, its errors prefixed with the layer's name (same exception type)
    try:
        return cls(*args, **kwargs)
    except (ValueError, TypeError) as e:
        raise type(e)(f"{what}: {e}") from None


def _check_shapes(p: str, st: dict, n: int, m: int) -> None:
    for key, size, what in (("SU", n, "in_features"), ("SV", m, "out_features")):
        t = st[key]
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.numel() != size:
            shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"load_quipsharp_layers: layer {p!r}, tensor {p + '.' + key!r}: expected [{size}] (the "
                             f"model's {what}), got {shape}")
    if "bias" in st and (not isinstance(st["bias"], torch.Tensor) or list(st["bias"].shape) != [m]):
        raise ValueError(f"load_quipsharp_layers: layer {p!r}, tensor {p + '.bias'!r}: expected [{m}], got "
                         f"{list(getattr(st['bias'], 'shape', []))}")


__all__ = ["E8PFusedLinear", "E8PFusedPart", "FUSED_LAYERS", "load_quipsharp_layers", "QUIPSHARP_CODEBOOK_ID"]
