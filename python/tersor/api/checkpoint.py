"""``tersor.save`` / ``tersor.load``: a compressed model as ``model.safetensors`` + ``tersor_manifest.json``
(docs/formats.md, "tersor checkpoint v1"). Loading reads only JSON and safetensors: no code from the files
runs."""

from __future__ import annotations

import json
import os
from typing import Optional, Union

import torch
from torch import nn

from ..nn import AQLMLinear, CompressedLinear, E8PLinear, SparseLinear

FORMAT = "tersor-checkpoint"
VERSION = 1
MANIFEST = "tersor_manifest.json"
WEIGHTS = "model.safetensors"
LAYER_CLASSES = {"e8p": E8PLinear, "aqlm": AQLMLinear, "sparse": SparseLinear, "codec": CompressedLinear}
_DTYPES = {str(d).replace("torch.", ""): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2)}


def _dtype_name(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def _fused_classes():
    from .quipsharp_ckpt import E8PFusedLinear, E8PFusedPart

    return E8PFusedLinear, E8PFusedPart


def _layers(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    fused_cls = _fused_classes()[0]
    out = []
    for fqn, m in model.named_modules():
        fmt = "e8p_fused" if type(m) is fused_cls else next((f for f, c in LAYER_CLASSES.items() if type(m) is c), None)
        if fmt is not None:
            out.append((fqn, m, fmt))
    return out


def _fused_parts(model: nn.Module, fqn: str, fused: nn.Module) -> list[str]:
    # The fqns of the E8PFusedPart modules that stand in for the fused layer's parts, in part order.
    part_cls = _fused_classes()[1]
    found: dict[int, list[str]] = {}
    for name, m in model.named_modules():
        if type(m) is part_cls and m.fused is fused:
            found.setdefault(m.index, []).append(name)
    n = len(fused.fuse_sizes)
    for i in range(n):
        if len(found.get(i, [])) != 1:
            raise ValueError(f"tersor.save: fused layer {fqn!r}: part {i} stands at {found.get(i, [])} in the model "
                             f"(a saved fused layer needs exactly one E8PFusedPart per part)")
    return [found[i][0] for i in range(n)]


def layer_entries(model: nn.Module, state: Optional[dict] = None) -> list[dict]:
    """The manifest's ``layers`` list for ``model``'s tersor layers (per layer: fqn, format, in/out features,
    bias, config, and the dtype and shape of each of its tensors). Shared by :func:`save` and the Hugging
    Face ``quantization_config`` (tersor.hf), so that both carry the same per-layer format."""
    state = model.state_dict() if state is None else state
    layers = []
    for fqn, mod, fmt in _layers(model):
        prefix = fqn + "."
        names = sorted(n[len(prefix):] for n in state if n.startswith(prefix) and "." not in n[len(prefix):])
        config = mod.layer_config()
        if fmt == "e8p_fused":
            config["parts"] = _fused_parts(model, fqn, mod)
        layers.append({
            "fqn": fqn, "format": fmt, "in_features": int(mod.in_features), "out_features": int(mod.out_features),
            "bias": mod.bias is not None, "config": config,
            "tensors": {n: {"dtype": _dtype_name(state[prefix + n].dtype), "shape": list(state[prefix + n].shape)}
                        for n in names},
        })
    return layers


def check_target(mod: nn.Module, spec: dict, who: str = "tersor.load") -> None:
    """Raises ValueError (naming the layer and the tensor) unless ``mod`` can be replaced by the layer ``spec``
    describes: an ``nn.Linear`` (or tersor layer) of the same shape and bias."""
    fqn = spec["fqn"]
    shape = (spec["out_features"], spec["in_features"])
    if not isinstance(mod, (nn.Linear,) + tuple(LAYER_CLASSES.values())):
        raise ValueError(f"{who}: layer {fqn!r}: the model has a {type(mod).__name__} there, not an nn.Linear")
    if (mod.out_features, mod.in_features) != shape:
        raise ValueError(f"{who}: layer {fqn!r}, tensor {fqn + '.weight'!r}: the model's layer is "
                         f"[{mod.out_features}, {mod.in_features}], the checkpoint's {list(shape)}")
    if (getattr(mod, "bias", None) is not None) != spec["bias"]:
        raise ValueError(f"{who}: layer {fqn!r}, tensor {fqn + '.bias'!r}: the model's layer "
                         f"{'has' if mod.bias is not None else 'has no'} bias, the checkpoint's "
                         f"{'has' if spec['bias'] else 'has none'}")


def check_fused_target(model: nn.Module, spec: dict, who: str = "tersor.load", resolve=None
                       ) -> tuple[list[str], str]:
    """For an ``e8p_fused`` entry: checks that ``model`` has, at each of the entry's ``config.parts``, an
    ``nn.Linear`` (or an E8PFusedPart) with the fused layer's in_features, that part's rows and the entry's
    bias, and nothing but a fused layer at the entry's fqn (whose parent must exist). Returns the parts'
    module names and the fused layer's (``resolve``: maps a checkpoint fqn to the model's module name or
    None, default the same; the fused layer, not yet in the model, goes next to its first part)."""
    fqn, cfg = spec["fqn"], spec.get("config", {})
    resolve = resolve or (lambda name: name)
    parts, sizes = cfg.get("parts"), cfg.get("fuse_sizes")
    if (not isinstance(parts, list) or not isinstance(sizes, list) or len(parts) != len(sizes)
            or not all(isinstance(p, str) for p in parts)):
        raise ValueError(f"{who}: fused layer {fqn!r}: config parts {parts!r} and fuse_sizes {sizes!r} must be "
                         f"lists of the same length")
    part_cls = _fused_classes()[1]
    names = []
    for i, (p, rows) in enumerate(zip(parts, sizes)):
        name = resolve(p)
        try:
            mod = model.get_submodule(name) if name is not None else None
        except AttributeError:
            mod = None
        if not isinstance(mod, (nn.Linear, part_cls)):
            raise ValueError(f"{who}: fused layer {fqn!r}: its part {i} {p!r} is "
                             f"{'not in the model' if mod is None else 'a ' + type(mod).__name__} (expected an "
                             f"nn.Linear)")
        if (mod.out_features, mod.in_features) != (rows, spec["in_features"]):
            raise ValueError(f"{who}: fused layer {fqn!r}, tensor {p + '.weight'!r}: the model's part is "
                             f"[{mod.out_features}, {mod.in_features}], the checkpoint's [{rows}, {spec['in_features']}]")
        if isinstance(mod, nn.Linear) and (mod.bias is not None) != spec["bias"]:
            raise ValueError(f"{who}: fused layer {fqn!r}, tensor {p + '.bias'!r}: the model's part "
                             f"{'has' if mod.bias is not None else 'has no'} bias, the checkpoint's fused layer "
                             f"{'has' if spec['bias'] else 'has none'}")
        names.append(name)
    target = resolve(fqn) or ".".join(filter(None, (names[0].rpartition(".")[0], fqn.rpartition(".")[2])))
    parent, _, leaf = target.rpartition(".")
    try:
        holder = model.get_submodule(parent) if parent else model
    except AttributeError:
        raise ValueError(f"{who}: fused layer {fqn!r}: the model has no module {parent!r}") from None
    have = holder._modules.get(leaf)
    if have is not None and type(have) is not _fused_classes()[0] and type(have).__name__ != "_Placeholder":
        raise ValueError(f"{who}: fused layer {fqn!r}: the model has a {type(have).__name__} there")
    if have is None and hasattr(holder, leaf):
        raise ValueError(f"{who}: fused layer {fqn!r}: the model's {parent or 'root'} has an attribute {leaf!r}")
    return names, target


def install_fused(model: nn.Module, fqn: str, fused: nn.Module, parts: list[str]) -> None:
    """Registers ``fused`` (an E8PFusedLinear) at ``fqn`` and puts an E8PFusedPart in place of each part."""
    part_cls = _fused_classes()[1]
    leaf = fqn.rpartition(".")[2]
    for i, name in enumerate(parts):
        model.set_submodule(name, part_cls(fused, i, leaf))
    parent, _, leaf = fqn.rpartition(".")
    (model.get_submodule(parent) if parent else model).add_module(leaf, fused)


def save(model: nn.Module, directory: Union[str, os.PathLike]) -> None:
    """Writes ``directory/model.safetensors`` (every tensor of ``model.state_dict()`` plus the model's
    non-persistent buffers, so that a ``meta``-built skeleton can be completed) and
    ``directory/tersor_manifest.json`` (format version; per tersor layer: fqn, format, config, shapes and
    dtypes of its tensors). Tensors shared by several names (tied weights) are stored once. ``model`` is not
    modified."""
    from safetensors.torch import save_file

    from .. import __version__

    if not isinstance(model, nn.Module):
        raise TypeError(f"tersor.save: model must be an nn.Module, got {type(model).__name__}")
    os.makedirs(directory, exist_ok=True)
    state = model.state_dict()
    nonpersistent = {}
    for prefix, mod in model.named_modules():
        for name in mod._non_persistent_buffers_set:
            buf = mod._buffers.get(name)
            if buf is not None:
                nonpersistent[f"{prefix}.{name}" if prefix else name] = buf
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set = set()
    for name, t in list(state.items()) + list(nonpersistent.items()):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"tersor.save: state entry {name!r} is not a tensor ({type(t).__name__})")
        if t.device.type == "meta":
            raise ValueError(f"tersor.save: tensor {name!r} is on the meta device (no data to save)")
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        if t.numel():
            seen[key] = name
        c = t.to("cpu").contiguous()
        ptr = c.untyped_storage().data_ptr()
        if ptr in storages or c.untyped_storage().nbytes() != c.numel() * c.element_size():
            c = c.clone()  # safetensors stores each storage once: give partial views their own
        storages.add(c.untyped_storage().data_ptr())
        out[name] = c
    layers = layer_entries(model, state)
    manifest = {
        "format": FORMAT, "version": VERSION, "tersor_version": __version__,
        "torch_version": torch.__version__.split("+")[0], "weights": WEIGHTS, "layers": layers,
        "tensors": {n: {"dtype": _dtype_name(t.dtype), "shape": list(t.shape)} for n, t in out.items()},
        "aliases": aliases, "nonpersistent_buffers": sorted(nonpersistent),
    }
    save_file(out, os.path.join(directory, WEIGHTS), metadata={"format": "pt", FORMAT: str(VERSION)})
    with open(os.path.join(directory, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")


def _owner(name: str, layer_fqns: set) -> str:
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if ".".join(parts[:i]) in layer_fqns:
            return ".".join(parts[:i])
    return ".".join(parts[:-1]) or "<root>"


def _mismatch(name: str, layer_fqns: set, what: str) -> ValueError:
    return ValueError(f"tersor.load: layer {_owner(name, layer_fqns)!r}, tensor {name!r}: {what}")


def _read_manifest(directory) -> dict:
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise ValueError(f"tersor.load: {path} not found (not a tersor checkpoint directory)")
    with open(path) as f:
        manifest = json.load(f)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"tersor.load: {path} is not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise ValueError(f"tersor.load: {path} has version {manifest.get('version')!r}; this tersor reads version "
                         f"{VERSION}")
    for key in ("layers", "tensors", "aliases", "nonpersistent_buffers"):
        if key not in manifest:
            raise ValueError(f"tersor.load: {path} has no {key!r}")
    check_manifest_fields(manifest, f"tersor.load: {path}")
    return manifest


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_tensor_spec(spec, where: str) -> None:
    if not isinstance(spec, dict) or not isinstance(spec.get("dtype"), str) or not isinstance(spec.get("shape"), list) \
            or not all(_is_int(d) and d >= 0 for d in spec["shape"]):
        raise ValueError(f"{where} must be {{\"dtype\": <str>, \"shape\": [<int >= 0>, ...]}}, got {spec!r:.200}")


def check_layer_spec(spec, who: str) -> None:
    """ValueError unless a manifest layer entry has every field a loader reads, of the right JSON type (a
    manifest is data from a file: a wrong type must not surface as a KeyError or TypeError deep inside)."""
    if not isinstance(spec, dict):
        raise ValueError(f"{who}: a 'layers' entry must be an object, got {type(spec).__name__}")
    fqn = spec.get("fqn")
    if not isinstance(fqn, str) or not fqn:
        raise ValueError(f"{who}: a 'layers' entry has no 'fqn' string (got {fqn!r:.100})")
    for key, ok, what in (("format", lambda v: isinstance(v, str), "a string"),
                          ("in_features", lambda v: _is_int(v) and v > 0, "a positive int"),
                          ("out_features", lambda v: _is_int(v) and v > 0, "a positive int"),
                          ("bias", lambda v: isinstance(v, bool), "true or false"),
                          ("config", lambda v: isinstance(v, dict), "an object"),
                          ("tensors", lambda v: isinstance(v, dict), "an object")):
        if key not in spec or not ok(spec[key]):
            raise ValueError(f"{who}: layer {fqn!r}: {key!r} must be {what}, got {spec.get(key)!r:.100}")
    for name, t in spec["tensors"].items():
        _check_tensor_spec(t, f"{who}: layer {fqn!r}, tensor {fqn + '.' + name!r}")


def check_manifest_fields(manifest: dict, who: str) -> None:
    """The JSON types of a version-1 manifest's fields (docs/formats.md), checked before anything is read."""
    weights = manifest.get("weights", WEIGHTS)
    # A file name inside the checkpoint directory, never a path: a manifest must not make tersor.load open
    # other files.
    if not isinstance(weights, str) or not weights or os.path.basename(weights) != weights or weights in (".", ".."):
        raise ValueError(f"{who}: 'weights' must be a file name in the checkpoint directory, got {weights!r:.100}")
    if not isinstance(manifest["layers"], list):
        raise ValueError(f"{who}: 'layers' must be a list, got {type(manifest['layers']).__name__}")
    fqns = set()
    for spec in manifest["layers"]:
        check_layer_spec(spec, who)
        if spec["fqn"] in fqns:
            raise ValueError(f"{who}: layer {spec['fqn']!r} is listed twice")
        fqns.add(spec["fqn"])
    if not isinstance(manifest["tensors"], dict):
        raise ValueError(f"{who}: 'tensors' must be an object, got {type(manifest['tensors']).__name__}")
    for name, t in manifest["tensors"].items():
        _check_tensor_spec(t, f"{who}: tensor {name!r}")
    aliases = manifest["aliases"]
    if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()):
        raise ValueError(f"{who}: 'aliases' must be an object of name -> stored name strings")
    nonpersistent = manifest["nonpersistent_buffers"]
    if not isinstance(nonpersistent, list) or not all(isinstance(v, str) and v for v in nonpersistent):
        raise ValueError(f"{who}: 'nonpersistent_buffers' must be a list of names")


def build_layer(spec: dict, tensors: dict[str, torch.Tensor], device) -> nn.Module:
    """The tersor layer a manifest entry describes, built from its tensors through the layer's own
    constructor and validators (ValueError/TypeError on a mismatch), of the entry's in/out features."""
    layer = _build_layer(spec, tensors, device)
    got, want = (layer.out_features, layer.in_features), (spec["out_features"], spec["in_features"])
    if got != want:  # the tensors describe another weight shape than the entry (and the model's module) says
        raise ValueError(f"its tensors hold a {list(got)} weight, the manifest says {list(want)}")
    return layer


def _build_layer(spec: dict, tensors: dict[str, torch.Tensor], device) -> nn.Module:
    fmt, cfg, fqn = spec["format"], spec.get("config", {}), spec["fqn"]
    bias = tensors.get("bias")
    if fmt in ("e8p", "e8p_fused"):
        # "hadamard" absent: a checkpoint written before it was recorded, always tersor's own H_K then.
        # "bits" declares the width (and must match a saved codebook_id; files before it have none).
        bits = cfg.get("bits")
        if bits not in (2, 3, 4) or isinstance(bits, bool):
            raise ValueError(f"config bits must be 2, 3 or 4, got {bits!r}")
        kw = {"hadamard": cfg.get("hadamard", "tersor"), "bits": bits}
        if fmt == "e8p":
            return E8PLinear(dict(tensors), **kw)
        sizes = cfg.get("fuse_sizes")
        if not isinstance(sizes, list) or not all(isinstance(x, int) for x in sizes):
            raise ValueError(f"config fuse_sizes must be a list of ints, got {sizes!r}")
        return _fused_classes()[0](dict(tensors), sizes, **kw)
    if fmt == "aqlm":
        for key in ("codes", "codebooks", "scales"):
            if key not in tensors:
                raise ValueError(f"tensor {key!r} is missing")
        return AQLMLinear(tensors["codes"], tensors["codebooks"], tensors["scales"], bias)
    if fmt == "sparse":
        dtype = _DTYPES.get(cfg.get("dtype"))
        if dtype is None:
            raise ValueError(f"config dtype {cfg.get('dtype')!r} is not a dtype")
        values_dtype = None
        if cfg.get("pattern") == "2:4":
            # Written since values_dtype existed: the config says. Before, a float32 layer stored bfloat16
            # values and the config did not say: the tensor's own dtype is the answer then.
            values_dtype = _DTYPES.get(cfg["values_dtype"]) if "values_dtype" in cfg else \
                getattr(tensors.get("values"), "dtype", None)
            if "values_dtype" in cfg and values_dtype is None:
                raise ValueError(f"config values_dtype {cfg['values_dtype']!r} is not a dtype")
        layer = SparseLinear(spec["in_features"], spec["out_features"], bias=bias is not None,
                             pattern=cfg.get("pattern"), dtype=dtype, device=device,
                             blocksize=int(cfg.get("blocksize", 64)), values_dtype=values_dtype)
        layer.load_state_dict(tensors, strict=True)
        return layer
    if fmt == "codec":
        from .. import codec

        if "stream" not in tensors:
            raise ValueError("tensor 'stream' is missing")
        ct = codec.CompressedTensor.from_bytes(tensors["stream"])
        if list(ct.shape) != [spec["out_features"], spec["in_features"]] or _dtype_name(ct.dtype) != cfg.get("dtype"):
            raise ValueError(f"tensor 'stream' holds a {_dtype_name(ct.dtype)} {list(ct.shape)} weight, the manifest "
                             f"says {cfg.get('dtype')} [{spec['out_features']}, {spec['in_features']}]")
        return CompressedLinear(ct, bias, fused=bool(cfg.get("fused", False)))
    raise ValueError(f"unknown format {fmt!r} (this tersor reads {sorted(LAYER_CLASSES) + ['e8p_fused']})")


def load(model: nn.Module, directory: Union[str, os.PathLike], *, device: Optional[Union[str, torch.device]] = None
         ) -> nn.Module:
    """Loads a :func:`save` checkpoint into ``model`` (same architecture; its weights may be on ``meta``, e.g.
    built under ``torch.device("meta")``), in place, and returns it: each layer the manifest lists is
    replaced by a tersor layer built from the file's tensors, then every other tensor is loaded (meta
    tensors materialised). ``device``: where the tensors go (default: the model's device, CPU for a
    meta model). Any mismatch between the manifest, the tensors and the model raises ValueError naming the
    layer and the tensor. Reads JSON and safetensors only."""
    from safetensors import safe_open

    manifest = _read_manifest(directory)
    if device is None:
        device = next((t.device for t in list(model.parameters()) + list(model.buffers()) if t.device.type != "meta"),
                      torch.device("cpu"))
    device = torch.device(device)
    layer_specs = manifest["layers"]
    layer_fqns = {s["fqn"] for s in layer_specs}
    path = os.path.join(directory, manifest.get("weights", WEIGHTS))
    if not os.path.isfile(path):
        raise ValueError(f"tersor.load: {path} not found")
    expected = manifest["tensors"]
    from safetensors import SafetensorError

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            keys = set(f.keys())
            for name in sorted(keys ^ set(expected)):
                raise _mismatch(name, layer_fqns, "in the safetensors file but not in the manifest" if name in keys
                                else "in the manifest but not in the safetensors file")
            tensors = {}
            for name in sorted(keys):
                t = f.get_tensor(name)
                spec = expected[name]
                if list(t.shape) != list(spec["shape"]) or _dtype_name(t.dtype) != spec["dtype"]:
                    raise _mismatch(name, layer_fqns, f"the file holds {_dtype_name(t.dtype)} {list(t.shape)}, the "
                                    f"manifest says {spec['dtype']} {spec['shape']}")
                tensors[name] = t.to(device)
    except SafetensorError as e:  # a damaged file (header, offsets, sizes): the caller's data
        raise ValueError(f"tersor.load: {path} is not a valid safetensors file: {e}") from None
    for alias, target in manifest["aliases"].items():
        if target not in tensors:
            raise _mismatch(alias, layer_fqns, f"alias of {target!r}, which the file does not hold")
        tensors[alias] = tensors[target]

    # 1. the tersor layers
    nonpersistent = set(manifest["nonpersistent_buffers"])
    for spec in layer_specs:
        fqn = spec["fqn"]
        if spec.get("format") == "e8p_fused":
            parts, target = check_fused_target(model, spec)
            if target != fqn:
                raise ValueError(f"tersor.load: fused layer {fqn!r}: its parts are not next to it in the model")
        else:
            parts = None
            try:
                mod = model.get_submodule(fqn)
            except AttributeError:
                raise ValueError(f"tersor.load: layer {fqn!r}: the model has no such module") from None
            check_target(mod, spec)
        prefix = fqn + "."
        own = {n[len(prefix):]: t for n, t in tensors.items()
               if n.startswith(prefix) and "." not in n[len(prefix):] and n not in nonpersistent}
        for n, t in own.items():
            if n not in spec["tensors"]:
                raise ValueError(f"tersor.load: layer {fqn!r}, tensor {prefix + n!r}: not listed for the layer")
        for n in spec["tensors"]:
            if n not in own:
                raise ValueError(f"tersor.load: layer {fqn!r}, tensor {prefix + n!r}: listed for the layer, not in the file")
        try:
            new = build_layer(spec, own, device)
        except (ValueError, TypeError, RuntimeError) as e:
            raise ValueError(f"tersor.load: layer {fqn!r} ({spec.get('format')}): {e}") from None
        # Layers that compute in one dtype (2:4/BSR: x must be theirs; codec: F.linear with the decoded weight)
        # must match a materialized model's nn.Linear, as every other tensor must (a meta model takes the
        # checkpoint's dtypes).
        fixed = getattr(new, "io_dtype", None) if isinstance(new, SparseLinear) else \
            getattr(new, "_dtype", None) if isinstance(new, CompressedLinear) else None
        w = mod.weight if parts is None and type(mod) is nn.Linear else None
        if fixed is not None and w is not None and w.device.type != "meta" and w.dtype != fixed:
            raise ValueError(f"tersor.load: layer {fqn!r}, tensor {fqn + '.weight'!r}: the model's layer is "
                             f"{_dtype_name(w.dtype)}, the checkpoint's {_dtype_name(fixed)} (convert the model's "
                             f"dtype first, or build it on meta)")
        install_fused(model, fqn, new, parts) if parts is not None else model.set_submodule(fqn, new)

    # 2. everything else
    model_state = model.state_dict(keep_vars=True)
    rest = {n: t for n, t in tensors.items() if n not in nonpersistent and _owner(n, layer_fqns) not in layer_fqns}
    for name in sorted(set(model_state) - set(tensors)):
        if _owner(name, layer_fqns) in layer_fqns:
            continue  # a tersor layer's own tensor, built above (e.g. an E8P codebook_id, absent from older files)
        raise _mismatch(name, layer_fqns, "the model has it, the checkpoint does not")
    for name in sorted(set(tensors) - set(model_state) - nonpersistent):
        raise _mismatch(name, layer_fqns, "the checkpoint has it, the model does not")
    for name, t in rest.items():
        have = model_state[name]
        if tuple(have.shape) != tuple(t.shape):
            raise _mismatch(name, layer_fqns, f"the model's is {list(have.shape)}, the checkpoint's {list(t.shape)}")
        if have.device.type != "meta" and have.dtype != t.dtype:
            raise _mismatch(name, layer_fqns, f"the model's is {_dtype_name(have.dtype)}, the checkpoint's "
                            f"{_dtype_name(t.dtype)} (convert the model's dtype first, or build it on meta)")
    result = model.load_state_dict(rest, strict=False, assign=True)
    leftover = [k for k in result.missing_keys if _owner(k, layer_fqns) not in layer_fqns]
    if leftover or result.unexpected_keys:
        name = (leftover + list(result.unexpected_keys))[0]
        raise _mismatch(name, layer_fqns, "not loaded")
    for name in sorted(nonpersistent):
        prefix, _, attr = name.rpartition(".")
        try:
            mod = model.get_submodule(prefix) if prefix else model
        except AttributeError:
            raise _mismatch(name, layer_fqns, "the model has no such module") from None
        if attr not in mod._buffers:
            raise _mismatch(name, layer_fqns, "the model has no such buffer")
        old = mod._buffers[attr]
        if old is not None and tuple(old.shape) != tuple(tensors[name].shape):
            raise _mismatch(name, layer_fqns, f"the model's is {list(old.shape)}, the checkpoint's "
                            f"{list(tensors[name].shape)}")
        mod._buffers[attr] = tensors[name]
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.device.type == "meta":
            raise _mismatch(name, layer_fqns, "still on the meta device after loading (the checkpoint lacks it)")
    from ..hf import maybe_attach

    maybe_attach(model)  # a transformers model then saves with quantization_config {"quant_method": "tersor"}
    return model
