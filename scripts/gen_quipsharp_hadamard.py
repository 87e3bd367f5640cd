#!/usr/bin/env python3
"""Writes python/tersor/data/quipsharp_hadamard.json: QuIP#'s Hadamard matrices H_K (K * 2^k sizes) as data.

    python scripts/gen_quipsharp_hadamard.py --matrix 12=had12.txt --matrix 172=had172.txt ... [--out PATH]
    python scripts/gen_quipsharp_hadamard.py --check [PATH]      # verify a written file (hashes, H H^T = K I)

Each input file holds one matrix in Sloane's text form: K non-blank lines of K characters '+' / '-' (spaces
are ignored; no other characters). It must be **exactly the matrix QuIP#'s ``get_hadK(n)`` returns** for an
n with that K (``lib/utils/matmul_had.py`` of Cornell-RelaxML/quip-sharp): the matrix ``matmul_hadU``
multiplies from the left after the power-of-two transform, same row order, same signs. QuIP# took its
matrices from Sloane's library but hard-codes them in its own source; check the two agree before shipping
(a transposed or re-ordered matrix is still a Hadamard matrix, so this script cannot tell).

The file (docs/formats.md, "QuIP# Hadamard matrices"): JSON ``{"format": "tersor-quipsharp-hadamard",
"version": 1, "source": ..., "matrices": {"K": {"rows": [K strings], "sha256": hex}}}``; sha256 of the
matrix as row-major int8 bytes (+1 -> 01, -1 -> ff). tersor re-checks every hash and H H^T = K I at load.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import numpy as np

QUIPSHARP_K_SIZES = (12, 20, 28, 36, 52, 60, 108, 116, 124, 140, 156, 172)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "python", "tersor", "data", "quipsharp_hadamard.json")


def read_matrix(path: str, k: int) -> list[str]:
    with open(path) as f:
        rows = ["".join(line.split()) for line in f if line.strip()]
    if len(rows) != k or any(len(r) != k or set(r) - {"+", "-"} for r in rows):
        raise SystemExit(f"{path}: expected {k} non-blank lines of {k} '+'/'-' characters, got {len(rows)} lines")
    return rows


def to_array(rows: list[str]) -> np.ndarray:
    return np.array([[1 if c == "+" else -1 for c in r] for r in rows], dtype=np.int8)


def sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype=np.int8).tobytes()).hexdigest()


def check_hadamard(a: np.ndarray, what: str) -> None:
    k = a.shape[0]
    g = a.astype(np.int64) @ a.astype(np.int64).T
    if not np.array_equal(g, k * np.eye(k, dtype=np.int64)):
        raise SystemExit(f"{what}: not a Hadamard matrix (H H^T != {k} I)")


def check_file(path: str) -> None:
    with open(path) as f:
        doc = json.load(f)
    if doc.get("format") != "tersor-quipsharp-hadamard" or doc.get("version") != 1:
        raise SystemExit(f"{path}: not a tersor-quipsharp-hadamard v1 file")
    for key, entry in sorted(doc["matrices"].items(), key=lambda kv: int(kv[0])):
        k = int(key)
        rows = entry["rows"]
        if len(rows) != k or any(len(r) != k or set(r) - {"+", "-"} for r in rows):
            raise SystemExit(f"{path}: H_{k}: malformed rows")
        a = to_array(rows)
        check_hadamard(a, f"{path}: H_{k}")
        if sha256(a) != entry["sha256"]:
            raise SystemExit(f"{path}: H_{k}: sha256 {sha256(a)} != recorded {entry['sha256']}")
        print(f"H_{k}: ok, sha256 {entry['sha256']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--matrix", action="append", default=[], metavar="K=FILE", help="one matrix (repeatable)")
    ap.add_argument("--source", default="QuIP# lib/utils/matmul_had.py get_hadK (Sloane's library)",
                    help="provenance recorded in the file")
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--check", nargs="?", const=DEFAULT_OUT, default=None, metavar="PATH")
    args = ap.parse_args(argv)
    if args.check:
        check_file(args.check)
        return 0
    if not args.matrix:
        ap.error("give at least one --matrix K=FILE (or --check)")
    matrices = {}
    for spec in args.matrix:
        key, _, path = spec.partition("=")
        k = int(key)
        if k not in QUIPSHARP_K_SIZES:
            raise SystemExit(f"--matrix {spec}: K must be one of {QUIPSHARP_K_SIZES}")
        rows = read_matrix(path, k)
        a = to_array(rows)
        check_hadamard(a, path)
        matrices[str(k)] = {"rows": rows, "sha256": sha256(a)}
        print(f"H_{k}: {path}, sha256 {matrices[str(k)]['sha256']}")
    doc = {"format": "tersor-quipsharp-hadamard", "version": 1, "source": args.source,
           "matrices": dict(sorted(matrices.items(), key=lambda kv: int(kv[0])))}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
