"""Tensors past 2^31 elements through every CPU op that accepts them (issue 17, item 3).

Each test builds one tensor of a little more than 2^31 elements (2-9 GB), runs the op, and checks the parts of
the result that lie past element 2^31 against the same op on a small slice and/or an independent reference.
Data are position-dependent (seeded random, regenerated chunk by chunk where the input is needed again), so a
wrapped 32-bit offset writes or reads the wrong place and fails the comparison.

All are marked ``slow``: skipped unless run with ``-m slow`` or ``TERSOR_RUN_SLOW=1`` (tests/conftest.py), and
each skips itself when /proc/meminfo reports less available memory than it needs. Run them one at a time.
The host-side checks of the kernels' index functions at such sizes are fast: tests/test_index64.py.
"""

import gc

import pytest
import torch

import tersor.ops
from reference import fwht

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

lib = tersor.ops.lib
TWO31 = 1 << 31
GB = 1 << 30


def need_memory(gb):
    """Skips unless the machine has `gb` GiB available now (tensors here are never swapped: there is no swap)."""
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) for line in f}
    avail = info["MemAvailable"] * 1024 / GB
    if avail < gb:
        pytest.skip(f"needs about {gb} GiB of available memory, {avail:.1f} GiB available")


def fill_rows(t, seed, make):
    """Fills t (>= 2-d, contiguous) along dim 0 in chunks of about 2^26 elements: chunk = make(shape, gen)."""
    g = torch.Generator().manual_seed(seed)
    per = max(1, (1 << 26) // max(1, t[0].numel()))
    for r0 in range(0, t.shape[0], per):
        r1 = min(t.shape[0], r0 + per)
        t[r0:r1] = make((r1 - r0, *t.shape[1:]), g)
    return t


def equal_chunked(a, b, rows=1 << 12):
    """torch.equal of two big tensors in row chunks (no full-size temporary); bit patterns for floats."""
    assert a.shape == b.shape and a.dtype == b.dtype
    av = a.view(torch.uint8) if a.is_floating_point() else a
    bv = b.view(torch.uint8) if b.is_floating_point() else b
    return all(torch.equal(av[i:i + rows], bv[i:i + rows]) for i in range(0, a.shape[0], rows))


# ---------------------------------------------------------------- codec

@pytest.mark.parametrize("shape", [(65537, 32768), (TWO31 + 4096,)], ids=["2d-whole-rows", "1d-split-row"])
def test_codec_fp8_encode_decode_past_2_31(shape):
    """A float8_e4m3fn tensor of 2^31 + 32768 (2-d: chunks of whole rows) or 2^31 + 4096 (1-d: one row of more
    than 2^31 elements cut into chunks) elements: Huffman-coded, decoded with verification, bit-exact."""
    need_memory(8)
    x = torch.empty(shape, dtype=torch.float8_e4m3fn)
    xv = x.view(-1, 1 << 12) if x.dim() == 1 else x
    # Weight-like values: exponents cluster, so the stream is Huffman-coded (mode 1), not stored.
    fill_rows(xv, 1, lambda s, g: (torch.randn(s, generator=g) * 0.05).to(torch.float8_e4m3fn))
    assert x.numel() > TWO31
    stream = lib._codec_encode(x)
    header = lib._codec_header(stream)
    assert header[2] == 1 and header[3] == x.numel()  # mode Huffman, numel
    table = lib._codec_decode_table(stream)
    y = lib.codec_decode(stream, table, header, x.dtype, list(shape), True)
    del stream
    gc.collect()
    yv = y.view(-1, 1 << 12) if y.dim() == 1 else y
    assert equal_chunked(xv, yv)


# ---------------------------------------------------------------- hadamard

def test_hadamard_rows_past_2_31():
    """2^19 + 1 rows of n = 4096 (2^31 + 4096 bfloat16 elements): every row transformed where it belongs."""
    need_memory(10)
    n = 4096
    x = fill_rows(torch.empty((1 << 19) + 1, n, dtype=torch.bfloat16), 2,
                  lambda s, g: torch.randn(s, generator=g).to(torch.bfloat16))
    assert x.numel() > TWO31
    y = lib.hadamard_transform(x, None, False)
    rows = torch.tensor([0, 1 << 18, (1 << 19) - 1, 1 << 19])  # the last two lie past element 2^31
    # The same op on the rows alone (rows are independent: bit-identical) and a float64 reference.
    assert torch.equal(y[rows], lib.hadamard_transform(x[rows].clone(), None, False))
    ref = fwht(x[rows]) / n ** 0.5
    torch.testing.assert_close(y[rows].double(), ref, rtol=1e-2, atol=1e-2)
    # Every row of the tail past 2^31 elements is the transform of its own input (not a neighbour's).
    tail = slice((1 << 19) - 7, None)
    assert torch.equal(y[tail], lib.hadamard_transform(x[tail].clone(), None, False))


# ---------------------------------------------------------------- block-sparse

def bsr_from_blocks(bs, present, make_values):
    """A BSR weight with the blocks `present[r]` (sorted column lists) of each block row."""
    from tersor.sparse.bsr import bsr_schedule

    per_row = torch.tensor([len(p) for p in present], dtype=torch.int64)
    crow = torch.cat([torch.zeros(1, dtype=torch.int64), per_row.cumsum(0)])
    col = torch.tensor([c for p in present for c in p], dtype=torch.int32)
    values = make_values(int(crow[-1]))
    return crow.to(torch.int32), col, values, bsr_schedule(crow, bs)


def bsr_reference_rows(x, crow, col, values, bs, block_rows):
    """float64 y[:, r*bs:(r+1)*bs] for the given block rows (x [T, K])."""
    out = []
    for r in block_rows:
        acc = torch.zeros(x.shape[0], bs, dtype=torch.float64)
        for j in range(int(crow[r]), int(crow[r + 1])):
            c = int(col[j])
            acc += x[:, c * bs:(c + 1) * bs].double() @ values[j].double().T
        out.append(acc)
    return torch.cat(out, dim=1)


def test_bsr_linear_x_past_2_31():
    """x float32 [2^21 + 1, 1024] (2^31 + 1024 elements) through a 16 x 1024 weight in 16 x 16 blocks."""
    need_memory(11)
    bs, K = 16, 1024
    g = torch.Generator().manual_seed(3)
    present = [sorted(torch.randperm(K // bs, generator=g)[:40].tolist())]
    crow, col, values, sched = bsr_from_blocks(bs, present, lambda nnz: torch.randn(nnz, bs, bs, generator=g))
    x = fill_rows(torch.empty((1 << 21) + 1, K), 4, lambda s, gen: torch.randn(s, generator=gen))
    assert x.numel() > TWO31
    y = lib.bsr_linear(x, crow, col, values, sched, K, None)
    tokens = torch.tensor([0, 1 << 20, (1 << 21) - 1, 1 << 21])
    ref = bsr_reference_rows(x[tokens], crow, col, values, bs, [0])
    torch.testing.assert_close(y[tokens].double(), ref, rtol=1e-4, atol=1e-3)
    tail = slice(-33, None)  # one token tile and a bit, past element 2^31 of x
    assert torch.equal(y[tail], lib.bsr_linear(x[tail].clone(), crow, col, values, sched, K, None))


def test_bsr_linear_values_past_2_31():
    """values bfloat16 [524799, 64, 64] (2^31 + 2^21 elements; refused before issue 17 as "too large for int32
    indexing"): 1023 block rows of 513 blocks (a dense [65472, 32832] weight), two tokens. The last block row
    starts 2 blocks before element 2^31 of values."""
    need_memory(7)
    bs, kb, mb = 64, 513, 1023
    nnzb = kb * mb
    present = [list(range(kb)) for _ in range(mb)]
    values = torch.empty(nnzb, bs, bs, dtype=torch.bfloat16)
    crow, col, values, sched = bsr_from_blocks(bs, present, lambda nnz: values)
    fill_rows(values, 5, lambda s, g: torch.randn(s, generator=g).to(torch.bfloat16))
    assert values.numel() > TWO31 and int(crow[-1]) == nnzb
    assert int(crow[mb - 1]) * bs * bs < TWO31 < int(crow[mb]) * bs * bs
    x = torch.randn(2, kb * bs, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    y = lib.bsr_linear(x, crow, col, values, sched, kb * bs, None)
    rows = [0, 511, mb - 2, mb - 1]  # the last one reads blocks past element 2^31 of values
    ref = bsr_reference_rows(x, crow, col, values, bs, rows)
    got = torch.cat([y[:, r * bs:(r + 1) * bs] for r in rows], dim=1)
    torch.testing.assert_close(got.double(), ref, rtol=2e-2, atol=5e-1)


# ---------------------------------------------------------------- codebooks

def test_aqlm_decode_past_2_31():
    """AQLM 1x16 codes of a [65536, 32776] weight: decoded to 2^31 + 2^19 float32 elements."""
    need_memory(11)
    out_f, groups = 65536, 4097
    g = torch.Generator().manual_seed(7)
    codes = fill_rows(torch.empty(out_f, groups, 1, dtype=torch.int16), 8,
                      lambda s, gen: torch.randint(-32768, 32768, s, generator=gen, dtype=torch.int16))
    codebooks = torch.randn(1, 1 << 16, 1, 8, generator=g)
    scales = torch.rand(out_f, 1, 1, 1, generator=g) + 0.5
    w = lib.aqlm_decode(codes, codebooks, scales, torch.float32)
    assert w.shape == (out_f, groups * 8) and w.numel() > TWO31
    # The last rows (past element 2^31) against the same op on their codes alone and an exact reference
    # (one codebook: entry * scale, one fp32 rounding either way).
    tail = slice(-16, None)
    assert torch.equal(w[tail], lib.aqlm_decode(codes[tail].clone(), codebooks, scales[tail].clone(), torch.float32))
    idx = codes[tail, :, 0].long() & 0xFFFF
    ref = (codebooks[0, idx, 0, :] * scales[tail, 0, 0, :, None]).reshape(16, -1)
    assert torch.equal(w[tail], ref)
    assert torch.equal(w[:16], lib.aqlm_decode(codes[:16].clone(), codebooks, scales[:16].clone(), torch.float32))


def test_e8p_decode_past_2_31():
    """2-bit E8P Qidxs of a [65536, 32832] weight: decoded to 2^31 + 2^22 float32 elements."""
    need_memory(11)
    m, n = 65536, 32832
    q = fill_rows(torch.empty(m, n // 32, dtype=torch.int64), 9,
                  lambda s, gen: torch.randint(-(1 << 63), (1 << 63) - 1, s, generator=gen, dtype=torch.int64))
    w = lib.e8p_decode(q, n, None, torch.float32)
    assert w.shape == (m, n) and w.numel() > TWO31
    for rows in (slice(0, 16), slice(m // 2, m // 2 + 16), slice(m - 32, m)):
        assert torch.equal(w[rows], lib.e8p_decode(q[rows].clone(), n, None, torch.float32))


# ---------------------------------------------------------------- 2:4

def test_sparse24_compress_decompress_past_2_31():
    """A 2:4 bfloat16 weight [32768, 65600] (2^31 + 2^21 elements): compressed and decompressed bit-exactly."""
    need_memory(12)
    from tersor.sparse import prune_2_4

    M, K = 32768, 65600

    def gen(s, g):
        return prune_2_4(torch.randn(s, generator=g).to(torch.bfloat16))

    w = fill_rows(torch.empty(M, K, dtype=torch.bfloat16), 10, gen)
    assert w.numel() > TWO31
    values, meta = lib.sparse24_compress(w)
    # The last row block (past element 2^31) as compressed on its own.
    v16, m16 = lib.sparse24_compress(w[-16:].clone())
    assert torch.equal(values[-1:], v16) and torch.equal(meta[-1:], m16)
    del w
    gc.collect()
    d = lib.sparse24_decompress(values, meta)
    del values, meta
    gc.collect()
    assert equal_chunked(d, fill_rows(torch.empty(M, K, dtype=torch.bfloat16), 10, gen))
