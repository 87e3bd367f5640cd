"""Issue 15, item 2: the CUDA decode kernels over the quantized paged KV cache (csrc/attention/decode_kernel.cuh).

On the CPU: the lane-by-lane replay of the plan, split-KV and merge kernels (_decode_emulate_cuda,
csrc/attention/decode_cuda_emulate.cpp) against the CPU twin (tersor::sage_decode_paged) with the same split, for
both P~ V variants (e4m3 MMA, fp16 MMA on the e4m3 images), head dims 64 / 128 / 256, GQA groups whose rows fill
one or several 16-row blocks, windows, empty and fully masked rows; deliberate fragment bugs must be caught; the
planner's functions. On a GPU (skipped without one): the kernels against the twin and the replay. CUDA path
compiled, not run (no GPU in the session that wrote it)."""

from __future__ import annotations

import math

import pytest
import torch

import tersor
from attention_reference import replay_mismatch
from conftest import load_testing_ops
from test_paged_decode import _filled, decode_ref, rel_l1
from tersor.attention import PagedKVCache, sage_decode

T = load_testing_ops()
pytestmark = pytest.mark.usefixtures("one_thread")


def twin(q, cache, bt, sl, scale, left=-1, right=-1, workers=0):
    return tersor.ops.lib.sage_decode_paged(q, cache.k_codes, cache.k_scale, cache.v_codes, cache.page_meta, bt,
                                              sl, scale, left, right, workers)


def replay(q, cache, bt, sl, scale, left=-1, right=-1, workers=0, sm_count=132, pv="fp8", fault=0):
    return T._decode_emulate_cuda(q, cache.k_codes, cache.k_scale, cache.v_codes, cache.page_meta, bt, sl, scale,
                                  left, right, workers, sm_count, pv, fault)


CASES = [  # b, seqlens, hkv, hq, lq, d, page_size, window, workers
    (2, [300, 77], 2, 8, 1, 128, 64, None, 0),       # decode, GQA 4: 4 of 16 rows
    (3, [200, 16, 1], 2, 4, 4, 64, 32, None, 5),     # split-KV, Lq 4: 8 rows
    (1, [700], 1, 8, 16, 64, 160, (100, 0), 3),      # 128 rows: 8 row blocks; 160-token pages (3 cells, short last)
    (2, [129, 64], 1, 1, 1, 256, 16, None, 7),       # MHA row, D 256, 16-token pages
    (2, [500, 0], 2, 6, 3, 128, 256, (40, 0), 9),    # an empty sequence; 18 rows: 2 row blocks, the second 2 rows
    (1, [90], 2, 2, 2, 64, 48, (-1, 0), 0),          # window with unbounded left
    (2, [1000, 333], 2, 8, 3, 256, 128, (300, 0), 11),  # D 256 GQA, 24 rows, split, window, 2 cells per page
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pv", ["fp8", "fp16"])
@pytest.mark.parametrize("case", CASES)
def test_replay_matches_cpu_twin(case, pv, dtype):
    b, seqlens, hkv, hq, lq, d, s, window, workers = case
    gen = torch.Generator().manual_seed(sum(seqlens) + d + lq)
    cache, bt, sl, k, v = _filled(b, seqlens, hkv, d, s, gen)
    q = torch.randn(b, lq, hq, d, generator=gen).to(dtype)
    left, right = window if window else (-1, -1)
    scale = 1 / math.sqrt(d)
    ref, ref_lse = twin(q, cache, bt, sl, scale, left, right, workers)
    out, lse = replay(q, cache, bt, sl, scale, left, right, workers, pv=pv)
    assert out.dtype == q.dtype and out.shape == q.shape and lse.shape == ref_lse.shape
    problem = replay_mismatch(out, lse, ref, ref_lse)
    assert problem is None, problem
    assert not out.isnan().any() and not lse.isnan().any()


def test_replay_empty_and_fully_masked_rows_give_zero_and_minus_inf():
    # seqlen 0 (every row), and Lq 4 over a 2-token sequence: queries 0 and 1 sit before the sequence's start.
    gen = torch.Generator().manual_seed(3)
    cache, bt, sl, k, v = _filled(3, [0, 2, 70], 2, 64, 16, gen)
    q = torch.randn(3, 4, 4, 64, generator=gen).to(torch.bfloat16)
    for workers in (0, 4):
        for pv in ("fp8", "fp16"):
            out, lse = replay(q, cache, bt, sl, 0.125, workers=workers, pv=pv)
            assert not out.isnan().any() and not lse.isnan().any()
            assert (out[0] == 0).all() and lse[0].eq(float("-inf")).all()
            assert (out[1, :2] == 0).all() and lse[1, :, :2].eq(float("-inf")).all()
            assert lse[1, :, 2:].isfinite().all() and lse[2].isfinite().all()


@pytest.mark.parametrize("pv", ["fp8", "fp16"])
def test_replay_split_counts_match_the_twin_and_one_pass(pv):
    # Every split count 1..N: the replay is the twin with the same split (same chunks, same merge order), and
    # within the split's own rounding of the one-pass result (test_paged_decode.py's bound).
    gen = torch.Generator().manual_seed(40)
    cache, bt, sl, k, v = _filled(3, [300, 64, 1], 2, 128, 32, gen)
    q = torch.randn(3, 2, 8, 128, generator=gen).to(torch.float16)
    scale = 1 / math.sqrt(128)
    one, one_lse = twin(q, cache, bt, sl, scale)
    ref, _ = decode_ref(q, k, v, sl, scale)
    for workers in list(range(1, 9)) + [64, 10**6]:
        out, lse = replay(q, cache, bt, sl, scale, workers=workers, pv=pv)
        tw, tw_lse = twin(q, cache, bt, sl, scale, workers=workers)
        problem = replay_mismatch(out, lse, tw, tw_lse)
        assert problem is None, (workers, problem)
        assert (out.float() - one.float()).abs().max() < 0.02, workers
        fin = torch.isfinite(one_lse)
        assert (lse[fin] - one_lse[fin]).abs().max() < 0.01, workers
        assert rel_l1(out, ref) < 0.05


def test_replay_automatic_plan_is_the_twin_at_the_planned_workers():
    # num_workers -1: the glue's planner for the device's SM count; the same as the twin given that count.
    gen = torch.Generator().manual_seed(5)
    cache, bt, sl, k, v = _filled(2, [1000, 400], 2, 64, 64, gen)
    q = torch.randn(2, 1, 8, 64, generator=gen).to(torch.float16)
    for sms in (1, 4, 132):
        workers = T._decode_plan("auto_workers", [sms, 2 * 2 * 1])[0]
        out, lse = replay(q, cache, bt, sl, 0.125, workers=-1, sm_count=sms)
        tw, tw_lse = twin(q, cache, bt, sl, 0.125, workers=workers)
        assert replay_mismatch(out, lse, tw, tw_lse) is None, sms
    assert T._decode_plan("auto_workers", [132, 4])[0] == 66 * 4


# fault: 1 swaps P~ V A-fragment registers 1 and 2, 2 swaps V's B-fragment registers, 3 reads one query head for
# every row of a GQA group.
@pytest.mark.parametrize("fault", [1, 2, 3])
@pytest.mark.parametrize("pv", ["fp8", "fp16"])
def test_replay_catches_wrong_fragment_mapping(fault, pv):
    gen = torch.Generator().manual_seed(7)
    cache, bt, sl, k, v = _filled(2, [300, 77], 2, 128, 64, gen)
    q = torch.randn(2, 2, 8, 128, generator=gen).to(torch.float16)
    ref, ref_lse = twin(q, cache, bt, sl, 0.1, workers=3)
    assert replay_mismatch(*replay(q, cache, bt, sl, 0.1, workers=3, pv=pv), ref, ref_lse) is None
    out, lse = replay(q, cache, bt, sl, 0.1, workers=3, pv=pv, fault=fault)
    assert replay_mismatch(out, lse, ref, ref_lse) is not None
    assert (out.float() - ref.float()).abs().max().item() > 0.1 * ref.float().abs().max().item()


def test_replay_bad_input():
    gen = torch.Generator().manual_seed(8)
    cache, bt, sl, k, v = _filled(1, [40], 1, 64, 16, gen)
    q = torch.randn(1, 1, 2, 64, generator=gen).to(torch.float16)
    with pytest.raises(ValueError, match="pv"):
        replay(q, cache, bt, sl, 0.1, pv="fp32")
    with pytest.raises(ValueError, match="seqlens"):
        replay(q, cache, bt, torch.tensor([10**4], dtype=torch.int32), 0.1)
    with pytest.raises(ValueError, match="block_table"):
        replay(q, cache, torch.full_like(bt, 999), sl, 0.1)


# ------------------------------------------------------------------------------------------- planner
def _count(n, s, tile=64):
    """Key tiles of a sequence of n tokens without window (paged_format.h decode_tiles; cells per page)."""
    if n <= 0:
        return 0
    cpp = -(-s // tile)
    return ((n - 1) // s) * cpp + ((n - 1) % s) // tile + 1


def test_planner_splits_equal_sequences_into_equal_chunks():
    P = T._decode_plan
    for sms in (1, 16, 108, 132):
        for pairs in (1, 2, 8, 32, 64, 256, 1024):
            w = P("auto_workers", [sms, pairs])[0]
            s = sms * 2 // pairs
            assert w == (s * pairs if s >= 2 else 0), (sms, pairs)
            for n in (64, 1000, 4096, 131072):
                count = _count(n, 64)
                quota = P("quota", [count * pairs, w])[0]
                chunks = P("chunks", [count, quota])[0]
                assert chunks <= P("max_splits", [w, -(-n // 64), 64])[0]
                if not w:  # no split: one chunk per (b, h)
                    assert chunks == 1
                    continue
                # s chunks of ceil(count / s) tiles (fewer when that rounds up): never past the device's 2 * SM
                # slots, and exactly s when s divides the tiles
                assert chunks <= s and chunks * pairs <= 2 * sms, (sms, pairs, n, chunks)
                if count % s == 0:
                    assert chunks == s


def test_planner_grid_bounds_every_sequences_chunks():
    # Mixed lengths: the grid's splits (max_splits, computed on the host without the lengths) cover every
    # sequence's chunk count (quota computed on the device from the lengths).
    P = T._decode_plan
    gen = torch.Generator().manual_seed(0)
    for trial in range(200):
        b = int(torch.randint(1, 9, (1,), generator=gen))
        h = int(torch.randint(1, 9, (1,), generator=gen))
        s = [16, 64, 160, 256][trial % 4]
        max_pages = int(torch.randint(1, 40, (1,), generator=gen))
        lens = torch.randint(0, max_pages * s + 1, (b,), generator=gen).tolist()
        workers = [0, 1, 3, 50, 264, 10**6][trial % 6]
        total = sum(_count(n, s) for n in lens) * h
        quota = P("quota", [total, workers])[0]
        grid = P("max_splits", [workers, max_pages, s])[0]
        for n in lens:
            assert P("chunks", [_count(n, s), quota])[0] <= grid, (lens, s, workers)


def test_split_kernel_fits_every_targets_shared_memory():
    # sm_89's opt-in limit is 99 KB per block (the smallest of sm_80 / sm_89 / sm_90a).
    for d in (64, 128, 256):
        for fp8 in (0, 1):
            assert T._decode_plan("smem", [d, fp8])[0] <= 99 * 1024


# ------------------------------------------------------------------------------------------- on a GPU
def _cuda_cache(cache):
    c = PagedKVCache(cache.num_pages, cache.page_size, cache.num_kv_heads, cache.head_dim, dtype=cache.dtype,
                     device="cuda")
    for name in ("k_codes", "k_scale", "v_codes", "page_meta"):
        getattr(c, name).copy_(getattr(cache, name))
    return c


@pytest.mark.cuda
@pytest.mark.parametrize("case", CASES)
def test_cuda_decode_matches_the_twin_and_the_replay(case):
    b, seqlens, hkv, hq, lq, d, s, window, workers = case
    gen = torch.Generator().manual_seed(sum(seqlens) + d + lq)
    cache, bt, sl, k, v = _filled(b, seqlens, hkv, d, s, gen)
    q = torch.randn(b, lq, hq, d, generator=gen).to(torch.float16)
    cc = torch.cuda.get_device_capability()
    pv = "fp8" if cc == (8, 9) else "fp16"
    gc = _cuda_cache(cache)
    out, lse = sage_decode(q.cuda(), gc, bt.cuda(), sl.cuda(), window=window, return_lse=True, num_workers=workers)
    left, right = window if window else (-1, -1)
    left, right = (left if left >= 0 else -1), (right if right >= 0 else -1)
    ref, ref_lse = twin(q, cache, bt, sl, 1 / math.sqrt(d), left, right, workers)
    rep, rep_lse = replay(q, cache, bt, sl, 1 / math.sqrt(d), left, right, workers, pv=pv)
    out, lse = out.cpu(), lse.cpu()
    assert not out.isnan().any() and not lse.isnan().any()
    # ex2.approx and the tensor cores' accumulation order are the only differences from the replay
    assert replay_mismatch(out, lse, rep, rep_lse, mean_bound=1e-4, min_same=0.9) is None
    assert replay_mismatch(out, lse, ref, ref_lse, mean_bound=1e-4, min_same=0.9) is None


@pytest.mark.cuda
def test_cuda_decode_automatic_split_and_errors():
    gen = torch.Generator().manual_seed(9)
    cache, bt, sl, k, v = _filled(2, [3000, 0], 2, 128, 64, gen)
    q = torch.randn(2, 1, 8, 128, generator=gen).to(torch.bfloat16)
    gc = _cuda_cache(cache)
    out, lse = sage_decode(q.cuda(), gc, bt.cuda(), sl.cuda(), return_lse=True)  # the planner's split
    ref, _ = decode_ref(q, k, v, sl, 1 / math.sqrt(128))
    assert rel_l1(out.cpu(), ref) < 0.05
    assert (out[1] == 0).all() and lse[1].eq(float("-inf")).all()
    with pytest.raises(ValueError, match="seqlens"):
        sage_decode(q.cuda(), gc, bt.cuda(), torch.tensor([10**6, 0], dtype=torch.int32, device="cuda"))
    with pytest.raises(ValueError, match="block_table"):
        sage_decode(q.cuda(), gc, torch.full_like(bt, 10**5).cuda(), sl.cuda())


# ------------------------------------------------------------------------------------------- append
def _append_errors(cache, k, v, bt, st, ln):
    """(twin's message, the CUDA path's Python checks' message), each after the op / wrapper name; None if none."""
    msgs = []
    for fn in (lambda: cache.append(k, v, bt, st, ln),
               lambda: cache._check_append_indices(bt, st, ln, k.shape[1], "PagedKVCache.append")):
        try:
            fn()
            msgs.append(None)
        except ValueError as e:
            msgs.append(str(e).split(": ", 1)[1])
    return msgs


def test_cuda_append_index_checks_are_the_twins():
    # On CUDA the append's index checks run in PagedKVCache._check_append_indices (tensor ops, one sync): the same
    # refusals and messages as the twin's C++ checks, for the twin's own bad cases and for random tables.
    gen = torch.Generator().manual_seed(2)
    k, v = _filled.__globals__["llm_like_kv"](2, 20, 2, 64, gen)
    cache = PagedKVCache(4, 16, 2, 64)
    start, lengths = torch.zeros(2, dtype=torch.int32), torch.tensor([20, 20], dtype=torch.int32)
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    cases = [
        (i32([[0, 1], [2, 4]]), start, lengths), (i32([[0, 1], [2, -1]]), start, lengths),
        (i32([[0, 1], [1, 2]]), start, lengths), (i32([[0], [2]]), start, lengths),
        (i32([[0, 1], [2, 3]]), start, i32([21, 0])), (i32([[0, 1], [2, 3]]), i32([-1, 0]), lengths),
        (i32([[0, 3], [0, 1]]), i32([0, 16]), i32([16, 1])),  # continues from a page the other sequence opens
        (i32([[0, 1], [2, 3]]), i32([0, 1000]), i32([20, 0])),  # an empty chunk may start anywhere
        (torch.zeros(2, 0, dtype=torch.int32), i32([0, 5]), i32([0, 0])),  # no pages, nothing written
        (torch.zeros(2, 0, dtype=torch.int32), i32([0, 5]), i32([0, 1])),  # no pages, a token to write
        (i32([[0, 3], [2, 1]]), i32([0, 16]), i32([16, 1])),  # fine
    ]
    for bt, st, ln in cases:
        twin_msg, cuda_msg = _append_errors(cache, k, v, bt, st, ln)
        assert twin_msg == cuda_msg, (bt, st, ln)
    assert _append_errors(cache, k, v, *cases[-1]) == [None, None]
    kinds = ["outside", "negative", "past its", "not a page", "written by", "continues from", None]
    seen = set()
    for trial in range(300):
        cache = PagedKVCache(6, 16, 2, 64)
        cache.append(k, v, i32([[0, 1], [2, 3]]), start, lengths)  # pages 0..3 hold 20 tokens each
        bt = torch.randint(-1, 7, (2, 3), generator=gen).to(torch.int32)
        st = torch.randint(-1, 30, (2,), generator=gen).to(torch.int32)
        ln = torch.randint(0, 22, (2,), generator=gen).to(torch.int32)
        twin_msg, cuda_msg = _append_errors(cache, k, v, bt, st, ln)
        assert twin_msg == cuda_msg, (bt, st, ln)
        seen.add(next(x for x in kinds if x is None or (twin_msg is not None and x in twin_msg)))
    assert seen >= set(kinds) - {"past its"}, seen  # every refusal (but the rare one) was exercised


@pytest.mark.cuda
def test_cuda_append_is_bit_identical_to_the_twin():
    gen = torch.Generator().manual_seed(11)
    for d, s in ((64, 16), (128, 64), (256, 160)):
        cpu = PagedKVCache(12, s, 2, d)
        gpu = PagedKVCache(12, s, 2, d, device="cuda")
        bt = torch.randperm(12, generator=gen)[:8].view(2, 4).to(torch.int32)
        prompt = torch.tensor([s + 5, 3], dtype=torch.int32)
        k, v = _filled.__globals__["llm_like_kv"](2, s + 5, 2, d, gen)
        for dtype in (torch.float32, torch.bfloat16):
            kk, vv = k.to(dtype), v.to(dtype)
            cpu.append(kk, vv, bt, torch.zeros(2, dtype=torch.int32), prompt)
            gpu.append(kk.cuda(), vv.cuda(), bt.cuda(), torch.zeros(2, dtype=torch.int32, device="cuda"),
                       prompt.cuda())
            seqlens = prompt.clone()
            for step in range(s + 2):  # one token at a time, across page boundaries
                k1, v1 = _filled.__globals__["llm_like_kv"](2, 1, 2, d, gen, bias=4.0)
                cpu.append(k1, v1, bt, seqlens, torch.ones(2, dtype=torch.int32))
                gpu.append(k1.cuda(), v1.cuda(), bt.cuda(), seqlens.cuda(), torch.ones(2, dtype=torch.int32,
                                                                                        device="cuda"))
                seqlens += 1
            for name in ("k_codes", "k_scale", "v_codes", "page_meta"):
                assert torch.equal(getattr(cpu, name), getattr(gpu, name).cpu()), (d, s, dtype, name)


@pytest.mark.parametrize("d, s", [(64, 16), (128, 48), (256, 256)])
def test_append_replay_in_any_token_order_is_bit_identical_to_the_twin(d, s):
    # The CUDA append kernels replayed with their warps in reverse order (_paged_append_emulate_cuda): a prompt,
    # then chunks that start mid-page and open several pages (the twin copies statistics page by page along the
    # chain; the kernel takes them from the page of token start - 1), then single tokens. Bit-identical.
    gen = torch.Generator().manual_seed(d + s)
    llm_like_kv = _filled.__globals__["llm_like_kv"]
    twin_cache, emu = PagedKVCache(40, s, 2, d), PagedKVCache(40, s, 2, d)
    bt = torch.randperm(40, generator=gen)[:36].view(3, 12).to(torch.int32)
    seqlens = torch.zeros(3, dtype=torch.int32)
    chunks = [torch.tensor(x, dtype=torch.int32) for x in
              ([s + 7, 5, 0], [2 * s + 3, 1, 0], [0, 3 * s, 2], [1, 1, 1], [s, 0, 3 * s + 1], [1, 2, 3])]
    for ln in chunks:
        k, v = llm_like_kv(3, int(ln.max()), 2, d, gen, bias=2.0 + float(seqlens.sum()) / 100)
        twin_cache.append(k, v, bt, seqlens, ln)
        T._paged_append_emulate_cuda(emu.k_codes, emu.k_scale, emu.v_codes, emu.page_meta, k, v, bt, seqlens, ln)
        seqlens += ln
        for name in ("k_codes", "k_scale", "v_codes", "page_meta"):
            assert torch.equal(getattr(twin_cache, name), getattr(emu, name)), (name, seqlens.tolist())
    assert twin_cache.k_codes.any() and (twin_cache.page_meta[:, :, 1] > 0).any()


def test_cuda_decode_index_checks_are_the_twins():
    # On CUDA, sage_decode checks seqlens and the block table in Python (paged._check_decode_indices, one sync):
    # the same refusals, messages and order as the twin's C++ checks, on random tables.
    from tersor.attention.paged import _check_decode_indices

    gen = torch.Generator().manual_seed(12)
    cache, bt, sl, k, v = _filled(2, [40, 20], 1, 64, 16, gen)
    q = torch.randn(2, 1, 2, 64, generator=gen).to(torch.float16)
    seen = set()
    for trial in range(300):
        bt = torch.randint(-1, cache.num_pages + 1, (2, 3), generator=gen).to(torch.int32)
        sl = torch.randint(-2, 52, (2,), generator=gen).to(torch.int32)
        msgs = []
        for fn in (lambda: twin(q, cache, bt, sl, 0.125), lambda: _check_decode_indices(bt, sl, cache, "sage_decode")):
            try:
                fn()
                msgs.append(None)
            except ValueError as e:
                msgs.append(str(e).split(": ", 1)[1])
        assert msgs[0] == msgs[1], (bt, sl, msgs)
        seen.add(None if msgs[0] is None else msgs[0].split(" ")[0].split("[")[0])
    assert seen == {None, "seqlens", "block_table"}, seen
