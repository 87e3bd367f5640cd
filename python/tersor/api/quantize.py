"""``tersor.quantize_``: compress a model's linear layers in place, with GPTQ-style block-by-block calibration."""

from __future__ import annotations

import inspect
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from ..nn._common import nbytes
from .configs import CONFIGS, FLOATS, SageAttentionConfig, Stats, _Config


# ------------------------------------------------------------------------------------------- report
@dataclass
class LayerReport:
    """One compressed layer: ``rel_err`` is ``||y_q - y|| / ||y||`` over the calibration data (``y`` the
    original layer's output, both on the inputs the layer saw in the compressed model), None without
    calibration."""

    fqn: str
    format: str
    shape: tuple[int, int]
    dtype: str
    bytes_before: int
    bytes_after: int
    seconds: float
    rel_err: Optional[float] = None


@dataclass
class QuantizeReport:
    """What :func:`quantize_` did: ``layers`` (one :class:`LayerReport` each), ``skipped`` (``(fqn, reason)``
    for the linears the filter chose but the format cannot take), ``calibration`` (how the data was used),
    ``seconds`` (wall time). ``print(report)`` shows a table."""

    config: dict
    layers: list[LayerReport] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    calibration: str = "none"
    seconds: float = 0.0
    attention: Optional[str] = None  # what SageAttentionConfig set, if anything
    finetune: list = field(default_factory=list)  # FinetuneConfig: one dict per block (tersor.api.finetune)
    finetune_e2e: Optional[dict] = None  # FinetuneConfig(e2e_steps > 0): the end-to-end stage

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.layers)

    def table(self) -> str:
        if not self.layers and self.attention:  # SageAttentionConfig: no layer was replaced
            return f"tersor.quantize_: {self.config}\nattention: {self.attention}"
        head = ("layer", "format", "shape", "dtype", "bytes before", "bytes after", "ratio", "rel err", "time s")
        rows = [(r.fqn, r.format, f"{r.shape[0]}x{r.shape[1]}", r.dtype, f"{r.bytes_before:,}", f"{r.bytes_after:,}",
                 f"{r.bytes_after / max(1, r.bytes_before):.3f}", "-" if r.rel_err is None else f"{r.rel_err:.4f}",
                 f"{r.seconds:.2f}") for r in self.layers]
        errs = [r.rel_err for r in self.layers if r.rel_err is not None]
        rows.append((f"total ({len(self.layers)} layers)", self.config.get("config", "?"), "", "",
                     f"{self.bytes_before:,}", f"{self.bytes_after:,}",
                     f"{self.bytes_after / max(1, self.bytes_before):.3f}",
                     f"{sum(errs) / len(errs):.4f} mean" if errs else "-", f"{self.seconds:.2f}"))
        widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
        fmt = lambda row: "  ".join(str(x).ljust(w) if i < 4 else str(x).rjust(w)  # noqa: E731
                                    for i, (x, w) in enumerate(zip(row, widths)))
        lines = [f"tersor.quantize_: {self.config}; calibration: {self.calibration}", fmt(head),
                 "  ".join("-" * w for w in widths)]
        lines += [fmt(r) for r in rows[:-1]] + ["  ".join("-" * w for w in widths), fmt(rows[-1])]
        if self.attention:
            lines.append(f"attention: {self.attention}")
        for i, f in enumerate(self.finetune):
            lines.append(f"finetune block {f.get('block', i)}: held-out rel. MSE {f['val_before']:.4g} -> "
                         f"{f['val_after']:.4g} in {f['steps']} steps ({f['n_train']} train / {f['n_val']} held-out "
                         f"batches, {f['seconds']:.1f} s)")
        f = self.finetune_e2e
        if f:
            lines.append(f"finetune end-to-end ({f['loss']}): held-out loss {f['val_before']:.4g} -> "
                         f"{f['val_after']:.4g} in {f['steps']} steps ({f['seconds']:.1f} s)")
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)}: " + "; ".join(f"{n} ({why})" for n, why in self.skipped))
        return "\n".join(lines)

    __str__ = table


# ------------------------------------------------------------------------------------------- selection
def default_filter(module: nn.Module, fqn: str) -> bool:
    """Every ``nn.Linear`` :func:`quantize_` is given (the caller removes output embeddings and tied or
    attention-internal linears first, see :func:`_candidates`)."""
    return isinstance(module, nn.Linear)


def _candidates(model: nn.Module) -> tuple[list[tuple[str, nn.Linear]], list[tuple[str, str]]]:
    """The nn.Linear layers a method may replace, and the ones it must not (with the reason): the output
    embedding (``get_output_embeddings()`` / ``lm_head``: usually tied to the input embedding and the
    most error-sensitive layer), linears whose weight another module shares (replacing one would untie
    them), linears of ``nn.MultiheadAttention`` (it reads ``out_proj.weight`` directly) and non-float
    weights."""
    out_emb = None
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            out_emb = get_out()
        except Exception:  # noqa: BLE001 -- some models raise NotImplementedError here
            out_emb = None
    owners: dict[int, int] = {}
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    mha = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    ok, excluded = [], []
    for fqn, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        if mod is out_emb or fqn.rpartition(".")[2] == "lm_head":
            excluded.append((fqn, "output embedding (lm_head) kept dense"))
        elif owners.get(id(mod.weight), 0) > 1:
            excluded.append((fqn, "weight tied to another module"))
        elif id(mod) in mha:
            excluded.append((fqn, "inside nn.MultiheadAttention (which reads the weight directly)"))
        elif mod.weight.dtype not in FLOATS:
            excluded.append((fqn, f"weight dtype {mod.weight.dtype} (needs float32/float16/bfloat16)"))
        elif mod.weight.device.type == "meta":
            excluded.append((fqn, "weight on the meta device (load real weights first)"))
        else:
            ok.append((fqn, mod))
    return ok, excluded


def layer_format(module: nn.Module) -> str:
    """The format name of a tersor layer: e8p, aqlm, 2:4, bsr, codec."""
    fmt = getattr(type(module), "tersor_format", None)
    return module.pattern if fmt == "sparse" else fmt


# ------------------------------------------------------------------------------------------- running
class _StopForward(Exception):
    """Raised by the capture hook once the first block's inputs are recorded."""


def _device_of(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def _run_model(model: nn.Module, batch: Any, device: torch.device, no_cache: bool):
    batch = _to(batch, device)  # new tensors: the caller's batch is never modified
    if isinstance(batch, Mapping):
        kwargs = dict(batch)
        if no_cache and "use_cache" not in kwargs:
            kwargs["use_cache"] = False  # a KV cache would grow across calibration passes
        return model(**kwargs)
    if isinstance(batch, (list, tuple)):
        return model(*batch)
    return model(batch)


def _takes_use_cache(model: nn.Module) -> bool:
    try:
        return "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def find_block_list(model: nn.Module, names: Iterable[str]) -> Optional[tuple[str, nn.ModuleList]]:
    """``(fqn, blocks)``: the longest ``nn.ModuleList`` of at least two modules of one type that holds some of
    the linears ``names`` (a transformer's layer stack), or None."""
    names = list(names)
    best = None
    for fqn, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) >= 2 and len({type(b) for b in mod}) == 1:
            if any(n.startswith(fqn + ".") for n in names) and (best is None or len(mod) > len(best[1])):
                best = (fqn, mod)
    return best


def _first_output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) or hasattr(out, "__getitem__"):
        first = out[0]
        if isinstance(first, torch.Tensor):
            return first
    raise TypeError(f"quantize_: cannot find the hidden states in a block's output of type {type(out).__name__}")


class _Calibrated:
    """The linears of one group (a block, or the rest of the model): stats hooks, then error hooks."""

    def __init__(self, items: list[tuple[str, nn.Linear]], kinds: tuple[str, ...]):
        self.items, self.kinds = items, kinds
        self.stats: dict[str, Stats] = {}
        self.err: dict[str, list[float]] = {}
        self._hooks: list = []

    def hook_stats(self):
        for fqn, lin in self.items:
            st = self.stats[fqn] = Stats(lin.in_features, self.kinds, lin.weight.device)
            self._hooks.append(lin.register_forward_hook(lambda m, args, out, st=st: st.add(args[0])))

    def hook_errors(self, model: nn.Module, originals: dict[str, nn.Linear]):
        for fqn, _ in self.items:
            acc = self.err[fqn] = [0.0, 0.0]
            orig = originals[fqn]

            def hook(m, args, out, orig=orig, acc=acc):
                ref = orig(args[0]).float()
                acc[0] += float((out.float() - ref).square().sum())
                acc[1] += float(ref.square().sum())

            self._hooks.append(model.get_submodule(fqn).register_forward_hook(hook))

    def remove(self):
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def rel_err(self, fqn: str) -> Optional[float]:
        acc = self.err.get(fqn)
        if acc is None:
            return None
        return (acc[0] / acc[1]) ** 0.5 if acc[1] > 0 else (0.0 if acc[0] == 0 else float("inf"))


def quantize_(model: nn.Module, config: _Config, filter_fn: Optional[Callable[[nn.Module, str], bool]] = None, *,
              calibration: Optional[Iterable[Any]] = None, progress: bool = True) -> QuantizeReport:
    """Replaces ``model``'s linear layers **in place** by tersor layers of ``config``'s format (module swap)
    and returns a :class:`QuantizeReport`.

    ``filter_fn(module, fqn) -> bool`` is asked about every candidate ``nn.Linear`` (default: all of them).
    Never candidates: the output embedding (``lm_head``), linears whose weight is tied to another module,
    ``nn.MultiheadAttention``'s ``out_proj``. Chosen layers whose shape the format cannot take are left dense
    and listed in ``report.skipped``.

    ``calibration``: an iterable of model inputs (a dict of tensors is passed as ``model(**batch)``, a tuple
    as ``model(*batch)``, anything else as ``model(batch)``), moved to the model's device. Methods that need
    data (``E8PConfig(ldlq=True)``, ``method="wanda"``, ``AQLMConfig(data_aware=True)``) require it;
    ``AQLMConfig()`` (``data_aware=None``) uses it when given (AQLM's data-aware objective, from each
    layer's Hessian); with it, every method also reports each layer's relative output error. It is used
    GPTQ-style: the model's block list (the longest
    ``nn.ModuleList`` of identical blocks) is found, the calibration runs once up to the first block,
    then block after block: its linears' input statistics are captured with hooks, its linears are
    compressed, and the compressed block is run again to give the next block's inputs (so each block is
    calibrated on what the compressed blocks before it produce, and only one block's statistics exist
    at once). Linears outside the block list (and every linear when there is no block list) are then
    calibrated with whole-model passes. Runs on the model's device (CPU or CUDA), in eval mode, no grad.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(config, _Config):
        names = ", ".join(c.__name__ for c in CONFIGS)
        raise TypeError(f"quantize_: config must be one of {names}, got {type(config).__name__}")
    t_start = time.perf_counter()
    report = QuantizeReport(config=config.to_dict())
    if isinstance(config, SageAttentionConfig):
        if filter_fn is not None:
            raise ValueError("quantize_: SageAttentionConfig applies to the whole model; filter_fn is not supported")
        report.calibration = "none (attention routing)"
        report.attention = config.apply(model)
        report.seconds = time.perf_counter() - t_start
        return report
    candidates, _ = _candidates(model)
    chosen = []
    for fqn, lin in candidates:
        if filter_fn is not None and not filter_fn(lin, fqn):
            continue
        why = config.unsupported(lin)
        if why is None:
            chosen.append((fqn, lin))
        else:
            report.skipped.append((fqn, why))
    kinds = config.stats
    batches = None if calibration is None else list(calibration)
    if kinds and not batches:
        hint = {"E8PConfig": " or ldlq=False", "AQLMConfig": " or data_aware=None/False"}.get(type(config).__name__, "")
        raise ValueError(f"quantize_: {type(config).__name__} ({', '.join(kinds)}) needs calibration data: pass "
                         f"calibration=[model inputs, ...]" + hint)
    finetune = getattr(config, "finetune", None)
    if finetune is not None and not batches:
        raise ValueError(f"quantize_: {type(config).__name__}(finetune=...) needs calibration data: pass "
                         "calibration=[model inputs, ...]")
    if batches and not kinds:
        kinds = getattr(config, "optional_stats", ())  # AQLMConfig(data_aware=None): data-aware when data is given

    from tqdm.auto import tqdm

    bar = tqdm(total=len(chosen), desc=f"tersor.quantize_ {config.name}", unit="layer", disable=not progress)
    originals: dict[str, nn.Linear] = {}

    def convert(fqn: str, lin: nn.Linear, stats: Optional[Stats]):
        bar.set_postfix_str(fqn, refresh=False)
        t0 = time.perf_counter()
        with torch.no_grad():
            new = config.convert(lin, stats)
        seconds = time.perf_counter() - t0
        model.set_submodule(fqn, new)
        originals[fqn] = lin
        report.layers.append(LayerReport(fqn, layer_format(new),
                                         (lin.out_features, lin.in_features), str(lin.weight.dtype).replace("torch.", ""),
                                         nbytes(lin), nbytes(new), seconds))
        bar.update(1)

    was_training = model.training
    model.eval()
    try:
        if batches is None:
            report.calibration = "none (data-free)"
            for fqn, lin in chosen:
                convert(fqn, lin, None)
        else:
            teacher = None
            if finetune is not None and finetune.e2e_steps and chosen:
                from .finetune import model_output

                device, no_cache = _device_of(model), _takes_use_cache(model)
                with torch.no_grad():  # the original model's outputs, before any layer is replaced
                    teacher = [model_output(_run_model(model, b, device, no_cache))[1].detach().float()
                               for b in batches]
            _calibrated(model, chosen, kinds, batches, convert, originals, report, finetune)
            if teacher is not None:
                from .finetune import finetune_model

                report.finetune_e2e = finetune_model(
                    model, batches, teacher, finetune, lambda m, b: _run_model(m, b, device, no_cache))
    finally:
        bar.close()
        model.train(was_training)
    report.seconds = time.perf_counter() - t_start
    from ..hf import maybe_attach

    maybe_attach(model)  # a transformers model then saves with quantization_config {"quant_method": "tersor"}
    return report


def _calibrated(model, chosen, kinds, batches, convert, originals, report, finetune=None):
    device = _device_of(model)
    no_cache = _takes_use_cache(model)

    def finish(group: _Calibrated):
        by_name = {r.fqn: r for r in report.layers}
        for fqn, _ in group.items:
            by_name[fqn].rel_err = group.rel_err(fqn)
            originals.pop(fqn, None)  # the dense layer can go now

    def whole_model_pass(items):
        group = _Calibrated(items, kinds)
        with torch.no_grad():
            if kinds:
                group.hook_stats()
                try:
                    for b in batches:
                        _run_model(model, b, device, no_cache)
                finally:
                    group.remove()
            for fqn, lin in items:
                convert(fqn, lin, group.stats.get(fqn))
            group.stats.clear()
            group.hook_errors(model, originals)
            try:
                for b in batches:
                    _run_model(model, b, device, no_cache)
            finally:
                group.remove()
        finish(group)

    found = find_block_list(model, [n for n, _ in chosen])
    captured: list = []
    if found is not None:
        prefix, blocks = found

        def capture(mod, args, kwargs):
            captured.append((args, kwargs))
            raise _StopForward

        h = blocks[0].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            with torch.no_grad():
                for b in batches:
                    try:
                        _run_model(model, b, device, no_cache)
                    except _StopForward:
                        pass
        finally:
            h.remove()
        if len(captured) != len(batches):
            found, captured = None, []  # the block list is not on the forward path: whole-model passes
    if found is None:
        report.calibration = f"{len(batches)} batches, whole-model passes (no block list found)"
        whole_model_pass(chosen)
        return
    report.calibration = (f"{len(batches)} batches, block by block through {prefix} ({len(blocks)} x "
                          f"{type(blocks[0]).__name__})")
    in_blocks = set()
    for i, block in enumerate(blocks):
        items = [(n, m) for n, m in chosen if n.startswith(f"{prefix}.{i}.")]
        in_blocks.update(n for n, _ in items)
        group = _Calibrated(items, kinds)
        targets = []  # block fine-tuning: the original block's outputs on this block's (compressed-model) inputs
        with torch.no_grad():
            if (kinds or finetune is not None) and items:
                if kinds:
                    group.hook_stats()
                try:
                    for args, kwargs in captured:
                        out = block(*args, **kwargs)
                        if finetune is not None:
                            targets.append(_first_output(out).detach().clone())
                finally:
                    group.remove()
            for fqn, lin in items:
                convert(fqn, lin, group.stats.get(fqn))
            group.stats.clear()  # only one block's statistics at a time
            if finetune is not None and items:
                from .finetune import finetune_block

                res = finetune_block(block, captured, targets, finetune, _first_output)
                res["block"] = i
                report.finetune.append(res)
                targets = []
            group.hook_errors(model, originals)
            try:
                nxt = []
                for args, kwargs in captured:
                    hidden = _first_output(block(*args, **kwargs))
                    nxt.append(_replace_hidden(args, kwargs, hidden))
            finally:
                group.remove()
            captured = nxt
        finish(group)
    rest = [(n, m) for n, m in chosen if n not in in_blocks]
    if rest:
        whole_model_pass(rest)


def _replace_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """The next block's inputs: this block's with the hidden states (first positional argument, else the
    ``hidden_states`` keyword, else the first tensor keyword) replaced."""
    if args and isinstance(args[0], torch.Tensor):
        return (hidden,) + tuple(args[1:]), kwargs
    key = "hidden_states" if "hidden_states" in kwargs else next(
        (k for k, v in kwargs.items() if isinstance(v, torch.Tensor)), None)
    if key is None:
        raise TypeError("quantize_: cannot find the hidden states among the block's inputs")
    return args, {**kwargs, key: hidden}
