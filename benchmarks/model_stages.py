"""Fidelity per compression stage on all-MiniLM-L6-v2 (issue 18): for E8P 2/3/4-bit and AQLM 2x8 / 1x16, the
embedding cosine against the original fp32 model on tersor's evaluation corpus (:mod:`tersor.corpus`, disjoint
from the calibration sentences) after each stage, and the time of each stage:

1. ``nearest``: data-free rounding (E8P greedy, AQLM's weight-error objective);
2. ``ldlq``: calibrated rounding (E8P block LDLQ, AQLM's data-aware objective), ``N_CAL`` corpus sentences;
3. ``block-ft``: 2 plus block fine-tuning (:class:`tersor.FinetuneConfig`, ``BLOCK``) inside ``quantize_``;
4. ``e2e``: 3 plus end-to-end fine-tuning of the whole model (:func:`tersor.api.finetune.finetune_model`,
   ``E2E``: cosine of the last hidden states against the original's on the calibration batches).

Runs only when the model family is named (``tersor bench --family model``; not in the all-families run, whose
10 minutes it would exceed), on the CPU, at one thread. The final stage of each method is also saved and
reloaded in a fresh process (``reload_identical``: the fine-tuned parameters survive bit-identically).
``TERSOR_STAGES_METHODS`` (comma-separated) picks the methods. AQLM uses the model bench's fast options.
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
import time

import torch

from tersor.bench import Result, register

STAGE_METHODS = ["e8p2", "e8p3", "e8p4", "aqlm-2x8", "aqlm-1x16"]
N_CAL, N_EVAL, BATCH = 512, 1000, 16
BLOCK = {"steps": 100, "lr": 3e-3}
E2E = {"e2e_steps": 300, "e2e_lr": 1e-3, "e2e_loss": "cosine", "eval_every": 20}


def _configs(name, finetune=None):
    import tersor

    from .model import AQLM_OPTIONS

    if name.startswith("e8p"):
        b = int(name[3])
        return tersor.E8PConfig(b, ldlq=False), tersor.E8PConfig(b, finetune=finetune)
    c, nb = (2, 8) if name == "aqlm-2x8" else (1, 16)
    opts = AQLM_OPTIONS[name]
    return (tersor.AQLMConfig(c, nb, data_aware=False, **opts),
            tersor.AQLMConfig(c, nb, finetune=finetune, **opts))


def _embed_all(bert, inputs_list):
    from .minilm import embed

    return torch.cat([embed(bert, x) for x in inputs_list])


@register("model")
def bench_model_stages(ctx) -> list[Result]:
    from .minilm import load_model, model_dir

    if ctx.is_cuda or ctx.quick or "model" not in ctx.families:
        return []  # only with an explicit --family model, on the CPU
    mm, source = load_model()
    if mm is None:
        print(f"[model stages] skipped: {source}", file=sys.stderr)
        return []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        methods = os.environ.get("TERSOR_STAGES_METHODS")
        methods = methods.split(",") if methods else STAGE_METHODS
        return run_stages(mm, source, methods, model_dir())
    finally:
        torch.set_num_threads(threads)


def run_stages(mm, source, methods, mdir, log=print) -> list[Result]:
    import tersor
    from tersor.api.finetune import finetune_model, model_output
    from tersor.corpus import load_corpus

    from .model import _reload_in_fresh_process, _state_bytes

    bert, tok = mm.bert, mm.tok
    cal = load_corpus("calibration", N_CAL)
    ev = load_corpus("evaluation", N_EVAL)
    batches = [dict(tok(cal[i:i + BATCH], padding=True, return_tensors="pt")) for i in range(0, len(cal), BATCH)]
    ev_inputs = [mm.inputs(ev[i:i + 200]) for i in range(0, len(ev), 200)]
    ref = _embed_all(bert, ev_inputs)
    with torch.no_grad():
        teacher = [model_output(bert(**b))[1].float() for b in batches]
    dense_bytes = _state_bytes(bert)
    results, embs, dirs = [], {}, {}

    def row(name, stage, q, seconds, extra):
        emb = _embed_all(q, ev_inputs)
        cos = (emb * ref).sum(-1)
        log(f"[model stages] {name} {stage}: cos {cos.mean().item():.4f} / {cos.min().item():.4f}, {seconds:.1f} s")
        results.append(Result(
            family="model", op="fine-tuning stages all-MiniLM-L6-v2", shape=f"{len(ev)} eval sentences",
            dtype=f"{name} {stage}", tersor_ms=seconds * 1e3, baseline="stage time (ms); no baseline",
            baseline_ms=float("nan"),
            accuracy={"embedding_cosine_mean": cos.mean().item(), "embedding_cosine_min": cos.min().item()},
            extra={"source": source, "stage": stage, "stage_s": seconds, "model_bytes": _state_bytes(q),
                   "dense_model_bytes": dense_bytes, "calibration_sentences": len(cal), "threads": 1, **extra}))
        return emb

    with tempfile.TemporaryDirectory(prefix="tersor-model-stages-") as tmp:
        for name in methods:
            free = copy.deepcopy(bert)
            nearest_cfg, _ = _configs(name)
            t0 = time.perf_counter()
            rep = tersor.quantize_(free, nearest_cfg, progress=False)
            row(name, "nearest", free, time.perf_counter() - t0, {"config": rep.config})
            del free

            _, ldlq_cfg = _configs(name)
            q = copy.deepcopy(bert)
            t0 = time.perf_counter()
            rep = tersor.quantize_(q, ldlq_cfg, calibration=batches, progress=False)
            worst = sorted(((r.rel_err, r.fqn) for r in rep.layers if r.rel_err is not None), reverse=True)[:5]
            row(name, "ldlq", q, time.perf_counter() - t0,
                {"config": rep.config, "worst_layers": [(f, round(e, 4)) for e, f in worst]})
            del q

            _, ft_cfg = _configs(name, tersor.FinetuneConfig(**BLOCK))
            q = copy.deepcopy(bert)
            t0 = time.perf_counter()
            rep = tersor.quantize_(q, ft_cfg, calibration=batches, progress=False)
            total = time.perf_counter() - t0
            ft_s = sum(f["seconds"] for f in rep.finetune)
            row(name, "block-ft", q, ft_s, {
                "config": rep.config, "quantize_s_total": total,
                "blocks": [{"block": f["block"], "val_before": round(f["val_before"], 5),
                            "val_after": round(f["val_after"], 5), "steps": f["steps"]} for f in rep.finetune]})

            t0 = time.perf_counter()
            r = finetune_model(q, batches, teacher, tersor.FinetuneConfig(**E2E), lambda m, b: m(**b))
            emb = row(name, "e2e", q, time.perf_counter() - t0, {
                "e2e": {k: r[k] for k in ("val_before", "val_after", "steps")}, "curve": r["curve"],
                "e2e_config": E2E})
            d = os.path.join(tmp, name)
            tersor.save(q, d)
            embs[name], dirs[name] = emb, d
            del q
        # the first 200 evaluation sentences, through tersor.save -> tersor.load in a fresh process
        reloaded = _reload_in_fresh_process(mdir, dirs, ev_inputs[0], tmp) if dirs else {}
    for r in results:
        if r.extra["stage"] == "e2e":
            name = r.dtype.split()[0]
            got, want = reloaded.get(name), embs[name][:ev_inputs[0]["input_ids"].shape[0]]
            r.accuracy["reload_identical"] = int(got is not None and torch.equal(got, want))
    return results
