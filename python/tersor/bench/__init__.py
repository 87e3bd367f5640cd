"""Benchmark harness behind ``tersor bench``.

A benchmark is a function registered with :func:`register` under a family name. It receives a
:class:`BenchContext` and returns :class:`Result` rows, each timing one tersor op against the strongest
baseline available on the same machine, measured in the same run. The benchmark modules themselves live
in the repository's ``benchmarks/`` folder (shipped as ``tersor.benchmarks``).
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Callable

from .timing import BenchContext, time_fn  # noqa: F401

_REGISTRY: dict[str, list[Callable]] = {}
_on_result: Callable | None = None  # set by report.run: called with every Result as it is made (progress lines)


@dataclasses.dataclass
class Result:
    family: str
    op: str
    shape: str
    dtype: str
    tersor_ms: float
    baseline: str
    baseline_ms: float
    accuracy: dict = dataclasses.field(default_factory=dict)
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """Speed-up over the baseline: baseline time / tersor time (> 1 means tersor is faster)."""
        return self.baseline_ms / self.tersor_ms if self.tersor_ms > 0 else float("nan")

    def __post_init__(self):
        if _on_result is not None:
            _on_result(self)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["ratio"] = self.ratio
        return d


def register(family: str):
    """Decorator: adds a benchmark function ``fn(ctx) -> list[Result]`` to ``family``."""

    def deco(fn):
        _REGISTRY.setdefault(family, []).append(fn)
        return fn

    return deco


def load_all() -> dict[str, list[Callable]]:
    """Imports every module of ``tersor.benchmarks`` (which registers its benchmarks)."""
    import tersor.benchmarks as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{mod.name}")
    return _REGISTRY
