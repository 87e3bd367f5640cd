"""Block fine-tuning of codebook-quantized layers (issue 18; QuIP#'s fine-tuning, the continuous half of AQLM's
PV-tuning): after :func:`tersor.quantize_` has quantized one transformer block, train the block's continuous
parameters (E8P's SU / SV / Wscale, AQLM's codebooks / scales, the biases, the norms) so that the block's output
matches the original block's output on the calibration activations, with a held-out split and early stopping.
The integer codes stay fixed (AQLM's discrete step, :func:`aqlm_discrete_step`, updates them separately when
``FinetuneConfig(discrete_every=...)`` asks for it)."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn


@dataclass(frozen=True)
class FinetuneConfig:
    """Block fine-tuning for :class:`tersor.E8PConfig` / :class:`tersor.AQLMConfig` (``finetune=``); needs
    ``calibration``.

    - ``steps``: at most this many Adam steps per block (one calibration batch each, in a shuffled cycle).
    - ``lr``: the step size, relative: each tensor's step is ``lr`` times its RMS when the block starts
      (floored at 1e-2), so scales of any magnitude (E8P's Wscale, AQLM's per-row scales) move at the same
      relative rate as SU/SV signs and norm weights.
    - ``holdout``: the fraction of the calibration batches kept out of training (at least one when there are
      two or more; with a single batch it trains and validates on it). The held-out loss is measured before
      training and every ``eval_every`` steps; the best parameters are kept, and training stops after
      ``patience`` evaluations without improvement.
    - ``train_norms`` / ``train_biases``: also train the block's normalisation weights and every bias in it.
    - ``discrete_every`` (AQLM only; 0 = off): every that many continuous steps, a PV-tuning discrete step
      re-chooses the codes, changing at most ``trust_region`` (a fraction) of each layer's codes
      (:func:`aqlm_discrete_step`).
    - ``e2e_steps`` (0 = off): after the last block, end-to-end fine-tuning of the whole model against the
      original model's outputs on the calibration batches (:func:`finetune_model`), at step size ``e2e_lr``
      (relative, as ``lr``), with loss ``e2e_loss``: ``"kl"`` on logits (language models), ``"cosine"`` or
      ``"mse"`` on the last hidden states (encoders), ``"auto"`` choosing by the output (KL when it has
      ``logits``, cosine otherwise). The teacher outputs are computed once before quantization and kept
      (float32; for a language model that is tokens x vocabulary floats per batch).
    - ``seed``: the batch order.

    The loss is the block output's mean squared error against the original block's output on the same inputs,
    divided by the mean square of that output (a relative MSE)."""

    steps: int = 100
    lr: float = 1e-3
    holdout: float = 0.25
    eval_every: int = 10
    patience: int = 3
    train_norms: bool = True
    train_biases: bool = True
    discrete_every: int = 0
    trust_region: float = 0.01
    e2e_steps: int = 0
    e2e_lr: float = 1e-4
    e2e_loss: str = "auto"
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "eval_every", "patience", "discrete_every", "e2e_steps", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"FinetuneConfig: {name} must be an int, got {type(v).__name__}")
            lo = 1 if name in ("eval_every", "patience") else 0
            if v < lo:
                raise ValueError(f"FinetuneConfig: {name} must be >= {lo}, got {v}")
        if self.e2e_loss not in E2E_LOSSES:
            raise ValueError(f"FinetuneConfig: e2e_loss must be one of {E2E_LOSSES}, got {self.e2e_loss!r}")
        for name, lo, hi in (("lr", 0.0, math.inf), ("e2e_lr", 0.0, math.inf), ("holdout", 0.0, 1.0),
                             ("trust_region", 0.0, 1.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"FinetuneConfig: {name} must be a float, got {type(v).__name__}")
            if not (lo <= v < hi if name == "holdout" else lo < v <= hi if name == "trust_region" else lo < v < hi):
                raise ValueError(f"FinetuneConfig: {name} out of range, got {v}")
        for name in ("train_norms", "train_biases"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"FinetuneConfig: {name} must be a bool")

    @classmethod
    def from_value(cls, v) -> Optional["FinetuneConfig"]:
        """None, a FinetuneConfig, or its dict form (``dataclasses.asdict``, as config dicts store it)."""
        if v is None or isinstance(v, cls):
            return v
        if isinstance(v, dict):
            return cls(**v)
        raise TypeError(f"finetune must be a tersor.FinetuneConfig, got {type(v).__name__}")


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)) or \
        "norm" in type(m).__name__.lower()


def trainable_tensors(block: nn.Module, cfg: FinetuneConfig) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of what block fine-tuning trains in ``block``: every tersor layer's
    ``continuous_tensors()`` (codes excluded), the norms' parameters and the biases (per ``cfg``)."""
    out, seen = [], set()

    def add(name, t):
        if t is not None and id(t) not in seen and t.is_floating_point():
            seen.add(id(t))
            out.append((name, t))

    for mname, m in block.named_modules():
        pre = mname + "." if mname else ""
        cont = getattr(m, "continuous_tensors", None)
        if callable(cont):
            for k, t in cont().items():
                if k != "bias" or cfg.train_biases:
                    add(pre + k, t)
            continue
        if cfg.train_norms and _is_norm(m):
            for k, p in m.named_parameters(recurse=False):
                add(pre + k, p)
        if cfg.train_biases:
            b = getattr(m, "bias", None)
            if isinstance(b, torch.Tensor):
                add(pre + "bias", b)
    return out


def _float_inputs(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: _float_inputs(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_float_inputs(v) for v in obj)
    return obj


@contextlib.contextmanager
def _frozen(module: nn.Module):
    """Every parameter of ``module`` with ``requires_grad=False`` inside (training enables only the continuous
    tensors it trains), each restored to its own flag on exit, also after an error."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class _Float32:
    """Trains a block in float32: converts its floating parameters and buffers that are not float32, and
    converts each back to its own dtype afterwards (so a fp16 model's SU/SV, codebooks and norms get float32
    Adam updates and are rounded once at the end)."""

    def __init__(self, block: nn.Module):
        self.block = block
        self.dtypes = {}
        for mname, m in block.named_modules():
            for k, t in list(m._parameters.items()) + list(m._buffers.items()):
                if t is not None and t.is_floating_point() and t.dtype != torch.float32:
                    self.dtypes[(mname, k)] = t.dtype

    def __enter__(self):
        if self.dtypes:
            for (mname, k) in self.dtypes:
                m = self.block.get_submodule(mname)
                if k in m._parameters:
                    m._parameters[k].data = m._parameters[k].data.float()
                else:
                    m._buffers[k] = m._buffers[k].float()
        return self

    def __exit__(self, *exc):
        for (mname, k), dt in self.dtypes.items():
            m = self.block.get_submodule(mname)
            if k in m._parameters:
                m._parameters[k].data = m._parameters[k].data.to(dt)
            else:
                m._buffers[k] = m._buffers[k].detach().to(dt)
        return False


def _split(n: int, holdout: float) -> tuple[list[int], list[int], int]:
    n_val = 0 if n < 2 else min(n - 1, max(1, round(n * holdout)))
    train_idx = list(range(n - n_val))
    return train_idx, (list(range(n - n_val, n)) if n_val else train_idx), n_val


def _train(module: nn.Module, loss_of, n: int, cfg: FinetuneConfig, steps: int, lr: float, result: dict,
           progress: Optional[Callable[[int, float], None]] = None) -> None:
    """The shared loop of block and end-to-end fine-tuning: Adam on :func:`trainable_tensors` of ``module``
    (already float32), one batch ``i`` per step with loss ``loss_of(i)``, held-out evaluation every
    ``eval_every`` steps, the best (held-out) state restored at the end; fills ``result``. ``progress(step,
    held_out_loss)`` is called after each held-out evaluation (step 0 included)."""
    train_idx, val_idx, n_val = _split(n, cfg.holdout)
    result.update({"steps": 0, "n_train": len(train_idx), "n_val": n_val, "curve": [], "codes_changed": 0})
    tensors = [t for _, t in trainable_tensors(module, cfg)]

    def val_loss():
        with torch.no_grad():
            return sum(float(loss_of(i)) for i in val_idx) / len(val_idx)

    best = val_loss()
    result["val_before"] = best
    result["curve"].append((0, best))
    if progress is not None:
        progress(0, best)
    discrete = [m for m in module.modules() if hasattr(m, "codes") and hasattr(m, "codebooks")] \
        if cfg.discrete_every else []
    snap = tensors + [m.codes for m in discrete]  # the codes a discrete step changed go back with the rest
    best_state = [t.detach().clone() for t in snap]
    groups = [{"params": [t], "lr": lr * max(float(t.detach().float().square().mean().sqrt()), 1e-2)}
              for t in tensors]
    train_losses = []
    try:
        for t in tensors:
            t.requires_grad_(True)
        opt = torch.optim.Adam(groups) if tensors else None
        gen = torch.Generator().manual_seed(cfg.seed)
        order: list[int] = []
        bad = 0
        with torch.enable_grad():
            for step in range(steps if tensors else 0):
                if not order:
                    order = [train_idx[j] for j in torch.randperm(len(train_idx), generator=gen).tolist()]
                i = order.pop()
                opt.zero_grad(set_to_none=True)
                loss = loss_of(i)
                loss.backward()
                opt.step()
                train_losses.append(loss.item())
                result["steps"] = step + 1
                if discrete and (step + 1) % cfg.discrete_every == 0:
                    ids = [train_idx[j] for j in torch.randperm(len(train_idx), generator=gen)[:4].tolist()]
                    result["codes_changed"] += aqlm_discrete_step(
                        discrete, lambda: sum(loss_of(j) for j in ids) / len(ids), cfg.trust_region)
                    opt.zero_grad(set_to_none=True)
                if (step + 1) % cfg.eval_every == 0 or step + 1 == steps:
                    v = val_loss()
                    result["curve"].append((step + 1, v))
                    if progress is not None:
                        progress(step + 1, v)
                    if v < best:
                        best, bad = v, 0
                        best_state = [t.detach().clone() for t in snap]
                    else:
                        bad += 1
                        if bad >= cfg.patience:
                            break
    finally:
        with torch.no_grad():
            for t, b in zip(snap, best_state):
                t.requires_grad_(False)
                t.copy_(b)
    result["train_loss"] = train_losses[-1] if train_losses else None
    result["val_after"] = best  # measured in float32 before the rounding back to a half-precision model's dtypes


def finetune_block(block: nn.Module, inputs: list[tuple[tuple, dict]], targets: list[torch.Tensor],
                   cfg: FinetuneConfig, first_output, log: Optional[list] = None) -> dict:
    """Trains ``block``'s continuous parameters (:func:`trainable_tensors`) in place so that
    ``first_output(block(*args, **kwargs))`` matches ``targets[i]`` for ``inputs[i] = (args, kwargs)``.
    Returns ``{"steps", "train_loss", "val_before", "val_after", "seconds", "n_train", "n_val", "curve",
    "codes_changed"}`` (the relative MSEs; ``curve``: ``(step, held-out loss)`` pairs). The block is left in
    eval mode with ``requires_grad`` as it was."""
    t0 = time.perf_counter()
    result: dict = {}
    with _frozen(block), _Float32(block) as f32:
        ins = [_float_inputs(a) for a in inputs] if f32.dtypes else inputs
        tgt = [t.detach().float() for t in targets]
        power = [float(t.square().mean()) or 1.0 for t in tgt]

        def loss_of(i):
            args, kwargs = ins[i]
            out = first_output(block(*args, **kwargs)).float()
            return (out - tgt[i]).square().mean() / power[i]

        _train(block, loss_of, len(inputs), cfg, cfg.steps, cfg.lr, result)
    result["seconds"] = time.perf_counter() - t0
    if log is not None:
        log.append(result)
    return result


E2E_LOSSES = ("auto", "cosine", "mse", "kl")


def model_output(out: Any) -> tuple[str, torch.Tensor]:
    """``("logits", t)`` for an output with logits (a language model), else ``("hidden", t)``: the
    ``last_hidden_state`` or the first tensor of the output (an encoder)."""
    if isinstance(out, torch.Tensor):
        return "hidden", out
    logits = getattr(out, "logits", None) if not isinstance(out, dict) else out.get("logits")
    if isinstance(logits, torch.Tensor):
        return "logits", logits
    hidden = getattr(out, "last_hidden_state", None) if not isinstance(out, dict) else out.get("last_hidden_state")
    if isinstance(hidden, torch.Tensor):
        return "hidden", hidden
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return "hidden", out[0]
    raise TypeError(f"end-to-end fine-tuning: cannot find logits or hidden states in a {type(out).__name__}")


def distill_loss(kind: str, loss: str, student: torch.Tensor, teacher: torch.Tensor,
                 mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The end-to-end loss of one batch: ``"kl"`` = KL(teacher || student) of the softmax over the last axis
    (per token, averaged), ``"cosine"`` = 1 - cosine of each token's vector, ``"mse"`` = MSE divided by the
    teacher's mean square; ``"auto"``: KL for logits, cosine for hidden states. ``mask`` (an attention mask
    [batch, tokens]) keeps padding out of the average."""
    if loss == "auto":
        loss = "kl" if kind == "logits" else "cosine"
    s, t = student.float(), teacher.float()
    if loss == "kl":
        per = (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1)
    elif loss == "cosine":
        per = 1 - torch.nn.functional.cosine_similarity(s, t, dim=-1)
    else:
        per = (s - t).square().mean(-1) / t.square().mean().clamp_min(1e-30)
    if mask is not None and mask.shape == per.shape:
        m = mask.to(device=per.device, dtype=per.dtype)
        return (per * m).sum() / m.sum().clamp_min(1)
    return per.mean()


def finetune_model(model: nn.Module, batches: list, teacher: list[torch.Tensor], cfg: FinetuneConfig, run,
                   log: Optional[dict] = None, progress: Optional[Callable[[int, float], None]] = None) -> dict:
    """End-to-end fine-tuning (QuIP#'s second stage; AQLM's global fine-tuning): trains every continuous tensor
    of ``model`` (:func:`trainable_tensors`: tersor layers, norms, biases) so that ``run(model, batch)``
    matches ``teacher[i]``, the original model's output on ``batches[i]`` (:func:`distill_loss` with
    ``cfg.e2e_loss``), for at most ``cfg.e2e_steps`` steps at ``cfg.e2e_lr``, with the held-out split, early
    stopping and (AQLM) discrete steps of the block stage. ``progress(step, held_out_loss)``, if given, is
    called after each held-out evaluation (a progress log for long runs)."""
    t0 = time.perf_counter()
    result: dict = {"loss": cfg.e2e_loss}
    with _frozen(model), _Float32(model):
        def loss_of(i):
            kind, out = model_output(run(model, batches[i]))
            b = batches[i]
            mask = b.get("attention_mask") if isinstance(b, dict) else None
            return distill_loss(kind, cfg.e2e_loss, out, teacher[i].to(out.device), mask)

        _train(model, loss_of, len(batches), cfg, cfg.e2e_steps, cfg.e2e_lr, result, progress)
    result["seconds"] = time.perf_counter() - t0
    if log is not None:
        log.update(result)
    return result


def _best_entries(r: torch.Tensor, book: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of ``r`` [N, 8]: the index of the nearest entry of ``book`` [E, 8] and its squared distance
    (chunked so that no [N, E] block exceeds 2^24 values)."""
    n, e = r.shape[0], book.shape[0]
    idx = torch.empty(n, dtype=torch.int64, device=r.device)
    dist = torch.empty(n, device=r.device)
    bn = book.square().sum(1)
    step = max(1, (1 << 24) // e)
    for a in range(0, n, step):
        d = bn[None, :] - 2 * (r[a:a + step] @ book.t())
        v, i = d.min(1)
        idx[a:a + step], dist[a:a + step] = i, v + r[a:a + step].square().sum(1)
    return idx, dist


STEP_SCALES = (0.01, 0.03, 0.1, 0.3, 1.0)


def _propose_codes(m: nn.Module, gw: torch.Tensor, step_scale: float, trust_region: float) -> Optional[torch.Tensor]:
    """The codes of AQLM layer ``m`` after one linearised step of size ``step_scale`` (see
    :func:`aqlm_discrete_step`) restricted to the trust region, in the layer's storage form; None when no group
    changes."""
    from ..ops import aqlm_decode

    out, n = m.out_features, m.in_features
    s = m.scales.detach().float().reshape(out, 1)
    w = aqlm_decode(m.codes, m.codebooks.detach(), m.scales.detach(), torch.float32)
    eta = step_scale * float(w.square().mean().sqrt()) / max(float(gw.square().mean().sqrt()), 1e-30)
    t = ((w - eta * gw) / s).reshape(out * (n // 8), 8)  # the target in the codebooks' (unscaled) units
    entries = m.codebooks.shape[1]
    books = m.codebooks.detach().float().reshape(m.num_codebooks, entries, 8)
    idx = m.codes.reshape(-1, m.num_codebooks).to(torch.int64) & (entries - 1)
    cur = sum(books[c][idx[:, c]] for c in range(m.num_codebooks))
    err_old = (cur - t).square().sum(1)
    new_idx, new_sum = idx.clone(), cur.clone()
    for c in range(m.num_codebooks):
        r = t - (new_sum - books[c][new_idx[:, c]])
        k, _ = _best_entries(r, books[c])
        new_sum = new_sum - books[c][new_idx[:, c]] + books[c][k]
        new_idx[:, c] = k
    gain = (err_old - (new_sum - t).square().sum(1)) * s.repeat_interleave(n // 8, 0).reshape(-1).square()
    diff = (new_idx != idx).any(1) & (gain > 0)
    budget = min(int(trust_region * diff.numel()), int(diff.sum()))
    if budget < 1:
        return None
    gain = torch.where(diff, gain, torch.full_like(gain, -1.0))
    top = gain.topk(budget).indices
    idx[top] = new_idx[top]
    return torch.where(idx >= entries >> 1, idx - entries, idx).to(m.codes.dtype).reshape(m.codes.shape)


def aqlm_discrete_step(layers: list, loss_fn, trust_region: float, step_scales=STEP_SCALES) -> int:
    """PV-tuning's discrete step (Malinovskii et al. 2024), simplified (docs/research/aqlm.md section 6): for
    each AQLM layer, the gradient ``G = dL/dW`` of ``loss_fn()`` with respect to the decoded weight gives a
    linearised target ``T = W - eta G``; each group's codes are re-chosen greedily, one codebook at a time, to
    approach ``T``, and only the ``trust_region`` fraction of each layer's groups whose change most reduces
    ``||W - T||^2`` take their new codes. ``eta = step_scale * rms(W) / rms(G)`` for each of ``step_scales``
    (a line search: the right size differed by 30x between a toy model and MiniLM); the step with the lowest
    ``loss_fn()`` is kept if it is below the loss before, otherwise the codes are left as they were. Returns
    the number of groups whose codes changed. Codebooks, scales and everything else are left to the
    continuous step."""
    xs: dict[int, list] = {id(m): [] for m in layers}
    gs: dict[int, list] = {id(m): [] for m in layers}

    def hook(m, args, out):
        xs[id(m)].append(args[0].detach())
        if out.requires_grad:
            out.register_hook(lambda g, m=m: gs[id(m)].append(g.detach()))

    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with torch.enable_grad():
            loss = loss_fn()
            loss.backward()
    finally:
        for h in handles:
            h.remove()
    best_loss, best_codes = loss.item(), None
    old = [m.codes.clone() for m in layers]
    with torch.no_grad():
        grads = []
        for m in layers:
            xl, gl = xs[id(m)], gs[id(m)][::-1]  # backward visits the uses in reverse order
            ok = bool(gl) and len(gl) == len(xl)
            grads.append(sum(g.float().reshape(-1, m.out_features).t() @ x.float().reshape(-1, m.in_features)
                             for g, x in zip(gl, xl)) if ok else None)
        for scale in step_scales:
            proposed = [None if g is None else _propose_codes(m, g, scale, trust_region)
                        for m, g in zip(layers, grads)]
            if all(p is None for p in proposed):
                continue
            for m, p in zip(layers, proposed):
                if p is not None:
                    m.codes.copy_(p)
            v = float(loss_fn())
            if v < best_loss:
                best_loss, best_codes = v, [m.codes.clone() for m in layers]
            for m, c in zip(layers, old):
                m.codes.copy_(c)
        if best_codes is None:
            return 0
        changed = 0
        for m, c, o in zip(layers, best_codes, old):
            m.codes.copy_(c)
            changed += int((c != o).reshape(-1, m.num_codebooks).any(1).sum())
    return changed
