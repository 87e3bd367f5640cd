"""Running the registered benchmarks and writing the table, the JSON record and the plot."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

from . import BenchContext, Result, load_all


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def record_name(device: str, date: datetime.date) -> str:
    """``<gpu>-<yyyymmdd>``, e.g. ``h100-20261123`` (the file name under benchmarks/results/)."""
    name = device_name(device).lower() if device == "cuda" else "cpu"
    m = re.search(r"(h100|h200|a100|l40s?|l4|a10g?|rtx ?\d+|b200|gh200)", name)
    short = m.group(1).replace(" ", "") if m else re.sub(r"[^a-z0-9]+", "-", name).strip("-")
    return f"{short}-{date.strftime('%Y%m%d')}"


def current_commit() -> str:
    if os.environ.get("TERSOR_COMMIT"):
        return os.environ["TERSOR_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _progress_line(r: Result) -> str:
    acc = next(iter(r.accuracy.items()), None)
    tail = f", {acc[0]}={acc[1]:.4g}" if acc and isinstance(acc[1], float) else ""
    return (f"{r.family} {r.op} [{r.shape}] {r.dtype}: {r.tersor_ms:.4g} ms vs {r.baseline_ms:.4g} ms "
            f"({r.baseline}){tail}")


def run(families: list[str] | None, ctx: BenchContext, progress: bool = True, results: list | None = None,
        errors: list | None = None) -> list[Result]:
    """Runs the registered benchmarks of ``families`` (all when None). With ``progress``, writes to stderr
    one line when each benchmark starts, one per result row as it is made, and one when the benchmark ends,
    each with the elapsed time since the start of the run. ``results``: a list the rows are appended to as each
    benchmark ends (so a caller keeps them if the run is interrupted); returned. ``errors``: a list, to go on
    past a benchmark that raises (its error is appended as a line and said on stderr); without it the error
    propagates."""
    import sys
    import time

    from .. import bench

    registry = load_all()
    unknown = set(families or []) - set(registry)
    if unknown:
        raise SystemExit(f"unknown benchmark family {sorted(unknown)}; known: {sorted(registry)}")
    t_start = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[tersor bench {time.perf_counter() - t_start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    results = [] if results is None else results
    saved = bench._on_result
    if progress:
        bench._on_result = lambda r: say("  " + _progress_line(r))
    try:
        for family in sorted(registry):
            if families and family not in families:
                continue
            for fn in registry[family]:
                t0 = time.perf_counter()
                if progress:
                    say(f"{family}: {fn.__name__} on {ctx.device}{' (quick)' if ctx.quick else ''}")
                try:
                    rows = fn(ctx)
                except Exception as e:  # noqa: BLE001 - with `errors`, one failing benchmark does not lose the others
                    if errors is None:
                        raise
                    errors.append(f"{family}: {fn.__name__}: {type(e).__name__}: {e}")
                    say(f"{family}: {fn.__name__} FAILED: {type(e).__name__}: {e}")
                    continue
                results.extend(rows)
                if progress:
                    say(f"{family}: {fn.__name__} done, {len(rows)} rows in {time.perf_counter() - t0:.1f} s")
    finally:
        bench._on_result = saved
    if progress:
        say(f"all done: {len(results)} rows")
    return results


def format_table(results: list[Result]) -> str:
    head = ["family", "op", "shape", "dtype", "tersor ms", "baseline", "baseline ms", "ratio", "accuracy"]
    rows = []
    for r in results:
        acc = ", ".join(f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}" for k, v in r.accuracy.items())
        rows.append([r.family, r.op, r.shape, r.dtype, f"{r.tersor_ms:.4f}", r.baseline, f"{r.baseline_ms:.4f}",
                     f"{r.ratio:.2f}x", acc])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def to_record(results: list[Result], ctx: BenchContext) -> dict:
    today = datetime.date.today()
    return {
        "commit": current_commit(),
        "device": device_name(ctx.device),
        "torch": torch.__version__,
        "date": today.isoformat(),
        "record_name": record_name(ctx.device, today),
        "quick": ctx.quick,
        "results": [r.to_json() for r in results],
    }


def write_json(record: dict, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")


def write_plot(results: list[Result], record: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = sorted({r.family for r in results})
    fig, axes = plt.subplots(len(families), 1, figsize=(11, 3.2 * max(1, len(families))), squeeze=False)
    for ax, fam in zip(axes[:, 0], families):
        rows = [r for r in results if r.family == fam]
        if fam == "model":
            _size_fidelity(ax, rows, record)
            continue
        labels = [f"{r.op}\n{r.shape} {r.dtype}" for r in rows]
        ratios = [r.ratio for r in rows]
        colors = ["tab:green" if x >= 1 else "tab:red" for x in ratios]
        ax.bar(range(len(rows)), ratios, color=colors)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(rows)), labels, fontsize=6, rotation=60, ha="right")
        ax.set_yscale("log")
        ax.set_ylabel("speed-up vs baseline")
        ax.set_title(f"{fam} on {record['device']} (torch {record['torch']}, {record['commit'][:10]})", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


MODEL_PLOT = os.path.join("bench_out", "model-size-fidelity.png")
"""Where ``tersor bench`` draws the ``model`` family's size-against-fidelity plot when ``--plot`` is not given."""


def _size_fidelity(ax, rows: list[Result], record: dict) -> None:
    """The ``model`` family: model bytes against the embedding cosine, one labelled point per method,
    the dense model as a reference line; points whose save -> load in a fresh process was not bit-identical
    are drawn as red crosses."""
    dense = next((r.extra.get("dense_model_bytes") for r in rows if r.extra.get("dense_model_bytes")), None)
    rows = [r for r in rows if r.extra.get("stage") in (None, "e2e")]  # of the stage rows, only the last stage
    for r in rows:
        mb = r.extra.get("model_bytes", 0) / 1e6
        cos = r.accuracy.get("embedding_cosine_mean", float("nan"))
        ok = r.accuracy.get("reload_identical", 1)
        ax.scatter([mb], [cos], marker="o" if ok else "x", color="tab:blue" if ok else "tab:red")
        ax.annotate(r.dtype + (" (fine-tuned)" if r.extra.get("stage") else ""), (mb, cos),
                    textcoords="offset points", xytext=(4, 3), fontsize=7)
    if dense:
        ax.axvline(dense / 1e6, color="gray", linewidth=0.8, linestyle="--")
        ax.scatter([dense / 1e6], [1.0], marker="s", color="black")
        ax.annotate("dense fp32", (dense / 1e6, 1.0), textcoords="offset points", xytext=(-50, -10), fontsize=7)
    ax.set_xlabel("model bytes (MB, every tensor tersor.save writes)")
    ax.set_ylabel("embedding cosine vs original")
    src = rows[0].extra.get("source", "model") if rows else "model"
    ax.set_title(f"{src}: size against fidelity on {record['device']} (torch {record['torch']}, "
                 f"{record['commit'][:10]})", fontsize=9)
    ax.grid(True, which="both", linewidth=0.3)


def write_model_plot(results: list[Result], record: dict, path: str = MODEL_PLOT) -> bool:
    """Draws the ``model`` rows of ``results`` (size against fidelity) into ``path``; False when there are none."""
    rows = [r for r in results if r.family == "model"]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    _size_fidelity(ax, rows, record)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
