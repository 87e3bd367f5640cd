import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import tersor  # noqa: F401  -- registers torch.ops.tersor

REPO_ROOT = Path(__file__).resolve().parent.parent
HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def load_script(name: str):
    """Imports scripts/<name>.py as a module (the scripts are not part of the package)."""
    path = REPO_ROOT / "scripts" / f"{name}.py"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
