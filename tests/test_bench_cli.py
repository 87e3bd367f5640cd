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
