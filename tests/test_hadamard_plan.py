"""The CUDA Hadamard kernel's work plan and shared-memory layout, checked without a GPU.

The plan (hadamard_plan.h: make_pow2_plan, smem_index) is what the kernel is instantiated from. Here
the kernel's data movement is replayed in numpy from the same plan and index function: registers per
thread, xor-shuffles across lanes, the shared-memory rounds. If the replay computes the Sylvester
transform, the index math of the kernel is right; the bank model checks the layout is conflict-free.
"""

import numpy as np
import pytest
import torch

from conftest import load_testing_ops

T = load_testing_ops()  # torch.ops.tersor_testing

from reference import fwht

FIELDS = ["log_n", "n", "elem_bytes", "ept", "vec_bytes", "tpr", "wpr", "lane_bits", "rows_per_block",
          "block_threads", "rounds", "ept_round", "groups", "smem_bytes"]
MAX_SMEM = 72 * 1024
CASES = [(lg, eb) for eb in (2, 4) for lg in range(16)]


def plan(log_n, elem_bytes):
    return dict(zip(FIELDS, T._hadamard_plan(log_n, elem_bytes)))


def smem_index(j):
    j = np.asarray(j, dtype=np.int64)
    return np.asarray(T._hadamard_smem_index(j.ravel().tolist()), dtype=np.int64).reshape(j.shape)


@pytest.mark.parametrize("log_n,elem_bytes", CASES)
def test_plan_invariants(log_n, elem_bytes):
    p = plan(log_n, elem_bytes)
    assert p["n"] == 1 << log_n
    assert p["tpr"] * p["ept"] == p["n"]
    assert p["block_threads"] <= 1024 and p["block_threads"] % 32 == 0  # full-warp shuffles
    assert p["block_threads"] == p["tpr"] * p["rows_per_block"]
    assert p["vec_bytes"] == min(16, p["ept"] * elem_bytes)
    if p["tpr"] < 32:
        assert 32 % p["tpr"] == 0 and p["wpr"] == 1
    else:
        assert p["tpr"] % 32 == 0 and p["wpr"] == p["tpr"] // 32
    assert 2 ** p["lane_bits"] == min(p["tpr"], 32)
    if p["wpr"] > 1:
        assert p["rows_per_block"] == 1
        assert p["ept_round"] * p["rounds"] == p["ept"]
        assert p["groups"] * p["wpr"] == p["ept_round"]
        assert p["smem_bytes"] <= MAX_SMEM
        # The padded layout of one round fits the allocation.
        assert smem_index(p["n"] // p["rounds"] - 1) * 4 < p["smem_bytes"]
    else:
        assert p["smem_bytes"] == 0
    # 16-byte global accesses whenever the row is long enough (memory-bound kernel).
    if p["n"] * elem_bytes >= 16:
        assert p["vec_bytes"] == 16


def test_no_plan_outside_range():
    for args in [(16, 2), (-1, 2), (4, 8)]:
        with pytest.raises(ValueError):
            plan(*args)


def emulate_kernel(x_row, p):
    """Replays fwht_pow2_kernel's data movement for one row; returns the row it would store."""
    tpr, ept = p["tpr"], p["ept"]
    v = x_row.astype(np.float64).reshape(tpr, ept).copy()  # v[t, e]: thread t's registers
    v = fwht(torch.from_numpy(v)).numpy()  # in-register butterflies over the register bits
    t = np.arange(tpr)
    for j in range(p["lane_bits"]):  # __shfl_xor_sync(.., 1 << j)
        other = v[t ^ (1 << j)]
        upper = ((t >> j) & 1).astype(bool)[:, None]
        v = np.where(upper, other - v, v + other)
    if p["wpr"] > 1:
        er, wpr, groups = p["ept_round"], p["wpr"], p["groups"]
        span = 32 * er
        own = smem_index(t[:, None] * er + np.arange(er)[None, :])  # [tpr, er]
        m = np.arange(groups)[None, :] * tpr + t[:, None]  # [tpr, groups]
        gather = smem_index(np.arange(wpr)[None, None, :] * span + m[:, :, None])  # [tpr, groups, wpr]
        for r in range(p["rounds"]):
            smem = np.full(p["smem_bytes"] // 4, np.nan)
            smem[own] = v[:, r * er:(r + 1) * er]
            vals = smem[gather]
            assert not np.isnan(vals).any(), "gathered a slot nobody wrote"
            smem[gather] = fwht(torch.from_numpy(vals)).numpy()
            v[:, r * er:(r + 1) * er] = smem[own]
    return v.reshape(-1)


@pytest.mark.parametrize("log_n,elem_bytes", CASES)
def test_kernel_dataflow_computes_sylvester(log_n, elem_bytes):
    p = plan(log_n, elem_bytes)
    x = np.random.default_rng(log_n).standard_normal(p["n"])
    got = emulate_kernel(x, p)
    want = fwht(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9 * p["n"])


def _conflict_free(addr_words, threads_per_phase, access_words):
    """Bank model: per phase, the 4*access_words-byte accesses must cover distinct bank groups."""
    groups_per_row = 32 // access_words
    a = np.asarray(addr_words).reshape(-1, threads_per_phase)
    slots = (a // access_words) % groups_per_row
    return all(len(set(row)) == threads_per_phase for row in slots)


@pytest.mark.parametrize("log_n,elem_bytes", [c for c in CASES if plan(*c)["wpr"] > 1])
def test_shared_memory_layout_is_conflict_free(log_n, elem_bytes):
    p = plan(log_n, elem_bytes)
    tpr, er, wpr = p["tpr"], p["ept_round"], p["wpr"]
    t = np.arange(tpr)
    store = min(4, er)  # floats per vector store (float4 or float2), as in the kernel
    per_phase = {4: 8, 2: 16}[store]  # 128-bit accesses: 8 threads a phase; 64-bit: 16
    for c in range(0, er, store):
        addr = smem_index(t * er + c)
        assert np.all(addr % store == 0), "vector store not aligned"
        assert _conflict_free(addr, per_phase, store), f"own-slice store c={c} has bank conflicts"
    for g in range(p["groups"]):
        for w in range(wpr):
            addr = smem_index(w * 32 * er + g * tpr + t)
            assert _conflict_free(addr, 32, 1), f"gather g={g} w={w} has bank conflicts"
