"""The one-wheel promise (issue 14, docs/build.md): tersor._C uses only torch's stable C shim, CUDA, the C/C++
runtime and Python's limited API, fits the manylinux_2_28 symbol policy, and registers no test-only op."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tersor

SHIPPED = Path(tersor._C.__file__)
NM = shutil.which("nm")
OBJDUMP = shutil.which("objdump")

# manylinux_2_28's symbol-version ceilings (auditwheel's policy for x86_64).
MANYLINUX_2_28 = {"GLIBC": (2, 28), "GLIBCXX": (3, 4, 24), "CXXABI": (1, 3, 11), "GCC": (7, 0, 0)}


def _undefined_symbols(path):
    """Demangled names (with any @VERSION suffix) of the dynamic symbols the module imports."""
    out = subprocess.run([NM, "-D", "--undefined-only", "-C", str(path)], capture_output=True, text=True, check=True)
    return [parts[1] for parts in (line.strip().split(None, 1) for line in out.stdout.splitlines()) if len(parts) == 2]


@pytest.mark.skipif(NM is None, reason="needs binutils' nm")
def test_shipped_module_uses_no_cpp_symbol_of_torch():
    # c10::, at::, torch:: (and caffe2::) C++ symbols would tie the binary to one torch release's C++ ABI.
    names = _undefined_symbols(SHIPPED)
    bad = [n for n in names if re.search(r"\b(c10|at|torch|caffe2)::", n)]
    assert not bad, f"{SHIPPED.name} needs C++ symbols of torch: {bad[:20]}"
    # What remains is torch's C shim, CUDA, the C/C++ runtime and Python: the torch part is all C shim.
    torch_c = [n for n in names if n.startswith(("aoti_torch_", "torch_"))]
    assert torch_c, "expected the stable C shim (aoti_torch_*/torch_*) among the undefined symbols"
    assert any(n.startswith("torch_call_dispatcher") for n in torch_c)


@pytest.mark.skipif(NM is None, reason="needs binutils' nm")
def test_shipped_module_uses_only_the_limited_python_api():
    # Private CPython symbols (_Py*) are outside the limited API; the abi3 tag promises none are used.
    names = [n.split("@")[0] for n in _undefined_symbols(SHIPPED)]
    py = [n for n in names if n.startswith(("Py", "_Py"))]
    assert py, "expected PyModule_Create (the module's entry point) among the undefined symbols"
    assert not [n for n in py if n.startswith("_Py")], py
    assert SHIPPED.name.endswith(".abi3.so"), SHIPPED.name


@pytest.mark.skipif(OBJDUMP is None, reason="needs binutils' objdump")
@pytest.mark.parametrize("module", ["_C", "_C_testing"])
def test_symbol_versions_fit_manylinux_2_28(module):
    path = SHIPPED if module == "_C" else getattr(sys.modules.get("tersor._C_testing"), "__file__", None)
    if path is None:
        pytest.skip("no tersor._C_testing in this build")
    out = subprocess.run([OBJDUMP, "-T", str(path)], capture_output=True, text=True, check=True).stdout
    too_new = []
    for line in out.splitlines():
        m = re.search(r"\((GLIBC|GLIBCXX|CXXABI|GCC)_([0-9.]+)\)\s+(\S+)", line)
        if m and tuple(int(p) for p in m.group(2).split(".")) > MANYLINUX_2_28[m.group(1)]:
            too_new.append(f"{m.group(3)}@{m.group(1)}_{m.group(2)}")
    assert not too_new, f"{Path(path).name} needs symbols newer than manylinux_2_28 allows: {too_new}"


def test_shipped_module_registers_no_test_only_op():
    # A fresh interpreter that imports tersor but not its testing extension: every tersor:: op it sees is
    # shipped, and none of them is a test-only op (those live in tersor_testing::, tersor._C_testing).
    code = (
        "import json, torch, tersor, sys\n"
        "assert 'tersor._C_testing' not in sys.modules\n"
        "names = sorted({n for n in torch._C._dispatch_get_all_op_names() if n.split('::')[0] in "
        "('tersor', 'tersor_testing')})\n"
        "print(json.dumps(names))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    names = json.loads(out.strip().splitlines()[-1])
    assert names and all(n.startswith("tersor::") for n in names), names
    shipped = {n.split("::")[1] for n in names}
    if "tersor._C_testing" in sys.modules:  # the testing extension's ops, as this process registered them
        testing = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("tersor_testing::")}
        assert testing, "tersor._C_testing registered no op"
        assert not shipped & testing, f"test-only ops in the shipped tersor._C: {sorted(shipped & testing)}"
    # Private shipped ops exist for a reason a user of the package has: each is called by tersor's Python code.
    pkg = Path(tersor.__file__).parent
    source = "\n".join(
        (Path(d) / f).read_text() for d, _, files in os.walk(pkg, followlinks=True) for f in files if f.endswith(".py")
    )
    private = sorted(op for op in shipped if op.startswith("_"))
    unused = [op for op in private if f".{op}(" not in source and f'"{op}"' not in source]
    assert not unused, f"private ops in the shipped tersor._C that no tersor module calls (test-only?): {unused}"


@pytest.mark.skipif(os.environ.get("TERSOR_EXPECT_INSTALLED_WHEEL") != "1", reason="TERSOR_EXPECT_INSTALLED_WHEEL is not set")
def test_suite_runs_against_the_installed_wheel():
    # CI tests the wheel file it built, installed into a fresh venv, not the source tree.
    assert "site-packages" in tersor.__file__, tersor.__file__
    dist = next(Path(tersor.__file__).parent.parent.glob("tersor-*.dist-info"))
    tags = [line.split(": ", 1)[1] for line in (dist / "WHEEL").read_text().splitlines() if line.startswith("Tag: ")]
    assert tags == ["cp310-abi3-manylinux_2_28_x86_64"], tags
    assert tersor.build_info()["abi"] == "stable-2.11"
    print(f"torch {torch.__version__}, tersor from {tersor.__file__}")
