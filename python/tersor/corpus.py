"""tersor's calibration and evaluation text (``tersor/data/corpus_*.txt``): short English sentences written for
the project (scripts/make_corpus.py builds them from hand-written sentences, templates and word lists; no
outside source). Two disjoint splits: ``"calibration"`` (2000 sentences: ``tersor compress``'s default
calibration, and block fine-tuning's data) and ``"evaluation"`` (1000 sentences: the model bench's
held-out fidelity set)."""

from __future__ import annotations

import os
from typing import Optional

SPLITS = ("calibration", "evaluation")


def corpus_path(split: str = "calibration") -> str:
    """The file of one split (one sentence per line)."""
    if split not in SPLITS:
        raise ValueError(f"tersor.corpus: split must be one of {SPLITS}, got {split!r}")
    return os.path.join(os.path.dirname(__file__), "data", f"corpus_{split}.txt")


def load_corpus(split: str = "calibration", n: Optional[int] = None) -> list[str]:
    """The sentences of ``split`` (``"calibration"`` or ``"evaluation"``), the first ``n`` of them if given."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise ValueError(f"tersor.corpus.load_corpus: n must be an int >= 0 or None, got {n!r}")
    with open(corpus_path(split), encoding="utf-8") as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    return lines if n is None else lines[:n]
