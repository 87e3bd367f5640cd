"""64-bit index math of every kernel family, checked on the host at sizes past 2^31 (issue 17, item 3).

The CUDA kernels (and the CPU code that shares their headers) take every product that can pass 2^31 through
small int64 ``TERSOR_HD`` functions in the families' format/traits headers. The test-only ops
``tersor_testing::_<family>_index(fn, args)`` evaluate those very functions on the host, so these tests check
them at sizes no test could allocate, against Python's exact integers. Each case is chosen so that its result
lies past 2^31 (most past 2^32): a 32-bit product anywhere in it would give a different number.
Slow tests with real tensors past 2^31 elements: tests/test_big_tensors.py.
"""

import pytest
import torch

from conftest import load_testing_ops

T = load_testing_ops()  # torch.ops.tersor_testing, tersor's error types

TWO31 = 1 << 31
GRID_X = (1 << 31) - 1


def big(v):
    """Asserts the case is meaningful (past 2^31) and returns it."""
    assert v > TWO31
    return v


# ---------------------------------------------------------------- hadamard (hadamard_plan.h)

def test_hadamard_pow2_offsets_past_2_31():
    # n = 32768 (one row per block), rows past 2^20: row * n passes 2^35.
    lg, eb = 15, 2
    n = 1 << lg
    plan = dict(zip(["ept", "tpr", "rows_per_block"], [T._hadamard_plan(lg, eb)[i] for i in (3, 5, 8)]))
    block, tid = (1 << 22) + 3, 777
    row = T._hadamard_index("pow2_row", [lg, eb, block, tid])[0]
    assert row == block * plan["rows_per_block"] + tid // plan["tpr"]
    t = tid % plan["tpr"]
    off = T._hadamard_index("pow2_elem_offset", [lg, eb, row, t])[0]
    assert off == big(row * n + t * plan["ept"])
    assert T._hadamard_index("pow2_blocks", [lg, eb, 3 << 32])[0] == big(3 << 32)
    # n = 1: 256 rows per block.
    assert T._hadamard_index("pow2_row", [0, 4, 1 << 30, 255])[0] == big((1 << 30) * 256 + 255)


def test_hadamard_kmix_offsets_past_2_31():
    row, k, lg, a, col = (1 << 20) + 5, 172, 15, 171, 32767
    assert T._hadamard_index("kmix_offset", [row, k, lg, a, col])[0] == big((row * k + a) * (1 << lg) + col)
    assert T._hadamard_index("kmix_blocks", [1 << 30, 15])[0] == big((1 << 30) * 1024)


@pytest.mark.parametrize("k,lg,eb", [(1, 0, 2), (1, 15, 4), (12, 0, 2), (172, 15, 2), (156, 8, 4), (28, 3, 2)])
def test_hadamard_cuda_max_rows_is_the_grid_limit(k, lg, eb):
    """cuda_max_rows (what the CUDA glue refuses beyond, with a ValueError) is exactly the most rows whose
    launches fit gridDim.x: one more row overflows one of the two kernels' grids."""
    m = T._hadamard_index("cuda_max_rows", [k, lg, eb])[0]
    assert m > 0

    def fits(rows):
        ok = T._hadamard_index("pow2_blocks", [lg, eb, rows * k])[0] <= GRID_X
        return ok and (k == 1 or T._hadamard_index("kmix_blocks", [rows, lg])[0] <= GRID_X)

    assert fits(m) and not fits(m + 1)


# ---------------------------------------------------------------- codec (codec_format.h)

def test_codec_geometry_past_2_32():
    numel, row_len, ce = (1 << 40) + 4096, 4096, 8192  # whole-row chunks
    n = T._codec_index("num_chunks", [numel, row_len, ce])[0]
    assert n == (numel + ce - 1) // ce
    start, length = T._codec_index("chunk", [numel, row_len, ce, n - 1])
    assert (start, length) == (big((n - 1) * ce), numel - (n - 1) * ce)
    # Chunks of pieces of rows: row_len past 2^32.
    row_len, ce = (1 << 33) + 100, 1 << 18
    numel = 3 * row_len
    per_row = (row_len + ce - 1) // ce
    assert T._codec_index("num_chunks", [numel, row_len, ce])[0] == 3 * per_row
    c = 2 * per_row + per_row - 1  # the last (short) piece of row 2
    start, length = T._codec_index("chunk", [numel, row_len, ce, c])
    assert start == big(2 * row_len + (per_row - 1) * ce)
    assert length == row_len - (per_row - 1) * ce


def test_codec_kernel_indices_past_2_32():
    start = (1 << 35) + 12
    assert T._codec_index("lane_elem_index", [start, 31, 32768, 32640])[0] == big(start + 31 * 32768 + 32640)
    n_chunks, c = (1 << 30) + 7, (1 << 30) + 3
    assert T._codec_index("gemv_partial_index", [7, n_chunks, c])[0] == big(7 * n_chunks + c)
    assert T._codec_index("gemv_out_index", [5, 1 << 31, 17])[0] == big(5 * (1 << 31) + 17)


# ---------------------------------------------------------------- BSR (bsr_format.h, bsr_cuda_traits.h)

def test_bsr_offsets_past_2_31():
    j, bs, r = (1 << 19) + 1, 64, 63  # values [2^19 + 2, 64, 64] holds more than 2^31 elements
    assert T._bsr_index("value_offset", [j, bs, r])[0] == big((j * bs + r) * bs)
    tok, k, kb = 4_000_000, 16384, 255
    assert T._bsr_index("x_offset", [tok, k, kb, 64])[0] == big(tok * k + kb * 64)
    n, row, m = 32768, 511, 63
    assert T._bsr_index("y_offset", [tok, n, row, 64, m])[0] == big(tok * n + row * 64 + m)
    assert T._bsr_index("partial_index", [600000, 63, 63, 64, 64])[0] == big((600000 * 64 + 63) * 64 + 63)
    assert T._bsr_index("cuda_max_tokens", [])[0] == 65535 * 64


def test_bsr_values_past_2_31_elements_pass_the_checks():
    """A weight whose values hold more than 2^31 elements (2^19 + 1 blocks of 64 x 64) is valid: the check
    used to refuse it ("too large for int32 indexing") although every offset into values is int64. values is
    an expanded view (no memory): _bsr_check does not read it."""
    from tersor.sparse.bsr import bsr_schedule

    bs, kb = 64, 513
    nnzb = (1 << 19) + 1
    mb = (nnzb + kb - 1) // kb
    per_row = torch.full((mb,), kb, dtype=torch.int64)
    per_row[-1] = nnzb - kb * (mb - 1)
    crow = torch.cat([torch.zeros(1, dtype=torch.int64), per_row.cumsum(0)])
    col = torch.cat([torch.arange(int(n), dtype=torch.int32) for n in per_row])
    values = torch.zeros(1, bs, bs, dtype=torch.bfloat16).expand(nnzb, bs, bs)
    assert values.numel() > TWO31
    sched = bsr_schedule(crow, bs)
    out = tersor_lib()._bsr_check(crow.to(torch.int32), col, values, sched, kb * bs)
    assert out[:3] == [1, bs, mb]


def test_bsr_limits_name_their_numbers():
    lib = tersor_lib()
    crow = torch.tensor([0, 0], dtype=torch.int32)
    col = torch.zeros(0, dtype=torch.int32)
    values = torch.zeros(0, 16, 16)
    from tersor.sparse.bsr import bsr_schedule
    with pytest.raises(ValueError, match="in_features .* below 2\\^31"):
        lib._bsr_check(crow, col, values, bsr_schedule(crow, 16), 1 << 31)


def tersor_lib():
    import tersor.ops
    return tersor.ops.lib


# ---------------------------------------------------------------- 2:4 (sparse24_format.h, sparse24_cuda_traits.h)

def test_sparse24_offsets_past_2_31():
    K, row, kc = 65536, 70000, 32767  # packed values [M/16, K/32, 256]: row * K / 2 past 2^31
    # value_offset = tile * 256 + lane * 8 + slot with tile = (row / 16) * (K / 32) + kc / 16
    off = T._sparse24_index("value_offset", [K, row, kc])[0]
    tile = (row >> 4) * (K // 32) + (kc >> 4)
    assert tile * 256 <= off < tile * 256 + 256 and off > TWO31
    assert T._sparse24_index("tile_offset", [K, row >> 4, 2047])[0] == big(((row >> 4) * (K // 32) + 2047) * 256)
    word, shift = T._sparse24_index("meta_pos", [K, (1 << 20) + 3, 16383])
    w0 = (((1 << 20) + 3 >> 4) * (K // 64) + (16383 >> 4)) * 32
    assert w0 <= word < w0 + 32 and word > TWO31 and 0 <= shift < 32


def test_sparse24_launch_limits():
    assert T._sparse24_index("gemm_max_rows", [])[0] == 65535 * 128
    for M in (16, 4096, 1 << 20, (1 << 31) - 16):
        grid_m = (M // 16 + 7) // 8
        rows = T._sparse24_index("sm90_max_rows", [M])[0]
        assert grid_m * ((rows + 255) // 256) <= GRID_X < grid_m * ((rows + 256 + 255) // 256)
    # The element-wise kernels' grids stay exact (no unsigned truncation) past 2^32 blocks.
    assert T._sparse24_index("elementwise_blocks", [(1 << 45) + 1, 256])[0] == big((1 << 37) + 1)


# ---------------------------------------------------------------- codebooks (aqlm_format.h, e8p_format.h)

def test_aqlm_offsets_past_2_31():
    o, j, groups, C = 65535, 4096, 4097, 2  # a [65536, 32776] weight: 2^31 + 2^19 elements
    assert T._codebook_index("aqlm_weight_offset", [o, j, groups * 8])[0] == big(o * groups * 8 + 8 * j)
    o = (1 << 19) + 1  # codes [o, groups, C] pass 2^31 entries only in a 4x larger weight
    assert T._codebook_index("aqlm_code_offset", [o, j, groups, C])[0] == big((o * groups + j) * C)
    assert T._codebook_index("aqlm_entry_offset", [7, 1 << 16, 65535])[0] == (7 * 65536 + 65535) * 8


def test_e8p_offsets_past_2_31():
    n = 32832  # 513 column blocks
    I, J, lane, slot = 4095, 512, 31, 3  # the last word of a [65536, n] weight: 2^31 + 2^22 elements
    row, col = T._codebook_index("e8p_slot_pos", [I, J, lane, slot])
    assert (row, col) == (16 * I + 2 * 7 + 1, 64 * J + 16 * 3 + 8)
    assert T._codebook_index("e8p_elem_offset", [row, col, n])[0] == big(row * n + col)
    assert T._codebook_index("e8p_word_index", [1 << 17, J, lane, n])[0] == big((1 << 17) * (n // 2) + 32 * J + lane)
    # The cursor over RVQ stages (4 bits: row_words = n/16, stage 1 after stage 0's n/32 words of each row).
    I, t = (1 << 17) + 1, n // 2 - 1  # the last word of row block I
    off = T._codebook_index("e8p_word_offset", [I, t, n, n // 16, 1])[0]
    S = n // 32
    assert off == big((16 * I + t // S) * (n // 16) + S + t % S)
    assert T._codebook_index("e81b_byte_index", [1 << 20, 4103, n])[0] == big((1 << 20) * (3 * n // 64) * 8 + S * 8 + 4103)


# ---------------------------------------------------------------- attention (sage_cuda_layout.h, sage_sm90_layout.h)

def test_sage_offsets_past_2_31():
    bh, lq_pad, row, rb = 4095, 1 << 20, (1 << 20) - 1, 128
    assert T._sage_index("qk_row_offset", [bh, lq_pad, row, rb])[0] == big((bh * lq_pad + row) * rb)
    assert T._sage_index("v_t_offset", [bh, 128, lq_pad, 127, 5, 2])[0] == big(((bh * 128 + 127) * lq_pad + 5) * 2)
    assert T._sage_index("out_row_offset", [bh, 1_000_000, 999_999, 128])[0] == big((bh * 1_000_000 + 999_999) * 128)
    g = T._sage_index("q_scale_index", [65534, 1 << 24, (1 << 24) - 1, 7])[0]
    assert g == big(65534 * ((1 << 24) // 32 * 8) + ((1 << 24) - 1) // 32 * 8 + 7)
    k = T._sage_index("k_scale_index", [65534, 1 << 25, (1 << 25) // 64 - 1, 3])[0]
    assert k == big(65534 * ((1 << 25) // 64 * 4) + ((1 << 25) // 64 - 1) * 4 + 3)
    qb = T._sage_index("q_bias_index", [65534, 1 << 16, 1 << 16, 65535, 65535])[0]
    assert qb == big((65534 * (1 << 11) + 2047) * (1 << 16) + 65535)
    assert T._sage_index("sm90_tile_base", [65534, 1 << 16, 511, 128])[0] == big((65534 * (1 << 16) + 511 * 128) * 128)
    # The 32-bit key counters: a padded length (to 128) of the longest accepted sequence still fits int32.
    max_len = T._sage_index("cuda_max_len", [])[0]
    assert (max_len + 127) // 128 * 128 + 64 < TWO31


def test_index_ops_reject_bad_calls():
    with pytest.raises(ValueError, match="unknown function"):
        T._bsr_index("nope", [])
    with pytest.raises(ValueError, match="takes 3 arguments"):
        T._codec_index("num_chunks", [1, 2])
