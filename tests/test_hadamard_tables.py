"""Tests for scripts/gen_hadamard_tables.py and the generated csrc/hadamard/hadamard_k_tables.h."""

import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "scripts" / "gen_hadamard_tables.py"
HEADER = REPO_ROOT / "csrc" / "hadamard" / "hadamard_k_tables.h"

EXPECTED_KS = (12, 20, 28, 36, 52, 60, 108, 116, 124, 140, 156, 172)


def _load_script():
    spec = importlib.util.spec_from_file_location("gen_hadamard_tables", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


gen = _load_script()


@pytest.fixture(scope="module")
def generated():
    return gen.build_all()


def _parse_header(text):
    """Return (K list from the X-macro, {K: [words]} from the _BITS macros)."""
    joined = re.sub(r"\\\n", " ", text)  # splice backslash continuations
    m = re.search(r"^#define TERSOR_HADAMARD_K_LIST\(X\)(.*)$", joined, re.M)
    assert m, "TERSOR_HADAMARD_K_LIST missing"
    klist = tuple(int(k) for k in re.findall(r"X\((\d+)\)", m.group(1)))
    tables = {}
    for m in re.finditer(r"^#define TERSOR_HADAMARD_K(\d+)_BITS\s+(.*)$", joined, re.M):
        K = int(m.group(1))
        assert K not in tables, f"duplicate macro for K={K}"
        items = [s.strip() for s in m.group(2).split(",")]
        assert all(re.fullmatch(r"0x[0-9a-f]{16}ull", s) for s in items), f"K={K}: bad literal"
        tables[K] = [int(s[2:-3], 16) for s in items]
    return klist, tables


def _decode(words, K):
    W = (K + 63) // 64
    w = np.array(words, dtype=np.uint64).reshape(K, W)
    c = np.arange(K)
    bits = (w[:, c // 64] >> (c % 64).astype(np.uint64)) & np.uint64(1)
    used = K - 64 * (W - 1)
    if used < 64:
        assert not np.any(w[:, -1] >> np.uint64(used)), f"K={K}: unused high bits set"
    return np.where(bits == 1, -1, 1).astype(np.int64)


def _assert_hadamard(H, K):
    assert H.shape == (K, K)
    assert np.all(np.abs(H) == 1)
    assert np.array_equal(H.astype(np.int64) @ H.T.astype(np.int64), K * np.eye(K, dtype=np.int64))


def test_k_list():
    assert tuple(gen.KS) == EXPECTED_KS
    assert sorted(gen.CONSTRUCTIONS) == list(EXPECTED_KS)
    klist, tables = _parse_header(HEADER.read_text())
    assert klist == EXPECTED_KS
    assert tuple(sorted(tables)) == EXPECTED_KS


@pytest.mark.parametrize("K", EXPECTED_KS)
def test_construction_is_hadamard(generated, K):
    _assert_hadamard(generated[K], K)


@pytest.mark.parametrize("q", [11, 19, 27, 59, 107, 139])
def test_paley1(q):
    _assert_hadamard(gen.paley1(q), q + 1)


@pytest.mark.parametrize("q", [5, 9, 13, 17, 25, 61])
def test_paley2(q):
    _assert_hadamard(gen.paley2(q), 2 * (q + 1))


def test_verify_rejects_bad_matrices(generated):
    H = generated[12].copy()
    H[3, 5] = -H[3, 5]
    with pytest.raises(gen.HadamardError):
        gen.verify(H, 12)
    H = generated[12].copy()
    H[0, 0] = 0
    with pytest.raises(gen.HadamardError):
        gen.verify(H, 12)


def test_header_decodes_to_generated(generated):
    _, tables = _parse_header(HEADER.read_text())
    for K in EXPECTED_KS:
        assert len(tables[K]) == K * ((K + 63) // 64)
        H = _decode(tables[K], K)
        _assert_hadamard(H, K)
        assert np.array_equal(H, generated[K]), f"K={K}: header differs from generated matrix"
        assert gen.pack_bits(generated[K]) == tables[K]


def test_header_is_up_to_date(generated):
    # Equivalent to `gen_hadamard_tables.py --check`.
    assert HEADER.read_text() == gen.render_header(generated)
    assert gen.main(["--check"]) == 0


def test_render_is_deterministic(generated):
    assert gen.render_header(generated) == gen.render_header(gen.build_all())


@pytest.mark.parametrize("n", [39, 43])
def test_search_reproduces_hardcoded_rows(n):
    # (n = 29 takes ~1.5 s; run `gen_hadamard_tables.py --search` for it.)
    H, seqs = gen.search_circulants(n)
    rows = tuple("".join("+" if v > 0 else "-" for v in x) for x in seqs)
    assert rows == gen.CIRCULANT_ROWS[n]["rows"]
    assert tuple(H) == gen.CIRCULANT_ROWS[n]["multipliers"]
