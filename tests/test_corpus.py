"""tersor.corpus: the shipped calibration / evaluation sentences (issue 18)."""

import pytest

from tersor.corpus import corpus_path, load_corpus


def test_splits_are_disjoint_and_sized():
    cal, ev = load_corpus("calibration"), load_corpus("evaluation")
    assert len(cal) == 2000 and len(ev) == 1000
    assert len(set(cal)) == len(cal) and len(set(ev)) == len(ev)
    assert not set(cal) & set(ev)
    assert load_corpus("evaluation", 3) == ev[:3]
    assert all(s and "\n" not in s for s in cal + ev)


def test_corpus_is_what_the_generator_writes():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "scripts", "make_corpus.py")
    if not os.path.exists(path):
        pytest.skip("scripts/ not present (installed package)")
    spec = importlib.util.spec_from_file_location("make_corpus", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cal, ev = mod.build(2000, 1000)
    assert cal == load_corpus("calibration") and ev == load_corpus("evaluation")


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        corpus_path("train")
    with pytest.raises(ValueError):
        load_corpus("calibration", -1)
