import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

import tersor  # noqa: F401  -- registers torch.ops.tersor

REPO_ROOT = Path(__file__).resolve().parent.parent
HAS_CUDA = torch.cuda.is_available()

# The test-only ops (replays, layout checks, fault injection) live in tersor._C_testing, built with
# TERSOR_TESTING=ON (scripts/run.sh, CI). Without it their tests skip; CI sets TERSOR_REQUIRE_TESTING_EXT=1
# so that a build that lost the extension fails instead of skipping.
try:
    import tersor._testing  # noqa: F401  -- registers torch.ops.tersor_testing

    HAS_TESTING_EXT = True
except ImportError:
    if os.environ.get("TERSOR_REQUIRE_TESTING_EXT") == "1":
        raise
    HAS_TESTING_EXT = False


def load_testing_ops():
    """``tersor._testing.lib`` (torch.ops.tersor_testing with tersor's error types), or a module-level skip."""
    if not HAS_TESTING_EXT:
        pytest.skip("needs tersor._C_testing (build with TERSOR_TESTING=ON)", allow_module_level=True)
    return tersor._testing.lib


# Tests marked `slow` (tensors past 2^31 elements: several GB of memory and minutes each) do not run by default,
# so `bash scripts/run.sh test` and CI (.ci/run) skip them. They run when asked for: `-m slow` (or any -m
# expression naming `slow`), or TERSOR_RUN_SLOW=1.
RUN_SLOW = os.environ.get("TERSOR_RUN_SLOW") == "1"


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_testing = pytest.mark.skip(reason="needs tersor._C_testing (build with TERSOR_TESTING=ON)")
    run_slow = RUN_SLOW or "slow" in (config.getoption("markexpr", "") or "")
    skip_slow = pytest.mark.skip(reason="slow (tensors past 2^31 elements): run with -m slow or TERSOR_RUN_SLOW=1")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)
        if "testing_ext" in item.keywords and not HAS_TESTING_EXT:
            item.add_marker(skip_testing)
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)


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


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for the test: the model-level tests quantize whole models, and on a loaded 2-core
    machine two threads made the quantizers 10x slower. Use with ``pytestmark = pytest.mark.usefixtures(...)``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
