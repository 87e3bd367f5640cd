#!/usr/bin/env bash
# Development: a package tree that imports tersor from this checkout's Python sources with the
# extensions of one CMake build dir, without installing anything (several build dirs can coexist).
#   bash scripts/dev_overlay.sh BUILD_DIR OVERLAY_DIR  ->  PYTHONPATH=OVERLAY_DIR python -m pytest tests ...
set -euo pipefail
build=$(realpath "$1"); out=$2
root=$(cd "$(dirname "$0")/.." && pwd)
rm -rf "$out"; mkdir -p "$out/tersor"
for f in "$root"/python/tersor/*; do ln -s "$f" "$out/tersor/$(basename "$f")"; done
ln -s "$root/benchmarks" "$out/tersor/benchmarks"
for so in "$build"/_C*.so; do ln -s "$so" "$out/tersor/$(basename "$so")"; done
echo "PYTHONPATH=$out"
