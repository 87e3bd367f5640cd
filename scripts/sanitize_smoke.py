"""Runs every CUDA kernel once on small inputs (for compute-sanitizer, via scripts/gpu_check.sh),
including the codec decoders on corrupted and forged streams: they must fail cleanly, never touch memory
out of bounds."""

import random
import struct
import sys
from pathlib import Path

import torch

import tersor
from tersor import codec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import codec_reference as ref  # noqa: E402

ops = torch.ops.tersor

sizes = [1 << i for i in range(16)] + [k << lg for k in tersor.ops.HADAMARD_K_SIZES for lg in (0, 3)]
for n in sizes:
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(3, n, device="cuda").to(dtype)
        tersor.hadamard_transform(x)
        tersor.hadamard_transform(x, transpose=True)
torch.cuda.synchronize()
print(f"sanitize_smoke: ran {len(sizes) * 6} hadamard launches")

# codec: every dtype and several chunk geometries, decode and the fused GEMV (whole and split rows).
launches = 0
for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
    for shape in [(7,), (33, 384), (3, 40960), (5, 1001)]:
        ct = codec.compress((torch.randn(shape) * 0.02).to(dtype)).cuda()
        codec.decompress(ct)
        launches += 1
for dtype in (torch.bfloat16, torch.float16):
    for n, k in [(96, 384), (16, 40960), (64, 4096)]:
        ct = codec.compress((torch.randn(n, k) * 0.02).to(dtype)).cuda()
        for b in (1, 3, 8):
            ops.codec_linear(torch.randn(b, k, device="cuda").to(dtype), ct.stream, ct.table, ct.header, dtype, [n, k])
            launches += 1

# Corrupted streams: random byte damage in the chunk area, with the header list of the intact stream (the
# device code must bounds-check everything it reads), decoded without and with verify.
x = (torch.randn(64, 4096) * 0.02).to(torch.bfloat16)
good = bytearray(codec.compress(x).to_bytes())
h = ref.parse(bytes(good))
header, table = ops._codec_header(torch.frombuffer(bytearray(good), dtype=torch.uint8)), None
table = ops._codec_decode_table(torch.frombuffer(bytearray(good), dtype=torch.uint8)).cuda()
rng = random.Random(0)
raised = 0
for trial in range(200):
    b = bytearray(good)
    lo = h["exp_pos"] - 8 * (h["n_chunks"] + 1) - 4 * h["n_chunks"] - 4 if trial % 4 == 0 else h["exp_pos"]
    for _ in range(rng.randint(1, 64)):
        b[rng.randrange(max(0, lo), h["raw_pos"])] = rng.randrange(256)
    if trial % 5 == 0:  # a lane table claiming huge lanes
        struct.pack_into("<32H", b, h["exp_pos"], *([0xFFFF] * 32))
    s = torch.frombuffer(b, dtype=torch.uint8).cuda()
    ops.codec_decode(s, table, header, torch.bfloat16, [64, 4096], False)
    ops.codec_linear(torch.randn(1, 4096, device="cuda").bfloat16(), s, table, header, torch.bfloat16, [64, 4096])
    try:
        ops.codec_decode(s, table, header, torch.bfloat16, [64, 4096], True)
    except RuntimeError:
        raised += 1
    launches += 3
torch.cuda.synchronize()
print(f"sanitize_smoke: ran {launches} codec launches; {raised}/200 corrupted streams raised with verify=True")

# codebook: E8P decode + fused GEMV (every bit width, odd row counts of the tiling, every batch size) and
# AQLM decode + GEMV (shared-memory and L2 codebooks). Any code value is valid, so random words cover all.
launches = 0
for bits, cols in ((2, 1), (3, 1.5), (4, 2)):
    for m, n in ((16, 64), (48, 192), (64, 1024)):
        q = torch.randint(-(2**62), 2**62, (m, int(cols * n // 32)), dtype=torch.int64, device="cuda")
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            ops.e8p_decode(q, n, None, dt)
            launches += 1
        for b in (1, 2, 5, 8, 9):
            ops.e8p_linear(torch.randn(b, n, device="cuda"), q, n)
            launches += 1
for books, nbits in ((2, 8), (1, 16), (1, 12)):
    ct = torch.int8 if nbits <= 8 else torch.int16
    codes = torch.randint(-128 if ct == torch.int8 else -32768, 127 if ct == torch.int8 else 32767,
                          (40, 24, books), device="cuda").to(ct)
    cb = torch.randn(books, 1 << nbits, 1, 8, device="cuda").half()
    sc = torch.rand(40, 1, 1, 1, device="cuda").half()
    ops.aqlm_decode(codes, cb, sc, None)
    for b in (1, 3, 8, 9):
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            ops.aqlm_linear(torch.randn(b, 192, device="cuda").to(dt), codes, cb, sc, torch.randn(40, device="cuda").to(dt))
            launches += 1
torch.cuda.synchronize()
print(f"sanitize_smoke: ran {launches} codebook launches")

# 2:4 sparsity: compress (good and bad weights), decompress, the GEMV (1/2 n8 tiles, K steps not a
# multiple of the warp count) and the GEMM (partial W and x tiles, pipeline shorter than its depth).
from tersor.sparse import compress_2_4, prune_2_4  # noqa: E402

launches = 0
for dtype in (torch.float16, torch.bfloat16):
    for m, k in ((16, 64), (48, 192), (144, 576), (272, 128)):
        w = prune_2_4(torch.randn(m, k, device="cuda").to(dtype))
        p = compress_2_4(w)
        ops.sparse24_decompress(p.values, p.meta)
        launches += 2
        for b in (1, 8, 9, 16, 17, 130):
            ops.sparse24_linear(torch.randn(b, k, device="cuda").to(dtype), p.values, p.meta,
                                torch.randn(m, device="cuda").to(dtype))
            launches += 1
# The sm90a wgmma.sp GEMM (forced, where it can run): partial 128-row W tiles / 64-row warpgroups, partial
# 256- and 128-row x tiles, one k-step (shorter than the pipeline) and several.
if torch.cuda.get_device_capability() == (9, 0) and any(
        a.startswith("90") for a in tersor.ops.build_info().get("cuda_archs", "").split(",")):
    for dtype in (torch.float16, torch.bfloat16):
        for m, k in ((16, 64), (144, 576), (272, 128)):
            p = compress_2_4(prune_2_4(torch.randn(m, k, device="cuda").to(dtype)))
            for b in (1, 130, 257):
                ops.sparse24_linear(torch.randn(b, k, device="cuda").to(dtype), p.values, p.meta,
                                    torch.randn(m, device="cuda").to(dtype), path="sm90")
                launches += 1
bad = torch.ones(16, 64, device="cuda", dtype=torch.float16)
try:
    compress_2_4(bad)
except ValueError:
    launches += 1
torch.cuda.synchronize()
print(f"sanitize_smoke: ran {launches} sparse24 launches")

# block-sparse (BSR): every blocksize and dtype, token counts on both sides of each token tile and of the
# split/whole-row switch, empty block rows, split rows (chunk_blocks=1), ragged last tiles, with and
# without bias, and an x that is a non-contiguous view.
from tersor.sparse import bsr_linear, to_bsr  # noqa: E402

launches = 0
for bs in (16, 32, 64):
    g = torch.Generator().manual_seed(bs)
    keep = torch.rand(5, 7, generator=g) < 0.5
    keep[2] = False
    w = torch.randn(5 * bs, 7 * bs, generator=g) * keep.repeat_interleave(bs, 0).repeat_interleave(bs, 1)
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        for chunk in (1, None):
            b = to_bsr(w.to(dt), bs, chunk_blocks=chunk).to("cuda")
            bias = torch.randn(5 * bs, device="cuda").to(dt)
            for tokens in (1, 7, 8, 9, 33, 64, 65, 130):
                x = torch.randn(tokens, 7 * bs, device="cuda").to(dt)
                bsr_linear(x, b, bias)
                bsr_linear(x, b)
                launches += 2
            xt = torch.randn(7 * bs, 3, device="cuda").to(dt).t()
            bsr_linear(xt, b, bias)
            launches += 1
torch.cuda.synchronize()
print(f"sanitize_smoke: ran {launches} bsr launches")

# quantized attention: the CUDA paths of this device (sm8x mma.sync; on compute capability 9.0 also the sm90a
# wgmma kernel and, with kernel="sm8x", the sm8x kernels), head dims 64/128, causal with Lq < Lk and Lq > Lk
# (fully masked rows), GQA, tails of the 64/128-token tiles, both 16-bit dtypes. Modes without a kernel on
# this device (tersor.attention.cuda_path_name raises NotImplementedError) are skipped.
from tersor.attention import cuda_path_name  # noqa: E402


def _sage_path(qk, pv, smooth_q, kernel="auto"):
    try:
        return cuda_path_name(torch.device("cuda"), qk, pv, smooth_q, kernel=kernel)
    except NotImplementedError:
        return None


launches = 0
paths = set()
kernels = ["auto", "sm8x"] if torch.cuda.get_device_capability() == (9, 0) else ["auto"]
for kernel in kernels:
    for d in (64, 128):
        for b, hq, hkv, lq, lk, causal in ((1, 2, 2, 1, 1, False), (1, 4, 2, 100, 300, True),
                                           (2, 2, 1, 300, 129, True), (1, 2, 2, 257, 255, False)):
            for dt in (torch.float16, torch.bfloat16):
                q = torch.randn(b, hq, lq, d, device="cuda").to(dt)
                k = torch.randn(b, hkv, lk, d, device="cuda").to(dt)
                v = torch.randn(b, hkv, lk, d, device="cuda").to(dt)
                for pv in ("fp8", "fp16"):
                    path = _sage_path("int8", pv, False, kernel)
                    if path is None:
                        continue
                    tersor.ops.sage_attention_fwd(q, k, v, causal, d ** -0.5, 8, pv, True, False, kernel)
                    paths.add(path)
                    launches += 1
torch.cuda.synchronize()
print(f"sanitize_smoke: ran {launches} attention calls (paths {sorted(paths)})")

# quantized attention (sm8x kernels): INT8 / INT4 Q K^T, with and without Q smoothing, both P.V modes, both
# head dims, tails in Lq and Lk (masked padding rows / keys), causal with Lq > Lk (fully masked rows), GQA.
# kernel="sm8x"; the modes this device has no kernel for (INT4 on sm90, FP8 before sm89) are skipped.
launches = 0
for bits in (8, 4):
    for smooth_q in (False, True):
        for pv in ("fp8", "fp16"):
            if _sage_path({8: "int8", 4: "int4"}[bits], pv, smooth_q, "sm8x") is None:
                continue
            for dtype in (torch.float16, torch.bfloat16):
                for d, lq, lk, causal in [(64, 100, 77, False), (128, 130, 200, True), (64, 200, 150, True)]:
                    q = torch.randn(1, 4, lq, d, device="cuda").to(dtype)
                    k = torch.randn(1, 2, lk, d, device="cuda").to(dtype)
                    v = torch.randn(1, 2, lk, d, device="cuda").to(dtype)
                    tersor.ops.sage_attention_fwd(q, k, v, causal, d ** -0.5, bits, pv, True, smooth_q, "sm8x")
                    launches += 1
torch.cuda.synchronize()
print(f"sanitize_smoke: ran {launches} sage attention calls")
