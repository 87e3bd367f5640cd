#!/usr/bin/env bash
# The CPU code under AddressSanitizer + UndefinedBehaviorSanitizer (issue 17; docs/build.md, "Sanitizer build").
#
#   bash scripts/sanitize.sh [pytest args]        # no test paths given: the loader and decoder tests
#                                                 # (SANITIZE_TESTS below) with those options
#   bash scripts/sanitize.sh --python ARGS...     # any python command under the sanitizers, e.g.
#   bash scripts/sanitize.sh --python scripts/fuzz.py --target codec --iters 100000
#
# Configures and builds both extensions (_C and _C_testing, CUDA off) with TERSOR_SANITIZE=address,undefined
# into their own build dir (TERSOR_SANITIZE_BUILD, default build/sanitize; incremental), makes a package
# overlay of this checkout's Python sources with those modules (scripts/dev_overlay.sh), and runs python
# with the ASan runtime LD_PRELOADed: python itself is not instrumented, and ASan must be the first library
# loaded to replace malloc for the whole process.
# Environment: TERSOR_PYTHON (a python with torch >= 2.11; default: python on PATH), TERSOR_JOBS (ninja -j,
# default 2), TERSOR_SANITIZE_BUILD.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
PY=$(command -v "${TERSOR_PYTHON:-python}")
BUILD=${TERSOR_SANITIZE_BUILD:-$root/build/sanitize}
SANITIZE_TESTS=(tests/test_codec.py tests/test_sparse24.py tests/test_sparse24_layer.py tests/test_bsr.py
                tests/test_sparse_layer_bsr.py tests/test_codebook_ops.py tests/test_codebook_layers.py
                tests/test_quant_aqlm.py tests/test_quant_e8p12.py tests/test_quipsharp_ckpt.py
                tests/test_model_api.py tests/test_fuzz.py tests/test_paged_decode.py
                tests/test_attention_varlen.py tests/test_attention_padding.py tests/test_attention_mask.py)

mkdir -p "$(dirname "$BUILD")"
start=$(date +%s)
cmake -S . -B "$BUILD" -G Ninja -DPython_EXECUTABLE="$PY" -DCMAKE_BUILD_TYPE=Release -DTERSOR_CUDA=OFF \
  -DTERSOR_TESTING=ON -DTERSOR_SANITIZE=address,undefined > "$BUILD.cmake.log" 2>&1 \
  || { cat "$BUILD.cmake.log"; exit 1; }
ninja -C "$BUILD" -j"${TERSOR_JOBS:-2}" > "$BUILD.ninja.log" 2>&1 \
  || { tail -n 60 "$BUILD.ninja.log"; echo "[sanitize] build failed (log: $BUILD.ninja.log)" >&2; exit 1; }
# One overlay per invocation (removed at the end): several runs (fuzz targets side by side) share a build dir.
overlay="$BUILD/overlay.$$"
bash scripts/dev_overlay.sh "$BUILD" "$overlay" > /dev/null
echo "[sanitize] build ready in $(( $(date +%s) - start )) s ($BUILD)"

# The runtimes: libasan first in the process (LD_PRELOAD); libubsan comes in as the modules' dependency.
# libstdc++ is preloaded right after it: python does not link libstdc++, so at ASan's start-up its __cxa_throw
# interceptor finds no real __cxa_throw, and the first C++ exception in the process (thrown inside triton's
# module init, which `import torch` runs) aborts with "CHECK failed: ... real___cxa_throw != 0".
asan=$(gcc -print-file-name=libasan.so)
stdcxx=$(gcc -print-file-name=libstdc++.so.6)
[ -e "$asan" ] || { echo "[sanitize] no libasan.so next to gcc ($asan)" >&2; exit 1; }
export LD_PRELOAD="$asan:$stdcxx${LD_PRELOAD:+:$LD_PRELOAD}"
# ASAN_OPTIONS, each with its reason:
#  detect_leaks=0            CPython and torch keep allocations alive until exit (interned objects, op registries,
#                            thread pools); LeakSanitizer would report them at every exit and fail every run.
#  allocator_may_return_null=1  a size no allocator can serve returns NULL (torch then raises its own "not enough
#                            memory" error) as without ASan, instead of ASan aborting: an unchecked huge size in
#                            tersor then shows up as the RuntimeError it is in a normal build (the fuzzer flags it).
#  halt_on_error=1, abort_on_error=1  the first report ends the process (a crash to the fuzzer and to pytest).
#  suppressions=...          torch's own reports, if any (scripts/sanitize.supp, each entry with its reason).
#  symbolize=1               file:line frames in reports (llvm-symbolizer or addr2line, whichever is on PATH).
export ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:halt_on_error=1:abort_on_error=1:symbolize=1:suppressions=$root/scripts/sanitize.supp${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
# UBSan: tersor is built with -fno-sanitize-recover=all (a report aborts); print_stacktrace for where.
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
export PYTHONPATH="$overlay${PYTHONPATH:+:$PYTHONPATH}"
export TERSOR_REQUIRE_TESTING_EXT=1

set +e
if [ "${1:-}" = "--python" ]; then
  shift
  "$PY" "$@"
  rc=$?
  rm -rf "$overlay"
  exit $rc
fi
has_paths=0
for a in "$@"; do case "$a" in tests*|*.py|*::*) has_paths=1 ;; esac; done
if [ $has_paths = 0 ]; then  # no test paths given: the default list, with these pytest options (or -q)
  [ $# = 0 ] && set -- -q -p no:cacheprovider
  set -- "${SANITIZE_TESTS[@]}" "$@"
fi
t0=$(date +%s)
"$PY" -m pytest "$@"
rc=$?
rm -rf "$overlay"
echo "[sanitize] pytest rc=$rc in $(( $(date +%s) - t0 )) s (total $(( $(date +%s) - start )) s)"
exit $rc
