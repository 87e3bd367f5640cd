#!/usr/bin/env bash
# One hash of everything a tersor wheel is built from (tracked and untracked, non-ignored files), so that
# scripts/run.sh can tell whether dist/'s wheel (scripts/build_wheel.sh) was built from these sources.
set -euo pipefail
cd "$(dirname "$0")/.."
git ls-files -co --exclude-standard -- csrc python benchmarks cmake CMakeLists.txt pyproject.toml \
  | LC_ALL=C sort | while read -r f; do [ -f "$f" ] && sha256sum "$f"; done | sha256sum | cut -c1-32
