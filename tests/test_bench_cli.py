"""`tersor bench` runs on this machine and writes the JSON record and plot in the documented schema."""

import json
import subprocess
import sys

import pytest

from tersor.bench import report

RESULT_KEYS = {"family", "op", "shape", "dtype", "tersor_ms", "baseline", "baseline_ms", "ratio", "accuracy"}


def test_bench_cli_cpu_quick(tmp_path):
    js, png = tmp_path / "bench.json", tmp_path / "bench.png"
    proc = subprocess.run(
        [sys.executable, "-m", "tersor", "bench", "--device", "cpu", "--quick", "--json", str(js), "--plot", str(png)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "ratio" in proc.stdout and "hadamard_transform" in proc.stdout
    rec = json.loads(js.read_text())
    assert {"commit", "device", "torch", "date", "results"} <= set(rec)
    assert rec["results"], "no results"
    families = {r["family"] for r in rec["results"]}
    assert "hadamard" in families
    for r in rec["results"]:
        assert RESULT_KEYS <= set(r)
        assert r["tersor_ms"] > 0 and r["baseline_ms"] > 0
        assert r["ratio"] == pytest.approx(r["baseline_ms"] / r["tersor_ms"])
        assert all(v == v for v in r["accuracy"].values()), "NaN accuracy"
    assert png.stat().st_size > 1000


def test_unknown_family_is_an_error():
    proc = subprocess.run([sys.executable, "-m", "tersor", "bench", "--device", "cpu", "--family", "nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "unknown benchmark family" in proc.stderr


def test_record_name():
    import datetime

    assert report.record_name("cpu", datetime.date(2026, 11, 23)) == "cpu-20261123"


def _fake_registry(monkeypatch, calls):
    from tersor.bench import Result

    def good(ctx):
        calls.append("good")
        return [Result("fake", "op", "s", "f32", 1.0, "base", 2.0)]

    def boom(ctx):
        calls.append("boom")
        raise RuntimeError("a kernel failed")

    def interrupted(ctx):
        calls.append("interrupted")
        raise KeyboardInterrupt("signal 15")

    monkeypatch.setattr(report, "load_all", lambda: {"a": [good], "b": [boom, good], "c": [interrupted, good]})


def test_run_goes_on_past_a_failing_benchmark_when_asked(monkeypatch):
    from tersor.bench import BenchContext

    calls = []
    _fake_registry(monkeypatch, calls)
    errors = []
    rows = report.run(["a", "b"], BenchContext(device="cpu"), progress=False, errors=errors)
    assert len(rows) == 2 and calls == ["good", "boom", "good"]
    assert errors == ["b: boom: RuntimeError: a kernel failed"]
    with pytest.raises(RuntimeError, match="a kernel failed"):  # without `errors`: the old behaviour
        report.run(["b"], BenchContext(device="cpu"), progress=False)


def test_bench_cli_keeps_the_rows_of_an_interrupted_run(monkeypatch, tmp_path):
    # `timeout` ends the GPU check's bench with SIGTERM (raised as KeyboardInterrupt): the JSON still holds the rows
    # finished before, the errors say why, and the exit status is 1.
    import argparse

    from tersor import cli

    calls = []
    _fake_registry(monkeypatch, calls)
    js = tmp_path / "b.json"
    args = argparse.Namespace(device="cpu", quick=True, family=None, json=str(js), plot=None)
    monkeypatch.setattr(report, "write_model_plot", lambda results, record: False)
    assert cli._bench(args) == 1
    rec = json.loads(js.read_text())
    assert [r["op"] for r in rec["results"]] == ["op", "op"]  # a's row and b's second benchmark, not c's
    assert rec["errors"][0].startswith("b: boom") and "interrupted (signal 15)" in rec["errors"][1]
