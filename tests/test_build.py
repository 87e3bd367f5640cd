"""What the build must contain. On CI (TERSOR_REQUIRE_CUDA_BUILD=1) the extension must carry CUDA kernels
for sm_80, sm_89 and sm_90a even though the machine has no GPU."""

import os
import shutil
import subprocess

import pytest
import torch

import tersor

REQUIRE_CUDA_BUILD = os.environ.get("TERSOR_REQUIRE_CUDA_BUILD") == "1"
REQUIRED_ARCHS = ("80", "89", "90a")


def test_build_info():
    info = tersor.build_info()
    assert info["cuda"] in ("0", "1")
    assert tersor.__version__ == info["version"]
    if info["cuda"] == "1":
        assert torch.version.cuda, "CUDA kernels built against a CPU torch"


@pytest.mark.testing_ext
def test_parallel_for_runs_in_parallel():
    # tersor's CPU kernels split work with torch::stable::parallel_for: a build where that runs on one
    # thread is silently 2-16x slower. torch itself being parallel proves nothing here.
    if torch.get_num_threads() < 2:
        pytest.skip("torch runs with one thread")
    assert torch.ops.tersor_testing._parallel_probe(64) >= 2


@pytest.mark.testing_ext
@pytest.mark.parametrize("fail_at", [0, 37, 63])
def test_parallel_for_keeps_the_message_of_a_check_in_its_body(fail_at):
    # A check inside a parallel loop (a corrupt chunk) must reach Python with its own message, which carries
    # its kind (tersor._errors maps "ValueError: ..."); torch 2.11's shim replaced it with "torch_parallel_for(...)
    # API call failed" (csrc/common/torch_glue.h, tersor::parallel_for).
    with pytest.raises(RuntimeError, match=rf"^ValueError: _parallel_probe: task {fail_at} failed"):
        torch.ops.tersor_testing._parallel_probe(64, fail_at)


@pytest.mark.skipif(not REQUIRE_CUDA_BUILD, reason="TERSOR_REQUIRE_CUDA_BUILD is not set")
def test_cuda_build_has_required_archs():
    info = tersor.build_info()
    assert info["cuda"] == "1", "expected a CUDA build"
    archs = {a.split("-")[0] for a in info["cuda_archs"].split(",")}
    assert set(REQUIRED_ARCHS) <= archs, archs


def _find_cuobjdump():
    tool = shutil.which("cuobjdump")
    if tool:
        return tool
    try:  # the CUDA torch wheel brings triton, which carries a cuobjdump
        import triton

        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        return path if os.path.exists(path) else None
    except ImportError:
        return None


@pytest.mark.skipif(not REQUIRE_CUDA_BUILD, reason="TERSOR_REQUIRE_CUDA_BUILD is not set")
def test_binary_contains_sass_for_required_archs():
    tool = _find_cuobjdump()
    assert tool is not None, "no cuobjdump (PATH or triton's) to inspect the binary"
    out = subprocess.run([tool, "--list-elf", tersor._C.__file__], capture_output=True, text=True, check=True).stdout
    for arch in REQUIRED_ARCHS:
        # An older cuobjdump (triton's in torch 2.11) names an sm_90a cubin ".sm_90."; that it was built as
        # sm_90a is what build_info()["cuda_archs"] says (test_cuda_build_has_required_archs).
        names = (f".sm_{arch}.", f".sm_{arch[:-1]}.") if arch.endswith("a") else (f".sm_{arch}.",)
        assert any(n in out for n in names), f"no sm_{arch} code in {tersor._C.__file__}:\n{out[:2000]}"


def test_import_tersor_does_not_import_dynamo():
    # `import tersor` stays cheap: torch._dynamo (seconds to import) comes in only when the user compiles.
    # (tersor.attention once imported it for torch.compiler.assume_constant_result.)
    import subprocess
    import sys

    code = "import sys, torch; before = 'torch._dynamo' in sys.modules; import tersor; " \
           "print(before, 'torch._dynamo' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    before, after = proc.stdout.split()
    if before == "True":
        pytest.skip("this torch imports torch._dynamo itself")
    assert after == "False"
