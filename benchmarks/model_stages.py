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
``TERSOR_STAGES_METHODS`` (comma-separated) picks the methods, ``TERSOR_STAGES`` the stages (default all of
:data:`STAGES`; ``e2e`` needs the block-ft model, so asking for it also runs and reports ``block-ft``; the
``nearest`` and ``ldlq`` stages are separate quantizations that nothing later reuses, so leaving them out saves
their time and changes no other row). AQLM uses the model bench's fast options.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import sys
import tempfile
import time

import torch

from tersor.bench import Result, register

STAGE_METHODS = ["e8p2", "e8p3", "e8p4", "aqlm-2x8", "aqlm-1x16"]
STAGES = ("nearest", "ldlq", "block-ft", "e2e")
N_CAL, N_EVAL, BATCH = 512, 1000, 16
N_HAND = 50  # the evaluation split starts with the 50 hand-written sentences (scripts/make_corpus.py)
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
        stages = os.environ.get("TERSOR_STAGES")
        rows = run_stages(mm, source, methods, model_dir(), stages=stages.split(",") if stages else STAGES)
        if importlib.util.find_spec("transformers") is not None:
            rows += run_llama_stages(mm.tok, [m for m in methods if m != "aqlm-1x16"])
        return rows
    finally:
        torch.set_num_threads(threads)


def run_stages(mm, source, methods, mdir, log=print, stages=STAGES) -> list[Result]:
    """The MiniLM rows of ``methods`` (names of :data:`STAGE_METHODS`) for ``stages`` (of :data:`STAGES`;
    ``e2e`` implies ``block-ft``), logging one line per stage and per held-out evaluation of the end-to-end
    stage through ``log``."""
    import tersor
    from tersor.api.finetune import finetune_model, model_output
    from tersor.corpus import load_corpus

    from .model import _reload_in_fresh_process, _state_bytes

    bad = [s for s in stages if s not in STAGES] + [m for m in methods if m not in STAGE_METHODS]
    if bad:
        raise ValueError(f"model stages: unknown {bad}; the stages are {STAGES}, the methods {STAGE_METHODS}")
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
        log(f"[model stages] {name} {stage}: cos {cos.mean().item():.4f} / {cos.min().item():.4f} (hand-written "
            f"{cos[:N_HAND].mean().item():.4f}), {seconds:.1f} s")
        results.append(Result(
            family="model", op="fine-tuning stages all-MiniLM-L6-v2", shape=f"{len(ev)} eval sentences",
            dtype=f"{name} {stage}", tersor_ms=seconds * 1e3, baseline="stage time (ms); no baseline",
            baseline_ms=float("nan"),
            accuracy={"embedding_cosine_mean": cos.mean().item(), "embedding_cosine_min": cos.min().item(),
                      # the split's first 50 sentences are the hand-written ones (no template): harder
                      "embedding_cosine_handwritten_mean": cos[:N_HAND].mean().item()},
            extra={"source": source, "stage": stage, "stage_s": seconds, "model_bytes": _state_bytes(q),
                   "dense_model_bytes": dense_bytes, "calibration_sentences": len(cal), "threads": 1, **extra}))
        return emb

    with tempfile.TemporaryDirectory(prefix="tersor-model-stages-") as tmp:
        for name in methods:
            if "nearest" in stages:
                free = copy.deepcopy(bert)
                nearest_cfg, _ = _configs(name)
                t0 = time.perf_counter()
                rep = tersor.quantize_(free, nearest_cfg, progress=False)
                row(name, "nearest", free, time.perf_counter() - t0, {"config": rep.config})
                del free

            if "ldlq" in stages:
                _, ldlq_cfg = _configs(name)
                q = copy.deepcopy(bert)
                t0 = time.perf_counter()
                rep = tersor.quantize_(q, ldlq_cfg, calibration=batches, progress=False)
                worst = sorted(((r.rel_err, r.fqn) for r in rep.layers if r.rel_err is not None),
                               reverse=True)[:5]
                row(name, "ldlq", q, time.perf_counter() - t0,
                    {"config": rep.config, "worst_layers": [(f, round(e, 4)) for e, f in worst]})
                del q

            if "block-ft" not in stages and "e2e" not in stages:
                continue
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

            if "e2e" not in stages:
                continue
            t0 = time.perf_counter()
            r = finetune_model(q, batches, teacher, tersor.FinetuneConfig(**E2E), lambda m, b: m(**b),
                               progress=lambda step, v, t0=t0, name=name: log(
                                   f"[model stages] {name} e2e step {step}/{E2E['e2e_steps']}: held-out loss "
                                   f"{v:.5f} ({time.perf_counter() - t0:.0f} s)"))
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


# ------------------------------------------------------------------------------------------------ tiny Llama
LLAMA = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 2}
LLAMA_TRAIN_STEPS, LLAMA_N_EVAL = 300, 500
LLAMA_E2E = {"e2e_steps": 200, "e2e_lr": 1e-3, "e2e_loss": "kl", "eval_every": 20}


def train_tiny_llama(tok, sentences, steps=LLAMA_TRAIN_STEPS, seed=0, log=print):
    """A small Llama (``LLAMA``, random init, the given tokenizer's vocabulary) trained for ``steps`` AdamW
    steps of next-token prediction on ``sentences`` (batches of 32), so that it has structure to lose."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id,
                                         max_position_embeddings=128, **LLAMA))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(sentences), (32,), generator=g).tolist()
        b = _lm_batch(tok, [sentences[i] for i in idx])
        loss = model(**b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0:
            log(f"[model stages] tiny Llama step {step + 1}: train loss {loss.item():.3f} "
                f"({time.perf_counter() - t0:.0f} s)")
    return model.eval()


def _lm_batch(tok, sentences):
    b = dict(tok(sentences, padding=True, return_tensors="pt"))
    b.pop("token_type_ids", None)
    labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    return {**b, "labels": labels}


def perplexity(model, batches) -> float:
    nll, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
            lp = logits[:, :-1].log_softmax(-1)
            tgt = b["labels"][:, 1:]
            ok = tgt != -100
            nll -= float(lp.gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1)[ok].sum())
            count += int(ok.sum())
    return float(torch.tensor(nll / count).exp())


def run_llama_stages(tok, methods, log=print) -> list[Result]:
    """The stages of :func:`run_stages` on a tiny Llama trained here (:func:`train_tiny_llama`): perplexity on
    the evaluation split for the fp32 model and after each stage (end to end: KL on the logits)."""
    import tersor
    from tersor.api.finetune import finetune_model, model_output
    from tersor.corpus import load_corpus

    cal = load_corpus("calibration")
    t0 = time.perf_counter()
    lm = train_tiny_llama(tok, cal, log=log)
    t_train = time.perf_counter() - t0
    ev = [_lm_batch(tok, s) for s in _chunks(load_corpus("evaluation", LLAMA_N_EVAL), 100)]
    batches = [{k: v for k, v in _lm_batch(tok, s).items() if k != "labels"} for s in _chunks(cal[:N_CAL], BATCH)]
    ppl_fp32 = perplexity(lm, ev)
    log(f"[model stages] tiny Llama: fp32 perplexity {ppl_fp32:.3f} on {LLAMA_N_EVAL} evaluation sentences "
        f"(trained {t_train:.0f} s)")
    with torch.no_grad():
        teacher = [model_output(lm(**b))[1].float() for b in batches]
    results = []

    def row(name, stage, q, seconds):
        ppl = perplexity(q, ev)
        log(f"[model stages] tiny Llama {name} {stage}: perplexity {ppl:.3f} (fp32 {ppl_fp32:.3f}), {seconds:.1f} s")
        results.append(Result(
            family="model", op="fine-tuning stages tiny Llama", shape=f"{LLAMA_N_EVAL} eval sentences",
            dtype=f"llama {name} {stage}", tersor_ms=seconds * 1e3, baseline="stage time (ms); no baseline",
            baseline_ms=float("nan"), accuracy={"perplexity": ppl, "fp32_perplexity": ppl_fp32},
            extra={"stage": stage, "stage_s": seconds, "llama": LLAMA, "train_steps": LLAMA_TRAIN_STEPS,
                   "calibration_sentences": N_CAL, "threads": 1}))

    for name in methods:
        nearest_cfg, ldlq_cfg = _configs(name)
        q = copy.deepcopy(lm)
        t0 = time.perf_counter()
        tersor.quantize_(q, nearest_cfg, progress=False)
        row(name, "nearest", q, time.perf_counter() - t0)
        q = copy.deepcopy(lm)
        t0 = time.perf_counter()
        tersor.quantize_(q, ldlq_cfg, calibration=batches, progress=False)
        row(name, "ldlq", q, time.perf_counter() - t0)
        _, ft_cfg = _configs(name, tersor.FinetuneConfig(**BLOCK))
        q = copy.deepcopy(lm)
        rep = tersor.quantize_(q, ft_cfg, calibration=batches, progress=False)
        row(name, "block-ft", q, sum(f["seconds"] for f in rep.finetune))
        t0 = time.perf_counter()
        finetune_model(q, batches, teacher, tersor.FinetuneConfig(**LLAMA_E2E), lambda m, b: m(**b))
        row(name, "e2e", q, time.perf_counter() - t0)
    return results


def _chunks(xs, n):
    return [xs[i:i + n] for i in range(0, len(xs), n)]
