#!/usr/bin/env bash
# The one command for a lent GPU machine (H100/H200; no network; torch, cmake, ninja, scikit-build-core
# and pytest already installed; the repository copied over without .git):
#
#   TERSOR_COMMIT=<sha> bash scripts/gpu_check.sh [--wheel PATH] OUTDIR
#
# With --wheel, installs that prebuilt wheel (scripts/build_wheel.sh --testing, carried over with the tree)
# instead of compiling, so a short GPU loan goes to tests and benchmarks. Otherwise builds tersor against
# that machine's torch for TORCH_CUDA_ARCH_LIST (default 9.0a) on all cores. Then runs
# the whole test suite (CUDA tests included), runs compute-sanitizer over every kernel on small inputs,
# then `tersor bench --device cuda` writing OUTDIR/bench.json and OUTDIR/bench.png, and prints a summary.
# Commit OUTDIR/bench.json as benchmarks/results/<record_name>.json (the name is inside the JSON). Kernels not yet
# validated on a GPU still run in the bench, their rows marked "unverified": pytest-cuda.txt says whether they
# passed; set tersor.attention.CUDA_KERNELS_READY / paged.CUDA_DECODE_READY only after they have.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEEL=""
if [ "${1:-}" = "--wheel" ]; then
  WHEEL=$(realpath "$2"); shift 2
fi
OUT=$(mkdir -p "${1:-gpu_out}" && cd "${1:-gpu_out}" && pwd)
PY=${PYTHON:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
export PYTHONUNBUFFERED=1
status=0
t0=$(date +%s)

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

if [ -n "$WHEEL" ]; then
  echo "== install $WHEEL (no build)"
  if ! "$PY" -m pip install --no-deps --no-index --force-reinstall "$WHEEL" > "$OUT/build.log" 2>&1; then
    tail -n 40 "$OUT/build.log"; echo "INSTALL FAILED"; exit 1
  fi
else
  echo "== build (arch $TORCH_CUDA_ARCH_LIST, $CMAKE_BUILD_PARALLEL_LEVEL jobs)"
  if ! TERSOR_TESTING=ON "$PY" -m pip install -v --no-build-isolation --no-deps --no-index . > "$OUT/build.log" 2>&1; then
    tail -n 80 "$OUT/build.log"
    echo "BUILD FAILED"
    exit 1
  fi
  grep -E "^ *-- tersor:" "$OUT/build.log"
fi
echo "tersor ready in $(( $(date +%s) - t0 )) s"

echo "== tests"
(cd /tmp && "$PY" -c "import tersor, tersor._testing, torch; print(tersor.build_info()); assert torch.cuda.is_available()") || status=1
# No -x: the first GPU run of a family should report every failing kernel, not just the first. The CUDA tests
# first (what only this machine can run), then the rest with the time left (CI runs those on every push).
timeout 300 "$PY" -m pytest tests -m cuda -q -p no:cacheprovider --junitxml="$OUT/pytest-cuda.xml" 2>&1 \
  | tail -n 60 | tee "$OUT/pytest-cuda.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
timeout 180 "$PY" -m pytest tests -m "not cuda" -q -p no:cacheprovider --junitxml="$OUT/pytest.xml" 2>&1 \
  | tail -n 30 | tee "$OUT/pytest.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || echo "(CPU tests: failed or cut by the timeout; CI runs them)"

echo "== compute-sanitizer (memcheck) on every kernel, small inputs"
if command -v compute-sanitizer > /dev/null; then
  timeout 180 compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" scripts/sanitize_smoke.py > "$OUT/sanitizer.txt" 2>&1
  rc=$?; tail -n 5 "$OUT/sanitizer.txt"; [ $rc -eq 0 ] || { echo "SANITIZER rc=$rc"; status=1; }
else
  echo "compute-sanitizer not found"
fi

echo "== bench"
# The progress lines (one per row, with times) go to bench.log as they come; on the timeout's SIGTERM the bench
# still writes bench.json with the rows finished, and a benchmark that raises does not lose the others.
timeout 240 "$PY" -m tersor bench --device cuda --json "$OUT/bench.json" --plot "$OUT/bench.png" 2>&1 \
  | tee "$OUT/bench.log" | tail -n 60
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== summary: status=$status, total $(( $(date +%s) - t0 )) s"
exit $status
