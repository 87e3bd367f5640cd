#!/usr/bin/env python3
"""Generate csrc/hadamard/hadamard_k_tables.h: Hadamard matrices of the "odd" sizes K.

A Hadamard matrix of order K has entries +-1 and satisfies H @ H.T == K * I.  The
kernels in csrc/hadamard combine a K x K Hadamard matrix with a fast Walsh-Hadamard
transform of size 2^m to obtain Hadamard transforms of size K * 2^m.  This script
constructs one matrix for each supported K from classical constructions:

* Paley I   (q a prime power, q = 3 mod 4): order q + 1.
* Paley II  (q a prime power, q = 1 mod 4): order 2 (q + 1).
* Williamson / Goethals-Seidel arrays of four circulant +-1 matrices of odd order n:
  order 4 n.  Their first rows were found by the computer search in this file
  (``--search``) and are hard-coded below so that normal generation is instant and
  deterministic.

Every matrix is verified exactly (integer arithmetic) before anything is written.

Usage:
    python3 scripts/gen_hadamard_tables.py            # (re)write the header
    python3 scripts/gen_hadamard_tables.py --check    # exit 1 if the header is stale
    python3 scripts/gen_hadamard_tables.py --print 28 # show one matrix as +/- rows
    python3 scripts/gen_hadamard_tables.py --search   # re-run the circulant search

Only the Python standard library and numpy are used.
"""

from __future__ import annotations

import argparse
import difflib
import itertools
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
HEADER_REL = Path("csrc") / "hadamard" / "hadamard_k_tables.h"
HEADER_PATH = REPO_ROOT / HEADER_REL

# Supported sizes (ascending).  Each is 4 * odd or 4 * (odd > 1), i.e. the sizes that
# cannot be reached from smaller ones by Sylvester doubling alone.
KS = (12, 20, 28, 36, 52, 60, 108, 116, 124, 140, 156, 172)

# K -> (construction, parameter).  "paley1"/"paley2": parameter q; "circulant": n.
CONSTRUCTIONS = {
    12: ("paley1", 11),
    20: ("paley1", 19),
    28: ("paley1", 27),
    36: ("paley2", 17),
    52: ("paley2", 25),
    60: ("paley1", 59),
    108: ("paley1", 107),
    116: ("circulant", 29),
    124: ("paley2", 61),
    140: ("paley1", 139),
    156: ("circulant", 39),
    172: ("circulant", 43),
}

# First rows of the four circulant matrices A, B, C, D ('+' = +1, '-' = -1) for the
# sizes 4 n without a Paley construction.  Found by `gen_hadamard_tables.py --search`
# (see search_circulants); the multiplier group is the subgroup of (Z/nZ)^* the
# search restricted the sequences to (each sequence is constant on its orbits).
# The periodic autocorrelations of the four rows sum to 0 at every nonzero shift.
CIRCULANT_ROWS = {
    # All four rows are symmetric (multiplier group {1, -1}): Williamson matrices.
    29: {
        "multipliers": (1, 28),
        "rows": (
            "+++-++-+--+++-++-+++--+-++-++",
            "+--+-+++++--++--++--+++++-+--",
            "---++--+-+-++++++++-+-+--++--",
            "+++---+++-+-+----+-+-+++---++",
        ),
    },
    39: {
        "multipliers": (1, 14, 16, 22, 29, 35),
        "rows": (
            "+-++-+-+++-+++-----+++--+-+++-+++++-++-",
            "-+----+++--++++++-+-+++-+-+--++--+++++-",
            "+-+-++-++-++-----+-+++-+++--+--++++--++",
            "-++--+------+++-+--+-++-+-+-++++++-++--",
        ),
    },
    43: {
        "multipliers": (1, 4, 11, 16, 21, 35, 41),
        "rows": (
            "---+-+++-++-++++-++++--++++-++++-++-+++-+--",
            "+-+----+++---+++-++---+--++++++-+-+-+--+--+",
            "+-----++-++--+++-++----++++-++++--+-+-+-+--",
            "+-----++-++--+++-++----++++-++++--+-+-+-+--",
        ),
    },
}


class HadamardError(RuntimeError):
    pass


# ----------------------------------------------------------------------------------
# Finite fields GF(p^m)
# ----------------------------------------------------------------------------------


def prime_power(q: int) -> tuple[int, int]:
    """Return (p, m) with q == p**m, p prime; raise if q is not a prime power."""
    if q < 2:
        raise HadamardError(f"{q} is not a prime power")
    p = next(d for d in range(2, q + 1) if q % d == 0)
    m, r = 0, q
    while r % p == 0:
        r //= p
        m += 1
    if r != 1:
        raise HadamardError(f"{q} is not a prime power")
    return p, m


def _poly_mod(a: list[int], f: list[int], p: int) -> list[int]:
    """Remainder of a modulo the monic f; coefficient lists, lowest degree first."""
    a = [x % p for x in a]
    df = len(f) - 1
    for i in range(len(a) - 1, df - 1, -1):
        c = a[i]
        if c:
            for j in range(df + 1):
                a[i - df + j] = (a[i - df + j] - c * f[j]) % p
    return a[:df]


def _is_irreducible(f: list[int], p: int) -> bool:
    """Trial division of the monic f by every monic polynomial of degree 1..deg/2."""
    m = len(f) - 1
    for d in range(1, m // 2 + 1):
        for low in itertools.product(range(p), repeat=d):
            g = list(low) + [1]
            if not any(_poly_mod(f, g, p)):
                return False
    return True


def irreducible_poly(p: int, m: int) -> list[int]:
    """First (lexicographic) monic irreducible polynomial of degree m over GF(p)."""
    if m == 1:
        return [0, 1]  # x
    for low in itertools.product(range(p), repeat=m):
        f = list(reversed(low)) + [1]
        if f[0] != 0 and _is_irreducible(f, p):
            return f
    raise HadamardError(f"no irreducible polynomial of degree {m} over GF({p})")


def poly_str(f: list[int]) -> str:
    terms = []
    for i in range(len(f) - 1, -1, -1):
        c = f[i]
        if not c:
            continue
        mono = "" if i == 0 else ("x" if i == 1 else f"x^{i}")
        coef = "" if (c == 1 and i > 0) else str(c)
        terms.append(coef + mono)
    return " + ".join(terms)


class GF:
    """GF(q), q = p^m.  Element k <-> polynomial sum_i digit_i(k) x^i (base-p digits)."""

    def __init__(self, q: int):
        self.q = q
        self.p, self.m = prime_power(q)
        self.modulus = irreducible_poly(self.p, self.m)
        p, m = self.p, self.m
        digits = np.array([[(k // p**i) % p for i in range(m)] for k in range(q)], dtype=np.int64)
        weights = p ** np.arange(m, dtype=np.int64)
        # sub[a, b] = a - b (digit-wise mod p)
        self.sub = ((digits[:, None, :] - digits[None, :, :]) % p) @ weights
        # squares of the nonzero elements (polynomial product reduced mod the modulus)
        self.is_square = np.zeros(q, dtype=bool)
        for k in range(1, q):
            a = [int(x) for x in digits[k]]
            prod = [0] * (2 * m - 1)
            for i in range(m):
                for j in range(m):
                    prod[i + j] += a[i] * a[j]
            r = _poly_mod(prod, self.modulus, p) if m > 1 else [prod[0] % p]
            self.is_square[sum(c * p**i for i, c in enumerate(r))] = True

    def chi(self) -> np.ndarray:
        """Quadratic character: 0 at 0, +1 on nonzero squares, -1 on non-squares."""
        c = np.where(self.is_square, 1, -1).astype(np.int64)
        c[0] = 0
        return c

    def describe(self) -> str:
        if self.m == 1:
            return f"q={self.q}"
        return f"q={self.q}={self.p}^{self.m}, GF({self.q}) = GF({self.p})[x]/({poly_str(self.modulus)})"


def jacobsthal(field: GF) -> np.ndarray:
    """Q[i, j] = chi(a_i - a_j)."""
    return field.chi()[field.sub]


# ----------------------------------------------------------------------------------
# Constructions
# ----------------------------------------------------------------------------------


def paley1(q: int) -> np.ndarray:
    """Paley I, q = 3 mod 4: H = I + S, S = [[0, 1^T], [-1, Q]] (skew), order q + 1."""
    if q % 4 != 3:
        raise HadamardError(f"Paley I needs q = 3 mod 4, got {q}")
    Q = jacobsthal(GF(q))
    S = np.zeros((q + 1, q + 1), dtype=np.int64)
    S[0, 1:] = 1
    S[1:, 0] = -1
    S[1:, 1:] = Q
    return np.eye(q + 1, dtype=np.int64) + S


def paley2(q: int) -> np.ndarray:
    """Paley II, q = 1 mod 4: symmetric conference matrix C = [[0, 1^T], [1, Q]];
    H = C (x) [[1, 1], [1, -1]] + I (x) [[1, -1], [-1, -1]], order 2 (q + 1)."""
    if q % 4 != 1:
        raise HadamardError(f"Paley II needs q = 1 mod 4, got {q}")
    Q = jacobsthal(GF(q))
    C = np.zeros((q + 1, q + 1), dtype=np.int64)
    C[0, 1:] = 1
    C[1:, 0] = 1
    C[1:, 1:] = Q
    h2 = np.array([[1, 1], [1, -1]], dtype=np.int64)
    z2 = np.array([[1, -1], [-1, -1]], dtype=np.int64)
    return np.kron(C, h2) + np.kron(np.eye(q + 1, dtype=np.int64), z2)


def circulant(row) -> np.ndarray:
    """C[i, j] = row[(j - i) mod n]."""
    row = np.asarray(row, dtype=np.int64)
    n = len(row)
    idx = (np.arange(n)[None, :] - np.arange(n)[:, None]) % n
    return row[idx]


def parse_row(s: str) -> np.ndarray:
    if set(s) - {"+", "-"}:
        raise HadamardError(f"bad +/- row {s!r}")
    return np.array([1 if ch == "+" else -1 for ch in s], dtype=np.int64)


def is_symmetric_seq(a) -> bool:
    a = np.asarray(a)
    return bool(np.array_equal(a, np.roll(a[::-1], 1)))


def williamson_array(A, B, C, D) -> np.ndarray:
    """Symmetric, pairwise commuting A..D with A^2 + B^2 + C^2 + D^2 = 4 n I."""
    return np.block([
        [A, B, C, D],
        [-B, A, -D, C],
        [-C, D, A, -B],
        [-D, -C, B, A],
    ])


def goethals_seidel_array(A, B, C, D) -> np.ndarray:
    """Circulant A..D with A A^T + B B^T + C C^T + D D^T = 4 n I; R = back-diagonal."""
    n = A.shape[0]
    R = np.eye(n, dtype=np.int64)[::-1]
    return np.block([
        [A, B @ R, C @ R, D @ R],
        [-B @ R, A, D.T @ R, -C.T @ R],
        [-C @ R, -D.T @ R, A, B.T @ R],
        [-D @ R, C.T @ R, -B.T @ R, A],
    ])


def circulant_hadamard(n: int) -> np.ndarray:
    rows = [parse_row(s) for s in CIRCULANT_ROWS[n]["rows"]]
    if any(len(r) != n for r in rows):
        raise HadamardError(f"circulant rows for n={n} have the wrong length")
    mats = [circulant(r) for r in rows]
    if all(is_symmetric_seq(r) for r in rows):
        return williamson_array(*mats)
    return goethals_seidel_array(*mats)


def describe(K: int) -> str:
    kind, param = CONSTRUCTIONS[K]
    if kind == "paley1":
        return f"K={K}: Paley I, {GF(param).describe()}"
    if kind == "paley2":
        return f"K={K}: Paley II, {GF(param).describe()}"
    n = param
    info = CIRCULANT_ROWS[n]
    mult = "{" + ",".join(map(str, info["multipliers"])) + "}"
    if all(is_symmetric_seq(parse_row(s)) for s in info["rows"]):
        arr = "Williamson array (symmetric circulants)"
    else:
        arr = "Goethals-Seidel array (circulants)"
    return (f"K={K}: {arr}, n={n}; first rows found by --search "
            f"(invariant under multipliers {mult} mod {n})")


def verify(H: np.ndarray, K: int) -> np.ndarray:
    """Fail loudly unless H is a K x K +-1 matrix with H @ H.T == K * I (exactly)."""
    H = np.asarray(H)
    if H.shape != (K, K):
        raise HadamardError(f"K={K}: matrix has shape {H.shape}")
    if not np.issubdtype(H.dtype, np.integer):
        raise HadamardError(f"K={K}: matrix is not integer ({H.dtype})")
    H = H.astype(np.int64)
    if not np.all(np.abs(H) == 1):
        raise HadamardError(f"K={K}: entries are not all +-1")
    G = H @ H.T
    if not np.array_equal(G, K * np.eye(K, dtype=np.int64)):
        bad = np.argwhere(G != K * np.eye(K, dtype=np.int64))
        raise HadamardError(f"K={K}: H @ H.T != K*I (first bad entry at {tuple(bad[0])})")
    return H


def build(K: int) -> np.ndarray:
    if K not in CONSTRUCTIONS:
        raise HadamardError(f"unsupported K={K}; supported: {KS}")
    kind, param = CONSTRUCTIONS[K]
    if kind == "paley1":
        H = paley1(param)
    elif kind == "paley2":
        H = paley2(param)
    else:
        H = circulant_hadamard(param)
    return verify(H, K)


def build_all() -> dict[int, np.ndarray]:
    return {K: build(K) for K in KS}


# ----------------------------------------------------------------------------------
# Header
# ----------------------------------------------------------------------------------


def words_per_row(K: int) -> int:
    return (K + 63) // 64


def pack_bits(H: np.ndarray) -> list[int]:
    """Row-major sign bits: bit (c % 64) of word r*W + c//64 is 1 iff H[r][c] == -1."""
    K = H.shape[0]
    W = words_per_row(K)
    out = []
    for r in range(K):
        for w in range(W):
            v = 0
            for c in range(64 * w, min(64 * (w + 1), K)):
                if H[r, c] == -1:
                    v |= 1 << (c % 64)
            out.append(v)
    return out


def unpack_bits(words: list[int], K: int) -> np.ndarray:
    W = words_per_row(K)
    if len(words) != K * W:
        raise HadamardError(f"K={K}: expected {K * W} words, got {len(words)}")
    H = np.ones((K, K), dtype=np.int64)
    for r in range(K):
        for c in range(K):
            if (words[r * W + c // 64] >> (c % 64)) & 1:
                H[r, c] = -1
    for r in range(K):  # unused high bits must be zero
        last = words[r * W + W - 1]
        used = K - 64 * (W - 1)
        if used < 64 and last >> used:
            raise HadamardError(f"K={K}: unused high bits set in row {r}")
    return H


PER_LINE = 4


def render_header(mats: dict[int, np.ndarray] | None = None) -> str:
    if mats is None:
        mats = build_all()
    lines = ["// GENERATED by scripts/gen_hadamard_tables.py -- do not edit by hand."]
    lines += [f"// {describe(K)}" for K in KS]
    lines.append("#pragma once")
    lines.append("// X-macro over the supported K (ascending).")
    lines.append("#define TERSOR_HADAMARD_K_LIST(X) " + " ".join(f"X({K})" for K in KS))
    lines.append("// Row-major K x K sign bits: row r occupies 64-bit words [r*W, (r+1)*W), "
                 "W = (K + 63) / 64;")
    lines.append("// bit (c % 64) of word r*W + c/64 is 1 where H[r][c] == -1, 0 where +1. "
                 "Unused high bits are 0.")
    for K in KS:
        words = [f"0x{v:016x}ull" for v in pack_bits(mats[K])]
        chunks = [", ".join(words[i:i + PER_LINE]) for i in range(0, len(words), PER_LINE)]
        first = f"#define TERSOR_HADAMARD_K{K}_BITS "
        lines.append(first + ", \\\n    ".join(chunks))
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------
# Search for the circulant first rows (--search)
# ----------------------------------------------------------------------------------


def _multiplier_subgroups(n: int) -> list[tuple[int, ...]]:
    """Cyclic subgroups of (Z/nZ)^* other than {1}, largest first (fewest orbits)."""
    seen = set()
    for g in range(2, n):
        if np.gcd(g, n) != 1:
            continue
        H, x = [1], g
        while x != 1:
            H.append(x)
            x = x * g % n
        seen.add(tuple(sorted(H)))
    return sorted(seen, key=lambda h: (-len(h), h))


def _orbits(n: int, H) -> list[list[int]]:
    done, orbs = set(), []
    for x in range(n):
        if x not in done:
            o = sorted({x * h % n for h in H})
            done.update(o)
            orbs.append(o)
    return orbs


def _odd_square_decompositions(total: int) -> list[tuple[int, int, int, int]]:
    """total = a^2 + b^2 + c^2 + d^2 with odd a >= b >= c >= d > 0."""
    out = []
    lim = int(total**0.5) + 1
    for a in range(1, lim + 1, 2):
        for b in range(1, a + 1, 2):
            for c in range(1, b + 1, 2):
                for d in range(1, c + 1, 2):
                    if a * a + b * b + c * c + d * d == total:
                        out.append((a, b, c, d))
    return out


def search_circulants_with(n: int, H) -> list[np.ndarray] | None:
    """Four +-1 sequences of length n, each constant on the orbits of the multiplier
    group H acting on Z_n, whose periodic autocorrelations (PAF) sum to 0 at every
    nonzero shift.  Exhaustive meet-in-the-middle:

    * enumerate all 2^(#orbits) H-invariant sequences, normalise to positive row sum,
      keep those with power spectral density PSD(k) <= 4n at every frequency;
    * the row sums must satisfy sA^2 + sB^2 + sC^2 + sD^2 = 4n;
    * for each decomposition, form pairs (A, B) and (C, D) with PSD_A + PSD_B <= 4n,
      key them by PAF_A + PAF_B resp. -(PAF_C + PAF_D) (the PAF of an H-invariant
      sequence is H-invariant, so one shift per orbit suffices) and match by hashing.
    """
    orbs = _orbits(n, H)
    r = len(orbs)
    M = np.zeros((r, n), dtype=np.int64)
    for k, o in enumerate(orbs):
        M[k, o] = 1
    bits = (np.arange(2**r, dtype=np.int64)[:, None] >> np.arange(r)) & 1
    X = (1 - 2 * bits) @ M
    s = X.sum(axis=1)
    X, s = X[s > 0], s[s > 0]
    F = np.fft.fft(X, axis=1)
    PSD = F.real**2 + F.imag**2
    tol = 1e-6 * n
    keep = (PSD[:, 1:(n + 1) // 2] <= 4 * n + tol).all(axis=1)
    X, s, PSD = X[keep], s[keep], PSD[keep][:, 1:(n + 1) // 2]
    # exact integer PAF at one representative shift per nonzero orbit
    reps = [o[0] for o in orbs if o[0] != 0]
    PAF = np.stack([(X * np.roll(X, -t, axis=1)).sum(axis=1) for t in reps], axis=1)

    def pairs(i1, i2, sign):
        rows, keys = [], []
        for i in i1:
            j = i2[(PSD[i][None, :] + PSD[i2] <= 4 * n + tol).all(axis=1)]
            rows.append(np.stack([np.full(len(j), i), j], axis=1))
            keys.append(sign * (PAF[i][None, :] + PAF[j]))
        if not rows:
            return np.zeros((0, 2), dtype=np.int64), np.zeros((0, len(reps)), dtype=np.int64)
        return np.concatenate(rows), np.concatenate(keys)

    for dec in _odd_square_decompositions(4 * n):
        idx = [np.nonzero(s == v)[0] for v in dec]
        pl, kl = pairs(idx[0], idx[1], 1)
        pr, kr = pairs(idx[2], idx[3], -1)
        if len(pl) == 0 or len(pr) == 0:
            continue
        table = {}
        for t, key in enumerate(map(bytes, np.ascontiguousarray(kl))):
            table.setdefault(key, t)
        for t, key in enumerate(map(bytes, np.ascontiguousarray(kr))):
            if key in table:
                a, b = pl[table[key]]
                c, d = pr[t]
                return [X[a], X[b], X[c], X[d]]
    return None


def search_circulants(n: int):
    """Try multiplier groups from largest (tiny search) to {1, -1} (Williamson)."""
    for H in _multiplier_subgroups(n):
        res = search_circulants_with(n, H)
        if res is not None:
            return H, res
    raise HadamardError(f"no circulant quadruple found for n={n}")


def run_search(ns) -> int:
    for n in ns:
        t0 = time.perf_counter()
        H, seqs = search_circulants(n)
        dt = time.perf_counter() - t0
        rows = tuple("".join("+" if v > 0 else "-" for v in x) for x in seqs)
        mats = [circulant(x) for x in seqs]
        arr = williamson_array if all(is_symmetric_seq(x) for x in seqs) else goethals_seidel_array
        verify(arr(*mats), 4 * n)
        same = n in CIRCULANT_ROWS and CIRCULANT_ROWS[n]["rows"] == rows
        print(f"# n={n} (K={4 * n}): found in {dt:.2f} s with multipliers {H}"
              f"{' -- matches the hard-coded rows' if same else ''}")
        print(f"    {n}: {{")
        print(f"        \"multipliers\": {H},")
        print("        \"rows\": (")
        for row in rows:
            print(f"            \"{row}\",")
        print("        ),")
        print("    },")
    return 0


# ----------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true",
                      help=f"exit non-zero if {HEADER_REL} is not up to date")
    mode.add_argument("--print", type=int, metavar="K", dest="print_k",
                      help="print the K x K matrix as +/- rows")
    mode.add_argument("--search", type=int, nargs="*", metavar="N",
                      help="re-run the circulant search (default: n = "
                           + ", ".join(map(str, sorted(CIRCULANT_ROWS))) + ")")
    ap.add_argument("--output", type=Path, default=HEADER_PATH, help="header path")
    args = ap.parse_args(argv)

    try:
        if args.search is not None:
            return run_search(args.search or sorted(CIRCULANT_ROWS))
        if args.print_k is not None:
            K = args.print_k
            H = build(K)
            print(f"// {describe(K)}")
            for row in H:
                print("".join("+" if v > 0 else "-" for v in row))
            return 0
        text = render_header()
    except HadamardError as e:
        print(f"gen_hadamard_tables: error: {e}", file=sys.stderr)
        return 2

    if args.check:
        try:
            current = args.output.read_text()
        except FileNotFoundError:
            print(f"gen_hadamard_tables: {args.output} is missing; "
                  f"run scripts/gen_hadamard_tables.py", file=sys.stderr)
            return 1
        if current != text:
            diff = difflib.unified_diff(current.splitlines(), text.splitlines(),
                                        "committed", "generated", lineterm="", n=1)
            sys.stderr.write("\n".join(itertools.islice(diff, 40)) + "\n")
            print(f"gen_hadamard_tables: {args.output} is out of date; "
                  f"run scripts/gen_hadamard_tables.py", file=sys.stderr)
            return 1
        print(f"{args.output}: up to date")
        return 0

    args.output.parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w", newline="\n") as f:
        f.write(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
