"""tersor.codec: lossless exponent-plane Huffman codec v1 (CPU encoder/decoder; CUDA decoder and GEMV)."""

import math
import random
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import codec_reference as ref
import tersor
from conftest import HAS_TESTING_EXT
from tersor import codec
from tersor.nn import CompressedLinear, compress_linears

ops = tersor.ops.lib  # torch.ops.tersor with tersor's error types (ValueError/TypeError/NotImplementedError)
# The CUDA kernels' CPU replays are test-only ops (tersor._C_testing, built with TERSOR_TESTING=ON).
T = tersor._testing.lib if HAS_TESTING_EXT else None
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2]
_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_INT[t.element_size()])


def assert_same_bits(a: torch.Tensor, b: torch.Tensor):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(bits(a), bits(b))


def weights(shape, dtype, std=0.02):
    return (torch.randn(shape) * std).to(dtype)


def all_bit_patterns(dtype) -> torch.Tensor:
    eb = torch.empty((), dtype=dtype).element_size()
    if eb == 1:
        v = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    elif eb == 2:
        v = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    else:  # every exponent/sign combination with a few mantissas, plus random patterns
        g = torch.Generator().manual_seed(1)
        hi = torch.arange(512, dtype=torch.int64) << 23
        mant = torch.tensor([0, 1, 2, 0x3FFFFF, 0x400000, 0x7FFFFF], dtype=torch.int64)
        v = (hi[:, None] | mant[None, :]).flatten()
        v = torch.cat([v, torch.randint(0, 2**32, (20000,), generator=g, dtype=torch.int64)])
        v = ((v + 2**31) % 2**32 - 2**31).to(torch.int32)
    return v[torch.randperm(v.numel())].view(dtype)


# ------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_bit_pattern_round_trips(dtype):
    x = all_bit_patterns(dtype)
    # Mixed into weight-like data so the stream is Huffman-coded (mode 1), and on its own.
    mixed = torch.cat([bits(weights(200_000, dtype)), bits(x)]).view(dtype)
    for t in (x, mixed, mixed.reshape(-1, 16)):
        ct = codec.compress(t)
        assert_same_bits(codec.decompress(ct), t)
    assert codec.compress(mixed).header[2] == 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (1,), (7,), (5, 3), (257, 384), (3, 2, 1, 2, 1, 2, 3, 5),
                                   (4, 70000), (2, 3, 4096)])
def test_shapes_round_trip(dtype, shape):
    x = weights(shape, dtype)
    ct = codec.compress(x)
    assert ct.shape == x.shape and ct.dtype == dtype
    assert_same_bits(codec.decompress(ct), x)


@pytest.mark.parametrize("chunk", [0, 128, 1000, 4096, 65536])
@pytest.mark.parametrize("shape", [(33, 384), (3, 20000), (50000,), (2, 1, 130)])
def test_chunk_layouts(chunk, shape):
    x = weights(shape, torch.bfloat16)
    ct = codec.compress(x, chunk_elems=chunk)
    assert_same_bits(codec.decompress(ct), x)
    assert_same_bits(ref.decode(ct.to_bytes()), x)  # the spec reader agrees


def test_strided_input_and_no_mutation():
    base = weights((64, 96), torch.bfloat16)
    keep = base.clone()
    for view in (base.t(), base[::2, 1::3], base.unsqueeze(0).expand(3, 64, 96)):
        ct = codec.compress(view)
        assert_same_bits(codec.decompress(ct), view.contiguous())
    assert_same_bits(base, keep)


def test_reference_decoder_agrees_on_every_dtype():
    for dtype in DTYPES:
        x = torch.cat([bits(weights(3000, dtype)), bits(all_bit_patterns(dtype)[:500])]).view(dtype)[:3200].reshape(32, 100)
        blob = codec.compress(x).to_bytes()
        assert_same_bits(ref.decode(blob), x)


def test_stream_matches_spec_fields():
    x = weights((96, 256), torch.bfloat16)
    blob = codec.compress(x).to_bytes()
    h = ref.parse(blob)
    assert h["reserved"] == (0, 0) and h["mode"] == 1 and h["max_len"] == 12 and h["dtype"] == 3
    assert h["shape"] == [96, 256] and h["numel"] == x.numel() and h["row_len"] == 256
    assert h["meta_crc"] == ref.crc32c(blob[: h["meta_crc_pos"]])
    assert h["exp_pos"] % 16 == 0 and h["raw_pos"] % 16 == 0 and len(blob) == h["raw_pos"] + h["raw_bytes"]
    assert h["offsets"][0] == 0 and h["offsets"][-1] == h["exp_bytes"]
    for c in range(h["n_chunks"]):
        start, n = ref.chunk_span(h, c)
        rec = blob[h["exp_pos"] + h["offsets"][c]: h["exp_pos"] + h["offsets"][c + 1]]
        raw = blob[h["raw_pos"] + start: h["raw_pos"] + start + n]
        assert h["chunk_crc"][c] == ref.crc32c(raw, ref.crc32c(rec))
    # Code lengths: a valid prefix code within the limit, and optimal when the limit does not bind.
    lens = h["code_len"]
    assert max(lens) <= 12 and sum(2.0 ** -l for l in lens if l) <= 1.0
    e = ((bits(x).flatten().numpy().astype(np.uint16) >> 7) & 0xFF).astype(np.int64)
    hist = np.bincount(e, minlength=256)
    assert int((hist * np.array(lens)).sum()) == _huffman_cost(hist)


def _huffman_cost(hist):
    import heapq

    h = [int(v) for v in hist if v]
    if len(h) == 1:
        return h[0]
    heapq.heapify(h)
    cost = 0
    while len(h) > 1:
        a, b = heapq.heappop(h), heapq.heappop(h)
        cost += a + b
        heapq.heappush(h, a + b)
    return cost


def test_length_limit_binds_on_skewed_data():
    # Fibonacci-like frequencies force an unconstrained Huffman code far deeper than 12 bits.
    parts, fib = [], [1, 1]
    while len(fib) < 24:
        fib.append(fib[-1] + fib[-2])
    for s, f in enumerate(fib):
        parts.append(torch.full((f,), s + 100, dtype=torch.int32))
    exps = torch.cat(parts)
    x = (exps.to(torch.int32) << 7).to(torch.int16).view(torch.bfloat16)
    x = x[torch.randperm(x.numel())]
    ct = codec.compress(x)
    lens = ref.parse(ct.to_bytes())["code_len"]
    assert max(lens) == 12
    assert_same_bits(codec.decompress(ct), x)


def test_ratio_on_weight_like_bf16():
    x = weights((1024, 1024), torch.bfloat16)
    ct = codec.compress(x)
    assert ct.ratio < 0.69, ct  # Gaussian weights: exponent entropy ~2.6 bits -> ~67%
    assert ct.nbytes == len(ct.to_bytes())


def test_stored_mode_for_incompressible_or_tiny():
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(-2**15, 2**15, (50_000,), generator=g, dtype=torch.int32).to(torch.int16).view(torch.float16)
    for t in (noise, weights((3,), torch.bfloat16), torch.empty(0, dtype=torch.float32)):
        ct = codec.compress(t)
        assert ct.header[2] == 0
        assert ct.nbytes <= t.numel() * t.element_size() + 128
        assert_same_bits(codec.decompress(ct), t)
        assert_same_bits(ref.decode(ct.to_bytes()), t)


# ------------------------------------------------------------------------------------------- API
def test_bytes_and_safetensors_round_trip(tmp_path):
    x = weights((40, 128), torch.bfloat16)
    ct = codec.compress(x)
    ct2 = codec.CompressedTensor.from_bytes(ct.to_bytes())
    assert ct2.header == ct.header and torch.equal(ct2.stream, ct.stream)
    assert_same_bits(codec.decompress(ct2), x)
    plain = torch.arange(5)
    path = str(tmp_path / "m.safetensors")
    codec.save_file({"w": ct, "b": plain}, path)
    d = codec.load_file(path)
    assert isinstance(d["w"], codec.CompressedTensor) and torch.equal(d["b"], plain)
    assert_same_bits(codec.decompress(d["w"]), x)
    from safetensors.torch import load_file as st_load  # still a valid safetensors file for others

    assert st_load(path)["w"].dtype == torch.uint8


def _codec_file(tmp_path, metadata_value=None, entries=None):
    """A codec.save_file file, optionally with its "tersor.codec" metadata or its entries replaced."""
    import json

    from safetensors.torch import save_file as st_save

    ct = codec.compress(weights((8, 64), torch.bfloat16))
    path = str(tmp_path / "c.safetensors")
    tensors = {"w": ct.stream.clone(), "b": torch.arange(3)} if entries is None else entries
    meta = {"tersor.codec": json.dumps({"version": 1, "compressed": ["w"]}) if metadata_value is None
            else metadata_value}
    st_save(tensors, path, metadata=meta)
    return path, ct


@pytest.mark.parametrize("what", ["header length", "truncated", "metadata json", "metadata list", "metadata version",
                                  "missing entry", "not uint8", "not a stream"])
def test_load_file_damaged_is_value_error(tmp_path, what):
    # Issue 17: codec.load_file let safetensors' own SafetensorError (and json's, and from_bytes' TypeError)
    # through; a damaged file is the caller's data: ValueError naming the file (and the entry).
    import struct

    path, ct = _codec_file(tmp_path)
    if what == "header length":
        b = bytearray(open(path, "rb").read())
        b[0:8] = struct.pack("<Q", len(b) * 4)
        open(path, "wb").write(bytes(b))
    elif what == "truncated":
        b = open(path, "rb").read()
        open(path, "wb").write(b[: len(b) - 7])
    elif what == "metadata json":
        path, _ = _codec_file(tmp_path, metadata_value="{not json")
    elif what == "metadata list":
        path, _ = _codec_file(tmp_path, metadata_value='{"version": 1, "compressed": "w"}')
    elif what == "metadata version":
        path, _ = _codec_file(tmp_path, metadata_value='{"version": 2, "compressed": ["w"]}')
    elif what == "missing entry":
        path, _ = _codec_file(tmp_path, metadata_value='{"version": 1, "compressed": ["w", "v"]}')
    elif what == "not uint8":
        path, _ = _codec_file(tmp_path, entries={"w": torch.zeros(64)})
    else:
        stream = ct.stream.clone()
        stream[len(stream) // 2] ^= 0x5A
        path, _ = _codec_file(tmp_path, entries={"w": stream})
    with pytest.raises(ValueError, match="c.safetensors"):
        codec.load_file(path)


def test_load_file_without_codec_metadata_reads_plain_tensors(tmp_path):
    from safetensors.torch import save_file as st_save

    path = str(tmp_path / "p.safetensors")
    st_save({"a": torch.arange(4)}, path)
    assert torch.equal(codec.load_file(path)["a"], torch.arange(4))


def test_api_errors():
    with pytest.raises(TypeError, match="unsupported dtype"):
        codec.compress(torch.arange(4))
    with pytest.raises(TypeError):
        codec.compress([1.0, 2.0])
    with pytest.raises(TypeError):
        codec.decompress(torch.zeros(3))
    with pytest.raises(TypeError, match="uint8"):
        codec.CompressedTensor.from_bytes(torch.zeros(100))
    with pytest.raises(ValueError, match="chunk_elems"):
        codec.compress(torch.zeros(10), chunk_elems=5)
    ct = codec.compress(weights((8, 64), torch.bfloat16))
    with pytest.raises(TypeError, match="dtype"):
        ops.codec_decode(ct.stream, ct.table, ct.header, torch.float16, [8, 64])
    with pytest.raises(ValueError, match="shape"):
        ops.codec_decode(ct.stream, ct.table, ct.header, torch.bfloat16, [64, 8])
    with pytest.raises(ValueError, match="header"):
        bad = list(ct.header)
        bad[5] += 1
        ops.codec_decode(ct.stream, ct.table, bad, torch.bfloat16, [8, 64])
    with pytest.raises(ValueError, match="table"):
        ops.codec_decode(ct.stream, ct.table[:100], ct.header, torch.bfloat16, [8, 64])


# ------------------------------------------------------------------------------------------- corruption
def _expect_reject_or_exact(blob: bytes, x: torch.Tensor):
    """A damaged stream must raise ValueError (the error contract: corrupted data is a caller's problem, never a
    bare RuntimeError), or (damage in ignored padding) decode exactly."""
    try:
        ct = codec.CompressedTensor.from_bytes(blob)
    except ValueError:
        return True
    assert_same_bits(codec.decompress(ct), x)
    return False


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float8_e4m3fn])
def test_truncated_streams_raise(dtype):
    x = weights((20, 512), dtype)
    blob = codec.compress(x).to_bytes()
    cuts = sorted(set(range(0, 200)) | set(random.Random(0).sample(range(len(blob)), 60)) | {len(blob) - 1})
    for n in cuts:
        assert _expect_reject_or_exact(blob[:n], x), n
    assert _expect_reject_or_exact(blob + b"\0", x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_bit_flips_never_decode_wrong(dtype):
    x = weights((16, 640), dtype)
    blob = bytearray(codec.compress(x).to_bytes())
    rng = random.Random(1)
    rejected = 0
    for _ in range(400):
        b = bytearray(blob)
        pos = rng.randrange(len(b))
        b[pos] ^= 1 << rng.randrange(8)
        rejected += _expect_reject_or_exact(bytes(b), x)
    assert rejected >= 390  # only the few padding bytes between sections are outside every checksum


def _reforge(blob: bytearray) -> bytes:
    """Recomputes every checksum after a deliberate edit: the stream then passes CRC checks."""
    h = ref.parse(bytes(blob))
    if h["mode"] == 1:
        eb = ref.WIRE_DTYPES[h["dtype"]][1]
        base = 80 + 8 * h["ndim"] + 256 + 8 * (h["n_chunks"] + 1)
        for c in range(h["n_chunks"]):
            start, n = ref.chunk_span(h, c)
            o0, o1 = h["offsets"][c], h["offsets"][c + 1]
            rec = bytes(blob[h["exp_pos"] + o0: h["exp_pos"] + o1]) if o1 > o0 and h["exp_pos"] + o1 <= len(blob) else b""
            raw = bytes(blob[h["raw_pos"] + start * (eb - 1): h["raw_pos"] + (start + n) * (eb - 1)])
            struct.pack_into("<I", blob, base + 4 * c, ref.crc32c(raw, ref.crc32c(rec)))
    mp = h["meta_crc_pos"]
    struct.pack_into("<I", blob, mp, ref.crc32c(bytes(blob[:mp])))
    return bytes(blob)


def test_hostile_streams_with_valid_checksums_raise():
    x = weights((4, 4096), torch.bfloat16)
    blob = bytearray(codec.compress(x, chunk_elems=4096).to_bytes())
    h = ref.parse(bytes(blob))
    rec0 = h["exp_pos"]
    cases = []
    b = bytearray(blob)  # move one byte from lane 0 to lane 1: same record size, wrong split
    l0, l1 = struct.unpack_from("<2H", b, rec0)
    struct.pack_into("<2H", b, rec0, l0 - 1, l1 + 1)
    cases.append(("lane lengths", b))
    b = bytearray(blob)  # a lane length that overflows the record
    struct.pack_into("<H", b, rec0, 0xFFFF)
    cases.append(("lane overflow", b))
    b = bytearray(blob)  # Kraft-violating code lengths
    cl = 80 + 8 * h["ndim"]
    for s in range(256):
        b[cl + s] = 1
    cases.append(("kraft", b))
    b = bytearray(blob)  # code lengths of another valid code: symbols decode to different lengths
    lens = list(b[cl:cl + 256])
    used = [s for s in range(256) if lens[s]]
    b[cl + used[0]], b[cl + used[1]] = lens[used[1]], lens[used[0]]
    if lens[used[0]] != lens[used[1]]:
        cases.append(("swapped lengths", b))
    b = bytearray(blob)  # misaligned chunk offset
    off = 80 + 8 * h["ndim"] + 256
    struct.pack_into("<Q", b, off + 8, h["offsets"][1] + 4)
    cases.append(("offset", b))
    b = bytearray(blob)  # a lane stream's bytes scrambled
    for k in range(rec0 + 64, rec0 + 96):
        b[k] ^= 0x5A
    cases.append(("lane bytes", b))
    b = bytearray(blob)
    b[6] = 9
    cases.append(("dtype code", b))
    b = bytearray(blob)
    struct.pack_into("<Q", b, 16, h["numel"] * 2)
    cases.append(("numel", b))
    for name, b in cases:
        forged = _reforge(b) if name not in ("dtype code",) else bytes(b)
        with pytest.raises((ValueError, RuntimeError)):
            codec.CompressedTensor.from_bytes(forged)
        # And the ops never crash on it either, whatever they are told.
        with pytest.raises((ValueError, RuntimeError)):
            t = torch.frombuffer(bytearray(forged), dtype=torch.uint8)
            ops.codec_decode(t, ct_table_or_zeros(t), ops._codec_header(t), torch.bfloat16, [4, 4096], False)


def ct_table_or_zeros(t):
    try:
        return ops._codec_decode_table(t)
    except (ValueError, RuntimeError):
        return torch.zeros(4096, dtype=torch.int32)


def test_random_bytes_fuzz():
    from hypothesis import given, settings, strategies as st

    good = codec.compress(weights((8, 512), torch.bfloat16)).to_bytes()

    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(st.binary(min_size=0, max_size=700), st.integers(0, len(good)))
    def fuzz(tail, cut):
        for blob in (good[:80] + tail, good[:cut] + tail):
            try:
                codec.CompressedTensor.from_bytes(blob)
            except (ValueError, RuntimeError):
                pass

    fuzz()


# ------------------------------------------------------------------------------------------- linear
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_compressed_linear_is_bit_identical(dtype, bias):
    lin = torch.nn.Linear(384, 96, bias=bias).to(dtype)
    cl = CompressedLinear.from_linear(lin)
    for x in (torch.randn(1, 384), torch.randn(3, 7, 384)):
        x = x.to(dtype)
        assert torch.equal(cl(x), lin(x))
        assert torch.equal(ops.codec_linear(x, cl.stream, cl.table, cl._header, dtype, [96, 384], cl.bias), lin(x))
    assert_same_bits(cl.weight, lin.weight.detach())


def test_compressed_linear_state_dict_and_model_helper(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 32)).to(torch.bfloat16)
    x = torch.randn(5, 64).to(torch.bfloat16)
    want = model(x)
    compress_linears(model, progress=False)
    assert all(isinstance(model[i], CompressedLinear) for i in (0, 2))
    assert torch.equal(model(x), want)
    sd = model.state_dict()
    other = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 32)).to(torch.bfloat16)
    compress_linears(other, progress=False)
    other.load_state_dict(sd)
    assert torch.equal(other(x), want)
    from safetensors.torch import load_file, save_file

    save_file(sd, str(tmp_path / "m.safetensors"))
    other.load_state_dict(load_file(str(tmp_path / "m.safetensors")))
    assert torch.equal(other(x), want)


def test_codec_linear_errors():
    cl = CompressedLinear.from_linear(torch.nn.Linear(64, 16).to(torch.bfloat16))
    with pytest.raises(TypeError, match="x is"):
        ops.codec_linear(torch.randn(2, 64), cl.stream, cl.table, cl._header, torch.bfloat16, [16, 64])
    with pytest.raises(ValueError, match="features"):
        ops.codec_linear(torch.randn(2, 63).bfloat16(), cl.stream, cl.table, cl._header, torch.bfloat16, [16, 64])
    ct = codec.compress(weights((4, 4, 4), torch.bfloat16))
    with pytest.raises(ValueError, match="2-d"):
        ops.codec_linear(torch.randn(2, 4).bfloat16(), ct.stream, ct.table, ct.header, torch.bfloat16, [4, 4, 4])


# ------------------------------------------------------------------------------------------- CUDA
cuda = pytest.mark.cuda


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0,), (7,), (257, 384), (3, 70000), (4096, 1024)])
def test_cuda_decode_bit_exact(dtype, shape):
    x = weights(shape, dtype)
    ct = codec.compress(x)
    got = codec.decompress(ct.to("cuda"))
    assert got.is_cuda
    assert_same_bits(got.cpu(), x)


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_every_bit_pattern(dtype):
    x = torch.cat([bits(weights(100_000, dtype)), bits(all_bit_patterns(dtype))]).view(dtype)
    assert_same_bits(codec.decompress(codec.compress(x).cuda()).cpu(), x)


@cuda
def test_cuda_rejects_forged_stream():
    x = weights((4, 4096), torch.bfloat16)
    blob = bytearray(codec.compress(x, chunk_elems=4096).to_bytes())
    rec0 = ref.parse(bytes(blob))["exp_pos"]
    l0, l1 = struct.unpack_from("<2H", blob, rec0)
    struct.pack_into("<2H", blob, rec0, l0 - 1, l1 + 1)
    forged = torch.frombuffer(bytearray(_reforge(blob)), dtype=torch.uint8)
    header, table = ops._codec_header(forged), ops._codec_decode_table(forged)
    with pytest.raises(ValueError, match="corrupt"):  # corrupted data is a ValueError (issue 17's contract)
        ops.codec_decode(forged.cuda(), table.cuda(), header, torch.bfloat16, [4, 4096], True)
    torch.cuda.synchronize()  # the context is still healthy


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", [(96, 384), (1536, 384), (384, 1536), (256, 4096), (64, 40960), (100, 200)])
@pytest.mark.parametrize("batch", [1, 3, 8, 9])
def test_cuda_fused_linear_matches_dense(dtype, n, k, batch):
    lin = torch.nn.Linear(k, n).to(dtype)
    cl = CompressedLinear.from_linear(lin, fused=True).cuda()
    x = torch.randn(batch, k).to(dtype)
    got = cl(x.cuda()).cpu()
    want = F.linear(x.double(), lin.weight.double(), lin.bias.double())
    dense = F.linear(x.cuda(), lin.weight.cuda(), lin.bias.cuda()).cpu().double()
    # FlashAttention rule: error at most 2x (plus a little slack) of torch's own low-precision error.
    tol = 2 * (dense - want).abs().max().item() + 1e-6
    assert (got.double() - want).abs().max().item() <= tol
    assert torch.equal(cl(x.cuda()).cpu(), got)  # deterministic


def test_compressed_linear_rejects_bad_state_dict():
    cl = CompressedLinear.from_linear(torch.nn.Linear(64, 16).to(torch.bfloat16))
    other = CompressedLinear.from_linear(torch.nn.Linear(32, 16).to(torch.bfloat16))
    with pytest.raises(ValueError, match="layer is"):
        cl.load_state_dict(other.state_dict())
    sd = cl.state_dict()
    sd["stream"] = sd["stream"].clone()
    sd["stream"][-1] ^= 1  # a flipped raw bit: the chunk CRC catches it
    with pytest.raises((ValueError, RuntimeError)):
        cl.load_state_dict(sd)
    sd = cl.state_dict()
    sd["table"] = torch.zeros_like(sd["table"])  # a stale table is replaced by the derived one
    cl.load_state_dict(sd)
    assert torch.equal(cl.table, codec.CompressedTensor.from_bytes(cl.stream).table)


@pytest.mark.testing_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,chunk", [((33, 384), 0), ((3, 40960), 0), ((5, 1001), 0), ((7,), 0), ((3, 70000), 1000),
                                         ((2, 3, 130), 128), ((4096,), 4096), ((1, 131), 0)])
def test_cuda_decode_kernel_emulated_on_cpu(dtype, shape, chunk):
    # The CUDA decode kernel's own phase-1/phase-2 code (decode_segment, emit_segment, SWAR merges),
    # run lane by lane on the CPU, must reproduce the tensor bit for bit.
    n, special = math.prod(shape), min(64, math.prod(shape) // 2)
    x = torch.cat([bits(weights(n - special, dtype)), bits(all_bit_patterns(dtype)[:special])]).view(dtype)
    x = x.reshape(shape)
    ct = codec.compress(x, chunk_elems=chunk)
    if ct.header[2] != 1:
        pytest.skip("stored stream")
    assert_same_bits(T._codec_emulate_cuda_decode(ct.stream, ct.table, ct.header), x)


def _gemv_case(dtype, n, k, batch):
    w = weights((n, k), dtype, std=0.05)
    return w, codec.compress(w), torch.randn(batch, k).to(dtype), torch.randn(n).to(dtype)


GEMV_SHAPES = [(96, 384), (1536, 384), (384, 1536), (256, 4096), (16, 40960), (200, 128), (3, 8200)]


@pytest.mark.testing_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", GEMV_SHAPES)
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_cuda_gemv_kernel_emulated_on_cpu(dtype, n, k, batch):
    # The fused GEMV kernel's per-lane strip code and reduction order, replayed on the CPU: within 2x
    # torch's own error of a float64 reference (the FlashAttention rule).
    w, ct, x, bias = _gemv_case(dtype, n, k, batch)
    got = T._codec_emulate_cuda_linear(x, ct.stream, ct.table, ct.header, bias).double()
    truth = F.linear(x.double(), w.double(), bias.double())
    dense = F.linear(x, w, bias).double()
    assert (got - truth).abs().max().item() <= 2 * (dense - truth).abs().max().item() + 1e-6


@pytest.mark.testing_ext
def test_cuda_gemv_emulation_refuses_ineligible_calls():
    ct = codec.compress(weights((100, 200), torch.bfloat16))  # 40 rows per chunk of 200: strips straddle rows
    with pytest.raises(ValueError, match="would not take"):
        T._codec_emulate_cuda_linear(torch.randn(1, 200).bfloat16(), ct.stream, ct.table, ct.header)
    ct = codec.compress(weights((64, 256), torch.bfloat16))
    with pytest.raises(ValueError, match="would not take"):
        T._codec_emulate_cuda_linear(torch.randn(9, 256).bfloat16(), ct.stream, ct.table, ct.header)


@cuda
@pytest.mark.testing_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", GEMV_SHAPES)
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_cuda_gemv_equals_its_cpu_emulation(dtype, n, k, batch):
    # Same arithmetic in the same order: the GPU result must match the CPU replay bit for bit.
    _, ct, x, bias = _gemv_case(dtype, n, k, batch)
    want = T._codec_emulate_cuda_linear(x, ct.stream, ct.table, ct.header, bias)
    g = ct.cuda()
    got = ops.codec_linear(x.cuda(), g.stream, g.table, g.header, dtype, [n, k], bias.cuda()).cpu()
    assert_same_bits(got, want)


@pytest.mark.parametrize("field", range(13))
@pytest.mark.parametrize("delta", [1, -1, 2**40])
def test_malformed_header_lists_are_refused(field, delta):
    # The CUDA ops cannot re-read the stream's metadata on the host: check_decode_call must refuse any
    # header list that disagrees with the stream. The emulation op runs exactly that check first.
    ct = codec.compress(weights((8, 4096), torch.bfloat16))
    bad = list(ct.header)
    bad[field] += delta
    op = T._codec_emulate_cuda_decode if T is not None else None
    with pytest.raises((ValueError, TypeError)):
        if op is not None:
            op(ct.stream, ct.table, bad)
        ops.codec_decode(ct.stream, ct.table, bad, torch.bfloat16, [8, 4096])


# ------------------------------------------------------------------------------------------- errors, routing
def test_direct_op_calls_raise_runtime_error_naming_the_type():
    # The contract for direct torch.ops callers: through the stable ABI every C++ error is a RuntimeError
    # whose message starts with the Python type it means (tersor.ops.lib re-raises it as that type).
    ct = codec.compress(weights((8, 64), torch.bfloat16))
    with pytest.raises(RuntimeError, match=r"^ValueError: codec_decode: shape"):
        torch.ops.tersor.codec_decode(ct.stream, ct.table, ct.header, torch.bfloat16, [64, 8])
    with pytest.raises(RuntimeError, match=r"^TypeError: codec_decode: dtype"):
        torch.ops.tersor.codec_decode(ct.stream, ct.table, ct.header, torch.float16, [8, 64])
    with pytest.raises(ValueError, match="shape"):
        ops.codec_decode(ct.stream, ct.table, ct.header, torch.bfloat16, [64, 8])


def _expected_route(ct, rows):
    """choose_linear_path (csrc/codec/codec_view.h: gemv_fused_eligible, gemv_geom_ok), restated from the
    stream's own fields."""
    h = ref.parse(ct.to_bytes())
    if h["mode"] != 1 or ct.dtype not in (torch.bfloat16, torch.float16) or not 1 <= rows <= 8 or h["numel"] == 0:
        return "decode_matmul"
    e, k = h["chunk_elems"], h["row_len"]
    if e % 4 or k % 8:
        return "decode_matmul"
    if e % k == 0:  # chunks of whole rows: at most 64 of them, and 128-element strips that stay in one row
        lane_elems = (e + 127) // 128 * 4
        if e // k > 64 or (e != k and (k % 128 or lane_elems % 128)):
            return "decode_matmul"
    return "fused_gemv"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn])
@pytest.mark.parametrize("n,k,chunk", [(96, 384, 0), (1536, 384, 0), (384, 1536, 0), (256, 4096, 0), (16, 40960, 0),
                                       (200, 128, 0), (3, 8200, 0), (100, 200, 0), (64, 256, 128), (4, 4096, 1000),
                                       (2, 2, 0), (512, 8, 0)])
def test_codec_route(dtype, n, k, chunk):
    ct = codec.compress(weights((n, k), dtype, std=0.05), chunk_elems=chunk)
    for rows in (0, 1, 2, 3, 8, 9, 64):
        got = codec.linear_path(ct, rows)
        assert got == ops._codec_route(ct.header, rows)
        assert got == _expected_route(ct, rows), (ref.parse(ct.to_bytes())["chunk_elems"], rows)
    if dtype == torch.bfloat16 and chunk == 0 and (n, k) in GEMV_SHAPES:
        assert codec.linear_path(ct, 1) == "fused_gemv"  # the shapes the fused-GEMV tests rely on
    if T is not None and dtype in (torch.bfloat16, torch.float16) and ct.header[2] == 1:
        # The CPU replay of the fused kernel takes exactly the calls the route sends to it.
        for rows in (1, 8, 9):
            x = torch.randn(rows, k).to(dtype)
            if codec.linear_path(ct, rows) == "fused_gemv":
                T._codec_emulate_cuda_linear(x, ct.stream, ct.table, ct.header)
            else:
                with pytest.raises(ValueError, match="would not take"):
                    T._codec_emulate_cuda_linear(x, ct.stream, ct.table, ct.header)


def test_codec_route_refuses_bad_arguments():
    ct = codec.compress(weights((8, 4096), torch.bfloat16))
    assert codec.linear_path(ct, 1) == "fused_gemv"
    with pytest.raises(ValueError, match="rows"):
        ops._codec_route(ct.header, -1)
    bad = list(ct.header)
    bad[5] += 4
    with pytest.raises(ValueError, match="malformed header"):
        ops._codec_route(bad, 1)
    with pytest.raises(ValueError, match="2-d"):
        codec.linear_path(codec.compress(weights((2, 4, 4096), torch.bfloat16)), 1)
    with pytest.raises(TypeError):
        codec.linear_path(weights((8, 8), torch.bfloat16), 1)


@cuda
@pytest.mark.parametrize("batch", [9, 64])
def test_cuda_linear_decode_matmul_path_is_bit_identical(batch):
    # Calls the route sends to decode + matmul run F.linear on the decoded weight: bit-identical to it.
    lin = torch.nn.Linear(384, 96).to(torch.bfloat16).cuda()
    cl = CompressedLinear.from_linear(lin, fused=True)
    assert codec.linear_path(cl.compressed_weight, batch) == "decode_matmul"
    x = torch.randn(batch, 384, device="cuda").to(torch.bfloat16)
    assert torch.equal(cl(x), F.linear(x, lin.weight, lin.bias))
