"""Hugging Face transformers integration (docs/usage.md, "Hugging Face").

* ``quant_method: "tersor"``: a model compressed with :func:`tersor.quantize_` (or loaded with
  :func:`tersor.load`) carries a :class:`TersorConfig` and a :class:`TersorHfQuantizer`, so
  ``model.save_pretrained(d)`` writes ``config.json`` with ``quantization_config = {"quant_method": "tersor",
  "format": "tersor-checkpoint", "version": 1, "layers": [...]}`` (the per-layer entries of tersor's own
  checkpoint manifest, docs/formats.md) and the tersor layers' tensors in the safetensors files.
  ``AutoModel*.from_pretrained(d)`` then swaps the listed linears for placeholders of the listed tensor
  shapes and dtypes before the weights are loaded, lets transformers load every tensor, and builds each tersor
  layer from its tensors through the layer's own constructor and validators afterwards. Nothing is
  re-quantized and no code from the files runs (JSON and safetensors only).
* :func:`from_pretrained` reads ``config.json``'s ``quantization_config`` and dispatches on ``quant_method``:
  ``"tersor"``, ``"aqlm"`` (AQLM's Hugging Face layout: ``*.codes``/``*.codebooks``/``*.scales``, loaded into
  :class:`tersor.nn.AQLMLinear` without the ``aqlm`` package) and ``"quip#"``/``"quipsharp"`` (delegated to
  ``tersor.api.quipsharp_ckpt.load_quipsharp_layers``).

Registration. ``import tersor`` does not import transformers. If transformers is installed, ``import
tersor`` registers "tersor" with transformers' public registry (``register_quantization_config`` /
``register_quantizer``) at once when transformers' quantizer registry (``transformers.quantizers.auto``) is
already imported, and otherwise the moment it is first imported (an import hook that fires once, when
``transformers.quantizers.auto`` finishes executing; transformers imports it with its model classes).
:func:`register` does the same by hand and is idempotent.

Tested with transformers 5.25 (the hooks used: ``QuantizationConfigMixin``, ``HfQuantizer`` with
``_process_model_before_weight_loading(model, checkpoint_files=...)``,
``_process_model_after_weight_loading``, ``get_state_dict_and_metadata``, ``is_serializable``,
``is_trainable``, ``requires_calibration``, and the ``model.hf_quantizer`` attribute that ``save_pretrained``
reads). :data:`SUPPORTED_TRANSFORMERS` is the range checked at registration: older versions lack this
quantizer interface (it changed in 5.0), newer ones are allowed with a warning.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import os
import sys
import threading
import warnings
from typing import Any, Optional, Union

import torch
from torch import nn

QUANT_METHOD = "tersor"
SUPPORTED_TRANSFORMERS = (">=5.0", "<6")  # tested: 5.25
_HOOK_TARGET = "transformers.quantizers.auto"
_lock = threading.RLock()
_classes_cache: dict[str, Any] = {}

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _dtype_name(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


# ------------------------------------------------------------------------------------------- registration
def transformers_available() -> bool:
    """Whether transformers can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec("transformers") is not None
    except (ImportError, ValueError):
        return False


def _version_ok(v: str) -> bool:
    try:
        from packaging.version import Version
    except ImportError:  # pragma: no cover -- transformers depends on packaging
        return True
    ver = Version(v)
    return Version("5.0") <= ver < Version("6")


def _classes() -> dict[str, Any]:
    """Defines TersorConfig and TersorHfQuantizer (subclasses of transformers' classes, hence built only once
    transformers is imported)."""
    with _lock:
        if _classes_cache:
            return _classes_cache
        import transformers
        from transformers.quantizers.base import HfQuantizer
        from transformers.utils.quantization_config import QuantizationConfigMixin

        if not _version_ok(transformers.__version__):
            lo, hi = SUPPORTED_TRANSFORMERS
            if not transformers.__version__.split(".")[0].isdigit() or int(transformers.__version__.split(".")[0]) < 5:
                raise ImportError(f"tersor.hf needs transformers {lo},{hi} (tested 5.25), found "
                                  f"{transformers.__version__}")
            warnings.warn(f"tersor.hf was tested with transformers 5.25 ({lo},{hi}), found "
                          f"{transformers.__version__}", stacklevel=2)

        class TersorConfig(QuantizationConfigMixin):
            """``quantization_config`` of a tersor-compressed model: tersor's checkpoint-manifest fields
            (``format``, ``version``, ``tersor_version``, ``layers``: one entry per tersor layer, as in
            ``tersor_manifest.json``). ``layout="aqlm"`` (with ``source``: AQLM's own config) is the
            transient form :func:`tersor.from_pretrained` uses to load AQLM's Hugging Face layout; once
            loaded, the config describes the model in the tersor layout.

            ``quantize``: quantize while loading a dense checkpoint,
            ``AutoModel*.from_pretrained(dense_dir, quantization_config=TersorConfig(quantize=tersor.E8PConfig(4,
            ldlq=False)))``: the dense weights load as usual, then :func:`tersor.quantize_` runs with that config
            (default filter) before ``from_pretrained`` returns. Data-free configs only (no calibration
            data reaches a loader): E8P with ``ldlq=False``, AQLM, magnitude 2:4 / BSR, lossless. Afterwards the
            config describes the compressed layers, so ``save_pretrained`` writes a pre-quantized checkpoint."""

            def __init__(self, layers: Optional[list] = None, format: Optional[str] = None,
                         version: Optional[int] = None, tersor_version: Optional[str] = None,
                         layout: str = "tersor", source: Optional[dict] = None, quantize: Any = None, **kwargs):
                from .api.checkpoint import FORMAT, VERSION
                from .api.configs import SageAttentionConfig, _Config, config_from_dict

                self.quant_method = QUANT_METHOD
                self.format = FORMAT if format is None else format
                self.version = VERSION if version is None else version
                self.tersor_version = tersor_version
                self.layout = layout
                self.layers = list(layers or [])
                if layout != "tersor":
                    self.source = dict(source or {})
                kwargs.pop("quant_method", None)
                if self.format != FORMAT:
                    raise ValueError(f"tersor quantization_config: format must be {FORMAT!r}, got {self.format!r}")
                if self.version != VERSION:
                    raise ValueError(f"tersor quantization_config: version {self.version!r}; this tersor reads "
                                     f"version {VERSION}")
                if layout not in ("tersor", "aqlm"):
                    raise ValueError(f"tersor quantization_config: layout must be 'tersor' or 'aqlm', got {layout!r}")
                if not isinstance(self.layers, list) or not all(isinstance(s, dict) and "fqn" in s
                                                                for s in self.layers):
                    raise ValueError("tersor quantization_config: layers must be a list of layer entries "
                                     "(docs/formats.md, tersor checkpoint v1)")
                # kept in its dict form so that the config stays JSON-serializable
                self.quantize = None
                if quantize is not None:
                    cfg = quantize if isinstance(quantize, _Config) else config_from_dict(quantize)
                    if isinstance(cfg, SageAttentionConfig):
                        raise ValueError("TersorConfig(quantize=...): SageAttentionConfig routes attention; pass "
                                         "attn_implementation='tersor_sage' to from_pretrained instead")
                    if cfg.stats:
                        raise ValueError(f"TersorConfig(quantize={cfg!r}) needs calibration data "
                                         f"({', '.join(cfg.stats)}), which a loader does not have: use a data-free "
                                         "config (E8PConfig(ldlq=False), magnitude pruning), or load the dense model "
                                         "and call tersor.quantize_(model, config, calibration=...)")
                    if self.layers:
                        raise ValueError("TersorConfig: quantize= is for dense checkpoints; this config already lists "
                                         "compressed layers")
                    self.quantize = cfg.to_dict()

            def quantize_config(self):
                """The tersor config to quantize with while loading (None: a pre-quantized checkpoint)."""
                from .api.configs import config_from_dict

                return None if self.quantize is None else config_from_dict(self.quantize)

            def refresh(self, model: nn.Module) -> None:
                """Describes ``model``'s tersor layers as they are now (tersor layout)."""
                from . import __version__
                from .api.checkpoint import layer_entries

                self.layers = layer_entries(model)
                self.tersor_version = __version__
                self.quantize = None  # done: the layers are what the config describes now
                if self.layout != "tersor":
                    self.layout = "tersor"
                    self.__dict__.pop("source", None)

        class TersorHfQuantizer(HfQuantizer):
            """Loads pre-quantized tersor models (and AQLM's layout, through :func:`tersor.from_pretrained`),
            quantizes dense checkpoints while loading (``TersorConfig(quantize=...)``), makes ``save_pretrained``
            write the tersor ``quantization_config`` and ``model.dequantize()`` give ``nn.Linear`` layers back
            (:func:`tersor.dequantize_`)."""

            requires_calibration = False  # both: pre-quantized checkpoints, and dense ones with quantize=...

            def __init__(self, quantization_config, **kwargs):
                super().__init__(quantization_config, **kwargs)
                if not self.pre_quantized and quantization_config.quantize is None:
                    raise ValueError("tersor: this checkpoint is not tersor-quantized; to quantize it while loading "
                                     "pass quantization_config=TersorConfig(quantize=<a data-free tersor config>), e.g. "
                                     "tersor.hf.TersorConfig(quantize=tersor.E8PConfig(4, ldlq=False))")

            def validate_environment(self, *args, **kwargs):
                return

            def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
                if self.pre_quantized:
                    _install_placeholders(model, self.quantization_config, checkpoint_files)
                return model

            def _process_model_after_weight_loading(self, model, **kwargs):
                if self.pre_quantized:
                    _build_from_placeholders(model)
                else:
                    from .api.quantize import quantize_

                    quantize_(model, self.quantization_config.quantize_config())
                self.quantization_config.refresh(model)
                return model

            def _dequantize(self, model, dtype=None):
                from .api.dequantize import dequantize_

                return dequantize_(model, dtype)

            def get_state_dict_and_metadata(self, model):
                # save_pretrained calls this before writing config.json: describe the layers as they are now
                self.quantization_config.refresh(model)
                return None, {}

            def is_serializable(self, *args, **kwargs):
                return True

            @property
            def is_trainable(self) -> bool:
                return False

            @property
            def is_compileable(self) -> bool:
                return True

        _classes_cache.update(TersorConfig=TersorConfig, TersorHfQuantizer=TersorHfQuantizer)
        return _classes_cache


def register() -> None:
    """Registers ``quant_method: "tersor"`` with transformers (imports it). Idempotent."""
    with _lock:
        cls = _classes()
        from transformers.quantizers import auto

        if auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not cls["TersorConfig"]:
            auto.AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
            auto.register_quantization_config(QUANT_METHOD)(cls["TersorConfig"])
        if auto.AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not cls["TersorHfQuantizer"]:
            auto.AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
            auto.register_quantizer(QUANT_METHOD)(cls["TersorHfQuantizer"])


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        try:
            register()
        except Exception as e:  # noqa: BLE001 -- never break transformers' own import
            warnings.warn(f"tersor: could not register the 'tersor' quantizer with transformers: {e}", stacklevel=2)


class _Hook(importlib.abc.MetaPathFinder):
    """Registers tersor when ``transformers.quantizers.auto`` is first imported, then removes itself."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _HOOK_TARGET:
            return None
        _remove_hook()
        spec = importlib.util.find_spec(fullname)  # the real spec, from the other finders
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _Loader(spec.loader)
        return spec


_hook: Optional[_Hook] = None


def _remove_hook():
    global _hook
    with _lock:
        if _hook is not None and _hook in sys.meta_path:
            sys.meta_path.remove(_hook)
        _hook = None


def _install() -> None:
    """Called by ``import tersor``: registers now if transformers' quantizer registry is loaded, else on its
    first import. Does nothing (and imports nothing) without transformers."""
    global _hook
    if _HOOK_TARGET in sys.modules:
        try:
            register()
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"tersor: could not register the 'tersor' quantizer with transformers: {e}", stacklevel=2)
        return
    if not transformers_available():
        return
    with _lock:
        if _hook is None:
            _hook = _Hook()
            sys.meta_path.insert(0, _hook)


def __getattr__(name):
    if name in ("TersorConfig", "TersorHfQuantizer"):
        return _classes()[name]
    raise AttributeError(f"module 'tersor.hf' has no attribute {name!r}")


# ------------------------------------------------------------------------------------------- saving
def _is_hf_model(model) -> bool:
    mod = sys.modules.get("transformers.modeling_utils")
    return mod is not None and isinstance(model, mod.PreTrainedModel)


def attach(model: nn.Module) -> nn.Module:
    """Makes a transformers model with tersor layers save as ``quant_method: "tersor"`` (sets
    ``model.hf_quantizer`` and ``model.config.quantization_config``). :func:`tersor.quantize_` and
    :func:`tersor.load` call it for transformers models."""
    register()
    cls = _classes()
    qc = getattr(model.config, "quantization_config", None)
    if not isinstance(qc, cls["TersorConfig"]):
        if qc is not None:
            method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
            raise ValueError(f"tersor: the model already has a {method!r} quantization_config; tersor layers cannot "
                             "be saved into it")
        qc = cls["TersorConfig"]()
    qc.refresh(model)
    quantizer = getattr(model, "hf_quantizer", None)
    if not isinstance(quantizer, cls["TersorHfQuantizer"]):
        quantizer = cls["TersorHfQuantizer"](qc, pre_quantized=True)
    quantizer.quantization_config = qc
    model.config.quantization_config = qc
    model.hf_quantizer = quantizer
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    for m in model.modules():
        if m is not model and _is_hf_model(m):
            m.config.quantization_config = qc
    return model


def maybe_attach(model: nn.Module) -> None:
    """:func:`attach` for transformers models that hold tersor layers; nothing otherwise (never imports
    transformers)."""
    if not _is_hf_model(model):
        return
    from .api.checkpoint import _layers

    if _layers(model):
        try:
            attach(model)
        except (ImportError, ValueError) as e:  # the model itself is fine; only save_pretrained is affected
            warnings.warn(f"tersor: save_pretrained will not write a tersor quantization_config: {e}", stacklevel=3)


# ------------------------------------------------------------------------------------------- loading
class _Placeholder(nn.Module):
    """Stands where a tersor layer will be while transformers loads the checkpoint: holds meta buffers of the
    layer's tensor names, shapes and dtypes, which the loader fills; :func:`_build_from_placeholders` then
    builds the real layer from them."""

    def __init__(self, spec: dict, model_fqn: str):
        super().__init__()
        self.spec, self.model_fqn = spec, model_fqn
        for name, t in spec["tensors"].items():
            self.register_buffer(name, torch.empty(t["shape"], dtype=_dtype_of(t["dtype"], spec, name),
                                                   device="meta"))

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"tersor: layer {self.model_fqn!r} was not built (its weights were never loaded)")


def _dtype_of(name: str, spec: dict, tensor: str) -> torch.dtype:
    from .api.checkpoint import _DTYPES

    d = _DTYPES.get(name)
    if d is None:
        key = f"{spec['fqn']}.{tensor}"
        raise ValueError(f"tersor: layer {spec['fqn']!r}, tensor {key!r}: unknown dtype {name!r}")
    return d


def _resolve(model: nn.Module, fqn: str) -> Optional[str]:
    """The model's module name for a checkpoint-level fqn (the checkpoint may have been saved from the model
    with or without its head, e.g. LlamaForCausalLM's ``model.layers.0...`` against LlamaModel's
    ``layers.0...``)."""
    names = dict(model.named_modules())
    if fqn in names:
        return fqn
    prefix = getattr(model, "base_model_prefix", "") or ""
    if prefix:
        if fqn.startswith(prefix + ".") and fqn[len(prefix) + 1:] in names:
            return fqn[len(prefix) + 1:]
        if f"{prefix}.{fqn}" in names:
            return f"{prefix}.{fqn}"
    return None


def _headers(checkpoint_files) -> Optional[dict[str, tuple[list, torch.dtype]]]:
    """key -> (shape, dtype) of every tensor in the safetensors files (headers only, no data read)."""
    if not checkpoint_files:
        return None
    from safetensors import SafetensorError, safe_open

    out = {}
    for path in checkpoint_files:
        if not str(path).endswith(".safetensors"):
            return None  # pickled checkpoints are not read by tersor
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for k in f.keys():
                    sl = f.get_slice(k)
                    out[k] = (list(sl.get_shape()), _ST_DTYPES.get(sl.get_dtype()))
        except SafetensorError as e:  # a damaged file: the caller's data
            raise ValueError(f"tersor.from_pretrained: {path} is not a valid safetensors file: {e}") from None
    return out


def _aqlm_specs(model: nn.Module, source: dict, headers: dict) -> list[dict]:
    """Layer entries (tersor manifest form) for the AQLM layers of a checkpoint in AQLM's Hugging Face layout."""
    og, ig = int(source.get("out_group_size", 1)), int(source.get("in_group_size", 8))
    if og != 1:
        raise NotImplementedError(f"tersor.from_pretrained: AQLM out_group_size={og}; tersor's AQLM kernels take "
                                  "out_group_size 1 only")
    if ig != 8:
        raise NotImplementedError(f"tersor.from_pretrained: AQLM in_group_size={ig}; tersor's AQLM kernels take "
                                  "in_group_size 8 only")
    nbits, ncb = source.get("nbits_per_codebook"), source.get("num_codebooks")
    dense = {str(n).removesuffix(".weight") for n in source.get("linear_weights_not_to_quantize") or []}
    specs = []
    for key in sorted(headers):
        if not key.endswith(".codes"):
            continue
        fqn = key[: -len(".codes")]
        if fqn in dense:
            raise ValueError(f"tersor.from_pretrained: layer {fqn!r}, tensor {key!r}: AQLM codes for a layer the "
                             "config lists in linear_weights_not_to_quantize")
        tensors = {}
        for name in ("codes", "codebooks", "scales", "bias"):
            if f"{fqn}.{name}" in headers:
                shape, dtype = headers[f"{fqn}.{name}"]
                if dtype is None:
                    raise ValueError(f"tersor.from_pretrained: layer {fqn!r}, tensor {fqn}.{name!r}: unknown dtype")
                tensors[name] = {"shape": shape, "dtype": _dtype_name(dtype)}
            elif name != "bias":
                raise ValueError(f"tersor.from_pretrained: layer {fqn!r}, tensor {f'{fqn}.{name}'!r}: missing from "
                                 "the checkpoint (AQLM layers need codes, codebooks and scales)")
        codes, books = tensors["codes"]["shape"], tensors["codebooks"]["shape"]
        if len(codes) != 3 or len(books) != 4:
            raise ValueError(f"tersor.from_pretrained: layer {fqn!r}, tensor {fqn + '.codes'!r} {codes} / "
                             f"{fqn + '.codebooks'!r} {books}: expected [out, in/8, C] and [C, 2^nbits, 1, 8]")
        if ncb is not None and books[0] != int(ncb):
            raise ValueError(f"tersor.from_pretrained: layer {fqn!r}, tensor {fqn + '.codebooks'!r}: {books[0]} "
                             f"codebooks, the config says num_codebooks={ncb}")
        if nbits is not None and books[1] != 1 << int(nbits):
            raise ValueError(f"tersor.from_pretrained: layer {fqn!r}, tensor {fqn + '.codebooks'!r}: {books[1]} "
                             f"entries, the config says nbits_per_codebook={nbits}")
        if list(books[2:]) != [og, ig]:
            raise ValueError(f"tersor.from_pretrained: layer {fqn!r}, tensor {fqn + '.codebooks'!r}: groups "
                             f"{books[2:]}, the config says [out_group_size, in_group_size] = [{og}, {ig}]")
        specs.append({"fqn": fqn, "format": "aqlm", "in_features": codes[1] * ig, "out_features": codes[0] * og,
                      "bias": "bias" in tensors,
                      "config": {"num_codebooks": books[0], "nbits": books[1].bit_length() - 1,
                                 "in_group_size": ig, "out_group_size": og},
                      "tensors": tensors})
    if not specs:
        raise ValueError("tersor.from_pretrained: quant_method 'aqlm' but the checkpoint has no '*.codes' tensors")
    return specs


def _install_placeholders(model: nn.Module, qc, checkpoint_files) -> None:
    from .api.checkpoint import check_target

    who = "tersor.from_pretrained"
    headers = _headers(checkpoint_files)
    if qc.layout == "aqlm":
        if headers is None:
            raise ValueError(f"{who}: AQLM checkpoints are read from safetensors files only")
        specs = _aqlm_specs(model, qc.source, headers)
    else:
        specs = qc.layers
    for spec in specs:
        fqn = spec["fqn"]
        parts = None
        if spec.get("format") == "e8p_fused":  # a fused QuIP# layer: not in the model yet, its parts are
            from .api.checkpoint import check_fused_target

            parts, target = check_fused_target(model, spec, who, resolve=lambda n: _resolve(model, n))
        else:
            target = _resolve(model, fqn)
            if target is None:
                raise ValueError(f"{who}: layer {fqn!r}: the model has no such module")
            check_target(model.get_submodule(target), spec, who)
        if headers is not None and qc.layout == "tersor":
            for name, t in spec["tensors"].items():
                key = f"{fqn}.{name}"
                if key not in headers:
                    raise ValueError(f"{who}: layer {fqn!r}, tensor {key!r}: listed in quantization_config, not in "
                                     "the safetensors files")
                shape, dtype = headers[key]
                if list(shape) != list(t["shape"]) or (dtype is not None and _dtype_name(dtype) != t["dtype"]):
                    raise ValueError(f"{who}: layer {fqn!r}, tensor {key!r}: the file holds "
                                     f"{_dtype_name(dtype) if dtype else '?'} {list(shape)}, quantization_config says "
                                     f"{t['dtype']} {t['shape']}")
            prefix = fqn + "."
            for key in headers:
                if key.startswith(prefix) and "." not in key[len(prefix):] and key[len(prefix):] not in spec["tensors"]:
                    raise ValueError(f"{who}: layer {fqn!r}, tensor {key!r}: in the safetensors files, not listed for "
                                     "the layer in quantization_config")
        placeholder = _Placeholder(spec, target)
        if parts is None:
            model.set_submodule(target, placeholder)
        else:
            placeholder.fused_parts = parts
            for name in parts:  # weightless until the fused layer is built (_build_from_placeholders)
                model.set_submodule(name, _Placeholder({"fqn": name, "tensors": {}}, name))
            parent, _, leaf = target.rpartition(".")
            (model.get_submodule(parent) if parent else model).add_module(leaf, placeholder)


def _build_from_placeholders(model: nn.Module) -> None:
    from .api.checkpoint import build_layer

    for name, mod in list(model.named_modules()):
        if not isinstance(mod, _Placeholder) or not mod.spec["tensors"]:
            continue  # (a fused layer's part: replaced when the fused layer is built)
        spec = mod.spec
        tensors = dict(mod._buffers)
        for n, t in tensors.items():
            if t is None or t.device.type == "meta":
                raise ValueError(f"tersor.from_pretrained: layer {spec['fqn']!r}, tensor {spec['fqn'] + '.' + n!r}: "
                                 "not loaded from the checkpoint")
        device = next(iter(tensors.values())).device
        try:
            new = build_layer(spec, tensors, device)
        except (ValueError, TypeError, RuntimeError) as e:
            raise ValueError(f"tersor.from_pretrained: layer {spec['fqn']!r} ({spec['format']}): {e}") from None
        if getattr(mod, "fused_parts", None) is not None:
            from .api.checkpoint import install_fused

            install_fused(model, name, new, mod.fused_parts)
        else:
            model.set_submodule(name, new)


def _read_config(path) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"tersor.from_pretrained: {cfg_path} not found (a local model directory is needed)")
    with open(cfg_path) as f:
        cfg = json.load(f)
    if not isinstance(cfg, dict):
        raise ValueError(f"tersor.from_pretrained: {cfg_path} is not a JSON object")
    return cfg


def _model_class(cfg: dict, model_cls):
    import transformers

    if model_cls is not None:
        return model_cls
    for arch in cfg.get("architectures") or []:
        cls = getattr(transformers, str(arch), None)  # a class of transformers itself: nothing from the files runs
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    return transformers.AutoModel


def from_pretrained(path: Union[str, os.PathLike], *, model_cls=None, **kwargs) -> nn.Module:
    """Loads a compressed checkpoint directory, dispatching on ``config.json``'s
    ``quantization_config.quant_method``:

    * ``"tersor"``: ``model_cls.from_pretrained(path, **kwargs)`` with tersor's quantizer (the same as
      ``AutoModel*.from_pretrained`` after ``import tersor``);
    * ``"aqlm"``: AQLM's Hugging Face layout (``*.codes``/``*.codebooks``/``*.scales``; config fields
      ``nbits_per_codebook``, ``num_codebooks``, ``in_group_size``, ``out_group_size``,
      ``linear_weights_not_to_quantize``) loaded into :class:`tersor.nn.AQLMLinear` layers: int8 or int16
      codes for any nbits <= 16 (int32/int64 with a range check, see AQLMLinear), broadcast ``[1, 1, 1, 1]`` scales; out_group_size != 1 or in_group_size != 8
      raise NotImplementedError. The loaded model saves in the tersor layout;
    * ``"quip#"`` / ``"quipsharp"``: QuIP#'s layout, through
      ``tersor.api.quipsharp_ckpt.load_quipsharp_layers(model, state_dict, quant_config)``.

    ``model_cls``: the transformers class to build (default: ``config.json``'s ``architectures[0]`` looked up in
    transformers, else ``AutoModel``). Other keywords go to ``from_pretrained`` (``dtype``, ``device_map``, ...).
    Local directories only; reads JSON and safetensors, never runs code from the files
    (``trust_remote_code`` is refused)."""
    if kwargs.get("trust_remote_code"):
        raise ValueError("tersor.from_pretrained: trust_remote_code is not supported (loading never runs code from "
                         "the files)")
    path = os.fspath(path)
    cfg = _read_config(path)
    qc = cfg.get("quantization_config")
    if not isinstance(qc, dict) or "quant_method" not in qc:
        raise ValueError(f"tersor.from_pretrained: {path}/config.json has no quantization_config with a quant_method "
                         "(an uncompressed model: load it with transformers, then tersor.quantize_)")
    method = str(qc["quant_method"]).lower()
    register()
    cls = _model_class(cfg, model_cls)
    from safetensors import SafetensorError

    try:
        if method == QUANT_METHOD:
            return cls.from_pretrained(path, **kwargs)
        if method == "aqlm":
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(path)
            config.quantization_config = {"quant_method": QUANT_METHOD, "layout": "aqlm", "source": dict(qc)}
            return cls.from_pretrained(path, config=config, **kwargs)
        if method in ("quip#", "quipsharp", "quip_sharp"):
            return _from_quipsharp(path, cfg, qc, cls, **kwargs)
    except SafetensorError as e:  # transformers reads the files first: a damaged one is the caller's data
        raise ValueError(f"tersor.from_pretrained: {path}: a safetensors file is damaged: {e}") from None
    raise NotImplementedError(f"tersor.from_pretrained: quant_method {qc['quant_method']!r} is not supported (tersor "
                              "reads 'tersor', 'aqlm', 'quip#')")


class _ParamsOnMeta:
    """Builds modules with their parameters on ``meta`` and their buffers real (so that buffers a model
    computes in ``__init__``, e.g. rotary ``inv_freq``, exist without the checkpoint)."""

    def __enter__(self):
        self._orig = nn.Module.register_parameter

        def register_parameter(mod, name, param):
            self._orig(mod, name, param)
            if param is not None and param.device.type != "meta":
                p = mod._parameters[name]
                mod._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

        nn.Module.register_parameter = register_parameter
        return self

    def __exit__(self, *exc):
        nn.Module.register_parameter = self._orig


def _from_quipsharp(path, cfg, qc, cls, dtype=None, device=None, **kwargs):
    try:
        from .api.quipsharp_ckpt import load_quipsharp_layers
    except ImportError as e:
        if e.name in ("tersor.api.quipsharp_ckpt", __package__ + ".api.quipsharp_ckpt"):
            raise NotImplementedError("tersor.from_pretrained: QuIP# checkpoints need "
                                      "tersor.api.quipsharp_ckpt.load_quipsharp_layers(model, state_dict, "
                                      "quant_config), which this tersor does not have") from None
        raise
    if kwargs:
        raise TypeError(f"tersor.from_pretrained (QuIP#): unsupported keyword arguments {sorted(kwargs)}")
    from safetensors.torch import load_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    files = _weight_files(path)
    state = {}
    for f in files:
        state.update(load_file(f, device="cpu"))
    if dtype is None:
        dtype = next((t.dtype for t in state.values() if t.dtype in (torch.float16, torch.bfloat16, torch.float32)),
                     torch.float32)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with _ParamsOnMeta():
            # a model class has _from_config; an Auto* class only from_config
            build = getattr(cls, "_from_config", None) or getattr(cls, "from_config", None)
            model = build(config, dtype=dtype) if build is not None else cls(config)
    finally:
        torch.set_default_dtype(old)
    # The loader swaps the quantized layers in place (and may load other tensors); it returns a report, or a
    # new model. Whatever it left on meta is loaded from the file below.
    out = load_quipsharp_layers(model, state, dict(qc))
    if isinstance(out, nn.Module):
        model = out
    _load_rest(model, state, "tersor.from_pretrained")
    if device is not None:
        model.to(device)
    return model.eval()


def _weight_files(path) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map", {})
        return sorted({os.path.join(path, os.path.basename(v)) for v in weight_map.values()})
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise ValueError(f"tersor.from_pretrained: no model.safetensors (or index) in {path}")


def _load_rest(model: nn.Module, state: dict, who: str) -> None:
    """Loads the model's tensors that are still on ``meta`` from ``state`` (keys as the model names them, or
    with/without the base model prefix), then ties weights; raises ValueError naming the tensor otherwise."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    todo = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.device.type != "meta":
            continue
        for key in (name, f"{prefix}.{name}", name.removeprefix(prefix + ".")):
            if key in state:
                todo[name] = state[key]
                break
    for name, t in todo.items():
        have = model.get_parameter(name) if name in dict(model.named_parameters()) else model.get_buffer(name)
        if tuple(have.shape) != tuple(t.shape):
            raise ValueError(f"{who}: tensor {name!r}: the model's is {list(have.shape)}, the checkpoint's "
                             f"{list(t.shape)}")
    model.load_state_dict(todo, strict=False, assign=True)
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.device.type == "meta":
            owner = name.rpartition(".")[0]
            raise ValueError(f"{who}: layer {owner!r}, tensor {name!r}: not in the checkpoint")
