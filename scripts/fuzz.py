#!/usr/bin/env python3
"""Structure-aware fuzzing of tersor's loaders and decoders (issue 17; docs/build.md, "Fuzzing").

    python scripts/fuzz.py --target T --iters N [--seconds S] [--seed K] [--timeout 1.0] [--progress N]
    python scripts/fuzz.py --replay FILE...          # re-run saved cases (a corpus file or a failure)
    python scripts/fuzz.py --write-corpus            # (re)generate tests/fuzz_corpus/ from tersor's writers
    python scripts/fuzz.py --atheris --target T -- -runs=N -timeout=1   # libFuzzer's engine, if atheris imports

Targets: codec, sparse24, bsr, aqlm, e8p, manifest (all: --target all). Every case starts from a valid seed of
tests/fuzz_corpus/<target>/ (written by tersor's own writers: --write-corpus), applies 1-4 structure-aware
mutations (bit flips, truncations, splices, length/offset/count/shape fields pushed to 0, 1, -1, 2^31-1, 2^31,
2^32, 2^63-1, dtype and stride changes) or is raw random bytes, and runs it through the public loaders and ops.

A case passes when it ends in one of
  same        a clean result equal to the un-mutated seed's (a mutation the format ignores, e.g. padding);
  other       a clean result that differs from the seed's and that an independent reference decoder of the
              mutated input agrees with (formats without a checksum: any code is a valid code; codec streams
              whose checksums the mutator recomputed on purpose);
  ValueError  (TypeError where a dtype changed).
Anything else fails: another exception type (a bare RuntimeError, KeyError, IndexError, ...), a result the
reference disagrees with, a codec stream whose checksums were *not* forged decoding to a different result with
verify=True, a crash or sanitizer report (the worker process dies), or a case running longer than --timeout
(a hang; re-run once alone in a fresh worker to tell it from machine load). Cases run in a worker process
that reports each case's start and end; the parent enforces the timeout and restarts the worker after a crash.
Failing inputs are written to --out (default build/fuzz-failures/) as files --replay and tests/test_fuzz.py read;
add them to tests/fuzz_corpus/<target>/ once fixed. Exit status 1 on any failure.

Case files: codec `*.trsc` (the stream's bytes); sparse24/bsr/aqlm/e8p `*.pt` (torch.save of a dict of
tensors, strides kept; read back with weights_only=True); manifest `*.tck` (u64 little-endian manifest
length, the manifest JSON, then the model.safetensors bytes).
"""

from __future__ import annotations

import argparse
import atexit
import copy
import json
import os
import random
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "fuzz_corpus"
TARGETS = ("codec", "sparse24", "bsr", "aqlm", "e8p", "manifest")
EXT = {"codec": ".trsc", "sparse24": ".pt", "bsr": ".pt", "aqlm": ".pt", "e8p": ".pt", "manifest": ".tck"}

# Limits every length/offset/count/shape field is pushed to (as the field's width allows).
LIMITS = (0, 1, -1, 2**31 - 1, 2**31, 2**32, 2**63 - 1)


class Finding(Exception):
    """A case that broke the contract (the message says how)."""


def _lazy_imports():
    global torch, tersor, F
    import torch  # noqa: F401
    import torch.nn.functional as F  # noqa: F401

    import tersor  # noqa: F401


# ------------------------------------------------------------------------------------------------ helpers
def _bits_equal(a, b) -> bool:
    """Bitwise equality (NaN payloads, -0.0): what the lossless paths promise."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    ia = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return bool(torch.equal(a.contiguous().view(ia), b.contiguous().view(ia)))


def _close(a, b, rtol, atol) -> bool:
    """allclose that treats NaN == NaN and inf == inf (same sign), in float64."""
    a64, b64 = a.double(), b.double()
    if a64.shape != b64.shape:
        return False
    nan = torch.isnan(a64) | torch.isnan(b64)
    inf = torch.isinf(a64) | torch.isinf(b64)
    fin = ~(nan | inf)
    # A NaN on one side only is tolerated where the other side overflowed (different summation orders can
    # meet inf - inf where the other order does not); finite entries must be close.
    if not bool(torch.allclose(a64[fin], b64[fin], rtol=rtol, atol=atol)):
        return False
    return True


def _classify(err: BaseException) -> str:
    """ValueError / TypeError are the contract's outcomes; anything else is a finding."""
    if isinstance(err, ValueError):
        return "ValueError"
    if isinstance(err, TypeError):
        return "TypeError"
    raise Finding(f"{type(err).__name__} (not ValueError/TypeError): {str(err)[:400]}")


def _call(fn, *args, **kwargs):
    """(result, None) or (None, outcome) for a ValueError/TypeError; other exceptions are findings."""
    try:
        return fn(*args, **kwargs), None
    except (Finding, KeyboardInterrupt):
        raise
    except BaseException as err:  # noqa: BLE001 - the point is to see every type
        global LAST_ERROR
        LAST_ERROR = f"{type(err).__name__}: {str(err)[:300]}"
        return None, _classify(err)


LAST_ERROR = ""


# ---------------------------------------------------------------------------- generic byte mutations
def _flip_bits(b: bytearray, rng: random.Random, lo: int = 0, hi: int | None = None):
    hi = len(b) if hi is None else hi
    if hi <= lo:
        return
    for _ in range(rng.choice((1, 1, 2, 3, 8))):
        i = rng.randrange(lo, hi)
        b[i] ^= 1 << rng.randrange(8)


def _set_bytes(b: bytearray, rng: random.Random, lo: int = 0, hi: int | None = None):
    hi = len(b) if hi is None else hi
    if hi <= lo:
        return
    for _ in range(rng.randint(1, 8)):
        b[rng.randrange(lo, hi)] = rng.choice((0, 0xFF, 0x7F, 0x80, 1, rng.randrange(256)))


def _limit(rng: random.Random, width: int, orig: int | None = None) -> int:
    """A limit value (or orig +- 1, orig * 2) for an unsigned field of `width` bytes, as its bit pattern."""
    cands = list(LIMITS)
    if orig is not None:
        cands += [orig + 1, orig - 1, orig * 2, orig // 2, orig + 16, orig - 16]
    v = rng.choice(cands)
    return v % (1 << (8 * width))


def _put(b: bytearray, off: int, width: int, v: int):
    if 0 <= off and off + width <= len(b):
        b[off:off + width] = (v % (1 << (8 * width))).to_bytes(width, "little")


def _get(b, off: int, width: int) -> int:
    return int.from_bytes(bytes(b[off:off + width]), "little")


def _truncate_or_extend(b: bytearray, rng: random.Random) -> bytearray:
    r = rng.random()
    if r < 0.6:
        return b[: rng.randrange(len(b) + 1)]
    if r < 0.8:
        return b + bytes(rng.randrange(256) for _ in range(rng.choice((1, 4, 16, 64))))
    cut = rng.randrange(len(b) + 1)  # drop a middle piece
    return b[:cut] + b[cut + rng.randint(1, 64):]


def _splice(a: bytearray, other: bytes, rng: random.Random) -> bytearray:
    i = rng.randrange(len(a) + 1)
    j = rng.randrange(len(other) + 1)
    k = rng.randrange(j, len(other) + 1)
    if rng.random() < 0.5:
        return a[:i] + other[j:k]  # head of one, tail piece of another
    out = bytearray(a)
    out[i:i + (k - j)] = other[j:k]  # overwrite in place
    return out


# =================================================================================================== codec
class CodecTarget:
    """codec v1 streams: header fields, code-length table, offset and CRC tables, lane tables, lane bits and
    raw bytes; through _codec_header / _codec_decode_table / codec_decode (verify on and off) /
    codec_linear / CompressedTensor.from_bytes. Half of the mutated streams get their checksums recomputed
    (metadata, chunk, stored-data CRCs, as docs/formats.md defines them) so the mutations reach the decoder's
    structural checks; for those a clean decode is checked against tests/codec_reference.py (an independent
    bit-by-bit decoder written from the spec). A stream whose CRCs were not forged that decodes with
    verify=True must give the seed's exact bits."""

    name = "codec"

    def __init__(self):
        sys.path.insert(0, str(ROOT / "tests"))
        import codec_reference as ref

        self.ref = ref
        self.lib = tersor.ops.lib
        self.known_streams = set()  # the seeds' bytes (Fuzzer fills it): valid streams with their own CRCs

    # ---- seeds ----
    @staticmethod
    def write_seeds(out: Path):
        g = torch.Generator().manual_seed(17)
        specs = [  # (name, tensor, chunk_elems)
            ("bf16_2d_rows", (torch.randn(8, 256, generator=g) * 0.02).bfloat16(), 256),
            ("bf16_split_rows", (torch.randn(2, 640, generator=g) * 0.02).bfloat16(), 128),
            ("f16_3d", (torch.randn(2, 3, 96, generator=g) * 0.05).half(), 128),
            ("f32_1d", (torch.randn(700, generator=g) * 0.1).float(), 256),
            ("e4m3_2d", (torch.randn(16, 64, generator=g)).to(torch.float8_e4m3fn), 128),
            ("e5m2_1d", (torch.randn(300, generator=g)).to(torch.float8_e5m2), 128),
            ("bf16_stored_tiny", torch.randn(3, 2, generator=g).bfloat16(), 0),
            ("f32_scalar", torch.tensor(1.5), 0),
            ("f16_empty", torch.empty(0, 4).half(), 0),
            ("bf16_specials", torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, 3.0]
                                           * 40).bfloat16().reshape(7, 40), 128),
        ]
        for name, t, ce in specs:
            ct = tersor.codec.compress(t, chunk_elems=ce)
            (out / f"{name}.trsc").write_bytes(ct.to_bytes())

    def load_seed(self, path: Path):
        return bytes(path.read_bytes())

    def seed_info(self, blob: bytes):
        """What the un-mutated seed decodes to (its bits)."""
        return tersor.codec.CompressedTensor.from_bytes(blob)._decode(verify=True)

    # ---- mutation ----
    def _fields(self, b: bytes):
        """(offset, width) of every integer field the header and tables of `b` say they have (best effort on
        a damaged stream: only fields inside the buffer)."""
        f = [(6, 1), (7, 1), (8, 1), (9, 1), (10, 2), (12, 4)] + [(o, 8) for o in range(16, 80, 8)]
        if len(b) < 80:
            return [x for x in f if x[0] + x[1] <= len(b)]
        ndim = min(b[8], 8)
        f += [(80 + 8 * d, 8) for d in range(ndim)]
        if b[7] == 1:
            n_chunks = _get(b, 32, 8)
            pos = 80 + 8 * ndim + 256
            nc = min(n_chunks, 64)
            f += [(pos + 8 * c, 8) for c in range(nc + 1)]
            exp_pos = _get(b, 40, 8)
            for c in range(min(nc, 4)):
                o = exp_pos + _get(b, pos + 8 * c, 8)
                f += [(o + 2 * lane, 2) for lane in range(32)]
        return [x for x in f if x[0] + x[1] <= len(b)]

    def fix_crcs(self, b: bytearray) -> bytearray:
        """Recomputes every checksum of a (possibly mutated) stream as docs/formats.md defines them, where the
        header still says where they are; leaves the bytes alone where it does not."""
        ref = self.ref
        try:
            if len(b) < 80:
                return b
            ndim, mode = b[8], b[7]
            if ndim > 8:
                return b
            after_shape = 80 + 8 * ndim
            if mode == 1:
                n_chunks = _get(b, 32, 8)
                if n_chunks > len(b):
                    return b
                offsets_pos = after_shape + 256
                crc_pos = offsets_pos + 8 * (n_chunks + 1)
                meta_crc_pos = crc_pos + 4 * n_chunks
                if meta_crc_pos + 4 > len(b):
                    return b
                E, numel, L = _get(b, 12, 4), _get(b, 16, 8), _get(b, 24, 8)
                exp_pos, raw_pos = _get(b, 40, 8), _get(b, 56, 8)
                eb = {1: 4, 2: 2, 3: 2, 4: 1, 5: 1}.get(b[6], 0)
                if E and L and eb:
                    h = {"chunk_elems": E, "row_len": L, "numel": numel}
                    for c in range(n_chunks):
                        o0, o1 = _get(b, offsets_pos + 8 * c, 8), _get(b, offsets_pos + 8 * c + 8, 8)
                        start, n = ref.chunk_span(h, c)
                        if not (o0 <= o1 and exp_pos + o1 <= len(b)) or n < 0:
                            continue
                        crc = ref.crc32c(bytes(b[exp_pos + o0:exp_pos + o1]))
                        rb = eb - 1
                        if rb:
                            lo = raw_pos + start * rb
                            crc = ref.crc32c(bytes(b[lo:lo + n * rb]), crc)
                        _put(b, crc_pos + 4 * c, 4, crc)
            else:
                meta_crc_pos = after_shape + 4
                if meta_crc_pos + 4 > len(b):
                    return b
                raw_pos, raw_bytes = _get(b, 56, 8), _get(b, 64, 8)
                _put(b, after_shape, 4, ref.crc32c(bytes(b[raw_pos:raw_pos + raw_bytes])))
            _put(b, meta_crc_pos, 4, ref.crc32c(bytes(b[:meta_crc_pos])))
        except (struct.error, OverflowError, MemoryError):
            pass
        return b

    def mutate(self, seed: bytes, seeds: list, rng: random.Random):
        """(mutated bytes, whether the checksums were recomputed)."""
        if rng.random() < 0.03:  # raw random bytes, sometimes with a valid magic + version
            n = rng.choice((0, 1, 7, 80, 81, 200, 1000))
            b = bytearray(rng.randrange(256) for _ in range(n))
            if n >= 6 and rng.random() < 0.7:
                b[0:6] = b"TRSC\x01\x00"
            return bytes(b), False
        b = bytearray(seed)
        for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4))):
            r = rng.random()
            if r < 0.30:
                fields = self._fields(b)
                if fields:
                    off, w = rng.choice(fields)
                    _put(b, off, w, _limit(rng, w, _get(b, off, w)))
            elif r < 0.55:
                _flip_bits(b, rng)
            elif r < 0.65:
                _set_bytes(b, rng)
            elif r < 0.75:
                b = _truncate_or_extend(b, rng)
            elif r < 0.85:
                b = _splice(b, rng.choice(seeds), rng)
            elif r < 0.93 and len(b) > 80:  # damage inside the chunk records / raw section only
                exp_pos = _get(b, 40, 8)
                if exp_pos < len(b):
                    _flip_bits(b, rng, exp_pos)
            elif len(b) >= 80 and len(b) >= 80 + 8 * min(b[8], 8) + 256 and b[7] == 1:  # code-length table
                pos = 80 + 8 * min(b[8], 8)
                for _ in range(rng.randint(1, 4)):
                    b[pos + rng.randrange(256)] = rng.choice((0, 1, 2, 11, 12, 13, 255, rng.randrange(16)))
        forged = rng.random() < 0.5
        if forged:
            b = self.fix_crcs(b)
        return bytes(b), forged

    # ---- the oracle ----
    def run(self, blob: bytes, forged: bool | None, expect) -> str:
        """forged: whether the case's checksums were recomputed (None: unknown, e.g. a replayed file, then
        any accepted stream must match the reference decoder). expect: the seed's decoded bits, or None."""
        lib = self.lib
        stream = torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob else torch.empty(0, dtype=torch.uint8)
        header, out = _call(lib._codec_header, stream)
        if out:
            self._expect_from_bytes_rejects(blob)
            return out
        table, out = _call(lib._codec_decode_table, stream)
        if out:
            self._expect_from_bytes_rejects(blob)
            return out
        ct = tersor.codec.CompressedTensor(stream, table, header)
        shape = list(ct.shape)
        r_fast, out_fast = _call(lib.codec_decode, stream, table, header, ct.dtype, shape, False)
        r_ver, out_ver = _call(lib.codec_decode, stream, table, header, ct.dtype, shape, True)
        fb, out_fb = _call(tersor.codec.CompressedTensor.from_bytes, blob)
        if (out_ver is None) != (out_fb is None):
            raise Finding(f"codec_decode(verify=True) -> {out_ver or 'ok'} but from_bytes -> {out_fb or 'ok'}")
        if out_ver is not None:
            return out_ver
        if out_fast is not None:
            raise Finding(f"codec_decode: verify=True accepts the stream, verify=False raises {out_fast}")
        if not _bits_equal(r_fast, r_ver):
            raise Finding("codec_decode: verify=False and verify=True decode the same stream differently")
        if not _bits_equal(fb._decode(verify=False), r_ver):
            raise Finding("from_bytes(...).decode differs from codec_decode")
        if ct.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2) and len(shape) == 2 and shape[1] > 0:
            x = torch.randn(2, shape[1], generator=torch.Generator().manual_seed(0)).to(ct.dtype)
            y, out = _call(lib.codec_linear, x, stream, table, header, ct.dtype, shape, None)
            if out is not None:
                raise Finding(f"codec_linear raises {out} on a stream codec_decode accepts")
            if not _bits_equal(y, F.linear(x, r_ver)):
                raise Finding("codec_linear differs from decode + F.linear")
        if expect is not None and _bits_equal(r_ver, expect):
            return "same"
        if forged is False and blob not in self.known_streams:  # (a splice can copy another seed whole)
            raise Finding("a mutated stream with its original checksums decodes (verify=True) to a different result")
        try:
            want = self.ref.decode(blob)
        except Exception as err:  # noqa: BLE001
            raise Finding(f"tersor accepts a stream the reference decoder rejects ({type(err).__name__}: {err})")
        if not _bits_equal(r_ver, want):
            raise Finding("tersor's decode differs from the reference decoder's on an accepted stream")
        return "other"

    def _expect_from_bytes_rejects(self, blob):
        _, out = _call(tersor.codec.CompressedTensor.from_bytes, blob)
        if out is None:
            raise Finding("from_bytes accepts a stream _codec_header/_codec_decode_table reject")

    # ---- files ----
    def save_case(self, case, path: Path):
        path.write_bytes(case[0])

    def load_case(self, path: Path):
        return (path.read_bytes(), None)

    def run_case(self, case, expect):
        return self.run(case[0], case[1], expect)


# ============================================================================== generic tensor mutations
_INT_LIMITS = {  # per integer dtype: the limits that fit, plus small values
    "int8": (0, 1, -1, 127, -128, 2, 3),
    "int16": (0, 1, -1, 32767, -32768, 255, 256),
    "int32": (0, 1, -1, 2**31 - 1, -(2**31), 2**16, 15, 16, 17),
    "int64": (0, 1, -1, 2**31 - 1, 2**31, 2**32, 2**63 - 1, -(2**63)),
    "uint8": (0, 1, 255, 128),
}
_FLOAT_SPECIALS = (0.0, -0.0, 1.0, -1.0, float("inf"), -float("inf"), float("nan"), 65504.0, 1e30, 1e-30)
_DTYPE_SWAPS = ("float32", "float16", "bfloat16", "float64", "int8", "int16", "int32", "int64", "uint8", "bool")


def _dtype(name):
    return getattr(torch, name)


def _dname(t) -> str:
    return str(t.dtype).replace("torch.", "")


def mutate_tensor(t, rng: random.Random, pool: list):
    """One structure-aware mutation of a tensor: contents (bit flips, limit values, specials), shape
    (truncate, extend, reshape, empty, extra dims), strides (a non-contiguous view of the same values),
    dtype, or a splice from another seed's tensor."""
    r = rng.random()
    t = t.clone(memory_format=torch.contiguous_format)
    if r < 0.25 and t.numel():  # bit flips in the raw bytes
        raw = t.view(-1).view(torch.uint8) if t.dtype != torch.bool else t.view(torch.uint8).view(-1)
        for _ in range(rng.choice((1, 1, 2, 4, 16))):
            i = rng.randrange(raw.numel())
            raw[i] ^= 1 << rng.randrange(8)
        return raw.view(t.dtype).view(t.shape) if t.dtype != torch.bool else raw.view(torch.bool).view(t.shape)
    if r < 0.45 and t.numel():  # limit / special values into a few elements
        flat = t.view(-1)
        for _ in range(rng.choice((1, 1, 2, 8))):
            i = rng.randrange(flat.numel())
            if t.dtype.is_floating_point:
                flat[i] = rng.choice(_FLOAT_SPECIALS)
            elif t.dtype == torch.bool:
                flat[i] = not bool(flat[i])
            else:
                flat[i] = rng.choice(_INT_LIMITS.get(_dname(t), (0, 1)))
        return t
    if r < 0.60 and t.dim():  # truncate or extend along one dim
        d = rng.randrange(t.dim())
        n = t.shape[d]
        if rng.random() < 0.6 and n:
            k = rng.choice((1, max(1, n // 2), n))
            return t.narrow(d, 0, n - k) if rng.random() < 0.5 else t.narrow(d, k, n - k)
        k = rng.choice((1, n or 1, 16))
        return torch.cat([t, t.narrow(d, 0, min(k, n)) if n else t.new_zeros([*t.shape[:d], k, *t.shape[d + 1:]])], d)
    if r < 0.70:  # reshape to another shape of the same numel, add/drop a dim, or empty
        c = rng.random()
        if c < 0.3:
            return t.reshape(-1)
        if c < 0.5:
            return t.unsqueeze(rng.randrange(t.dim() + 1))
        if c < 0.7 and t.dim() >= 2:
            return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])
        if c < 0.85:
            return t.new_zeros([0] + list(t.shape[1:]))
        return t.reshape(*t.shape[::-1]) if t.dim() >= 2 else t
    if r < 0.80 and t.dim() >= 1:  # same values, non-contiguous strides
        if t.dim() >= 2:
            return t.transpose(-1, -2).contiguous().transpose(-1, -2)
        big = torch.zeros(t.numel() * 2, dtype=t.dtype)
        big[::2] = t
        return big[::2]
    if r < 0.90:  # another dtype
        to = _dtype(rng.choice(_DTYPE_SWAPS))
        try:
            return t.to(to)
        except (RuntimeError, TypeError):
            return t
    # splice: another seed's tensor (any key) in its place
    other = rng.choice(pool)
    return other.clone()


class TensorTarget:
    """Shared machinery of the tensor-format targets: cases are dicts of tensors (plus ints), seeds are
    .pt files, mutations pick keys and apply mutate_tensor / limit values to int fields."""

    int_fields: tuple = ()
    keys: tuple = ()

    def load_seed(self, path: Path):
        return torch.load(path, weights_only=True)

    def save_case(self, case, path: Path):
        torch.save(case[0], path)

    def load_case(self, path: Path):
        return (torch.load(path, weights_only=True), None)

    def run_case(self, case, expect):
        return self.run(case[0], expect)

    def mutate(self, seed: dict, seeds: list, rng: random.Random):
        case = {k: (v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)) for k, v in seed.items()}
        pool = [v for s in seeds for v in s.values() if isinstance(v, torch.Tensor)]
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            tkeys = [k for k in self.keys if isinstance(case.get(k), torch.Tensor)]
            r = rng.random()
            if r < 0.12 and self.int_fields:
                k = rng.choice(self.int_fields)
                v = case.get(k)
                if isinstance(v, list) and v:
                    i = rng.randrange(len(v))
                    v[i] = rng.choice(LIMITS + (v[i] + 1, v[i] - 1, v[i] * 2))
                elif isinstance(v, int):
                    case[k] = rng.choice(LIMITS + (v + 1, v - 1, v * 2, v // 2))
            elif r < 0.16 and len(tkeys) >= 2:  # two tensors swapped
                a, b = rng.sample(tkeys, 2)
                case[a], case[b] = case[b], case[a]
            elif r < 0.18 and tkeys and self.optional_keys():
                case.pop(rng.choice(self.optional_keys()), None)
            elif tkeys:
                k = rng.choice(tkeys)
                case[k] = self.mutate_key(k, case[k], rng, pool)
        return case, None

    def optional_keys(self):
        return ()

    def mutate_key(self, key, t, rng, pool):
        return mutate_tensor(t, rng, pool)


# ================================================================================================ sparse24
class Sparse24Target(TensorTarget):
    """2:4 v1: values [M/16, K/32, 256] and meta [M/16, K/64, 32] through tersor.sparse.load_2_4, then
    decompress_2_4 and linear_2_4, checked against a pure-torch reference unpacker written from
    docs/formats.md (any values are valid values, any of the 6 ordered nibbles a valid position pair: a
    mutation load_2_4 accepts legitimately decodes to another weight, which the reference must agree with).
    The ops are also called directly on the unvalidated tensors (they check shapes and dtypes only, contents
    are load_2_4's job): they must raise ValueError/TypeError or return, never crash."""

    name = "sparse24"
    keys = ("values", "meta", "bias")
    int_fields = ("shape",)

    @staticmethod
    def write_seeds(out: Path):
        from tersor.sparse import compress_2_4, prune_2_4

        g = torch.Generator().manual_seed(24)
        for name, (m, k, dt) in {"f16_16x64": (16, 64, torch.float16), "bf16_32x128": (32, 128, torch.bfloat16),
                                 "f32_16x128": (16, 128, torch.float32)}.items():
            w = prune_2_4(torch.randn(m, k, generator=g).to(dt))
            w[0, :8] = 0  # chunks with fewer than 2 non-zeros (explicit zeros at the lowest free positions)
            p = compress_2_4(w)
            torch.save({"values": p.values, "meta": p.meta, "bias": torch.randn(m, generator=g).to(dt),
                        "shape": [m, k]}, out / f"{name}.pt")

    def optional_keys(self):
        return ("bias", "shape")

    def mutate_key(self, key, t, rng, pool):
        if key == "meta" and rng.random() < 0.5 and t.numel() and t.dtype == torch.int32:  # nibbles
            t = t.clone(memory_format=torch.contiguous_format)
            flat = t.view(-1)
            for _ in range(rng.choice((1, 2, 4))):
                i, s = rng.randrange(flat.numel()), 4 * rng.randrange(8)
                nib = rng.choice((0b0100, 0b1000, 0b1001, 0b1100, 0b1101, 0b1110, 0, 0b0001, 0b0101, 0b1111,
                                  rng.randrange(16)))
                v = ((int(flat[i]) & 0xFFFFFFFF) & ~(0xF << s)) | (nib << s)
                flat[i] = v - (1 << 32) if v >= 2**31 else v
            return t
        return mutate_tensor(t, rng, pool)

    _maps: dict = {}

    def reference_dense(self, values, meta):
        """Unpacks format v1 by its formulas (docs/formats.md), vectorized; not tersor's code."""
        mb, kt, _ = values.shape
        M, K = mb * 16, kt * 32
        key = (M, K)
        if key not in self._maps:
            r = torch.arange(M).view(M, 1, 1)
            c = torch.arange(K // 4).view(1, K // 4, 1)
            j = torch.arange(2).view(1, 1, 2)
            kc = 2 * c + j
            rho, kappa = r % 16, kc % 16
            g = rho % 8
            lane = 4 * g + (kappa % 8) // 2
            slot = (kappa % 2) + 2 * (rho // 8) + 4 * (kappa // 8)
            flat = ((r // 16) * (K // 32) + kc // 16) * 256 + 8 * lane + slot
            gamma = c % 16
            mlane = 4 * g + 2 * (gamma // 8) + (gamma % 8) // 4
            word = ((r // 16) * (K // 64) + c // 16) * 32 + mlane
            bit = 16 * (rho // 8) + 4 * (gamma % 4)
            self._maps[key] = (flat, word[..., 0], bit[..., 0])
        flat, word, bit = self._maps[key]
        # On the integer view: torch's float16 scatter/indexing quiets signaling NaNs, the format moves bits.
        bits = {2: torch.int16, 4: torch.int32}[values.element_size()]
        v = values.view(bits).reshape(-1)[flat.reshape(-1)].reshape(M, K // 4, 2)
        nib = (meta.reshape(-1).to(torch.int64)[word.reshape(-1)].reshape(M, K // 4) >> bit.reshape(M, K // 4)) & 0xF
        pos = torch.stack([nib & 3, nib >> 2], -1)  # [M, K/4, 2]
        dense = torch.zeros(M, K // 4, 4, dtype=bits)
        dense.scatter_(2, pos, v)
        return dense.reshape(M, K).view(values.dtype)

    def run(self, case: dict, expect) -> str:
        from tersor.sparse import decompress_2_4, linear_2_4, load_2_4

        values, meta, bias, shape = case.get("values"), case.get("meta"), case.get("bias"), case.get("shape")
        # the ops straight on the unvalidated tensors: memory safety, typed errors
        if isinstance(values, torch.Tensor) and isinstance(meta, torch.Tensor):
            _call(tersor.ops.sparse24_decompress, values, meta)
            if values.dim() == 3:
                x = torch.randn(3, values.shape[1] * 32).to(values.dtype) if values.dtype.is_floating_point else \
                    torch.zeros(3, values.shape[1] * 32)
                _call(tersor.ops.sparse24_linear, x, values, meta, bias if isinstance(bias, torch.Tensor) else None)
        w, out = _call(load_2_4, values, meta, tuple(shape) if isinstance(shape, list) else None)
        if out:
            return out
        dense, out = _call(decompress_2_4, w)
        if out:
            raise Finding(f"decompress_2_4 raises {out} on a weight load_2_4 accepted")
        want = self.reference_dense(values.contiguous(), meta.contiguous())
        if not _bits_equal(dense, want):
            raise Finding("decompress_2_4 differs from the reference unpacker on a weight load_2_4 accepted")
        M, K = dense.shape
        x = torch.randn(5, K, generator=torch.Generator().manual_seed(1)).to(values.dtype)
        b = bias if isinstance(bias, torch.Tensor) else None
        y, out = _call(linear_2_4, x, w, b)
        if out:
            ok_bias = b is None or (b.dtype == values.dtype and tuple(b.shape) == (M,))
            if ok_bias:
                raise Finding(f"linear_2_4 raises {out} on a weight load_2_4 accepted")
            return out
        ref = x.float() @ want.float().T + (b.float() if b is not None else 0)
        tol = 1e-5 if values.dtype == torch.float32 else 1e-2
        if not _close(y.float(), ref.to(y.dtype).float(), rtol=tol, atol=tol * (1 + float(ref.abs().nan_to_num().max()))):
            raise Finding("linear_2_4 differs from x @ reference_dense.T on a weight load_2_4 accepted")
        if expect is not None and _bits_equal(dense, expect):
            return "same"
        return "other"

    def seed_info(self, case):
        from tersor.sparse import decompress_2_4, load_2_4

        return decompress_2_4(load_2_4(case["values"], case["meta"]))


# ===================================================================================================== bsr
class BsrTarget(TensorTarget):
    """BSR v1 state dicts (crow_indices, col_indices, values, schedule, shape, format, version) through
    tersor.sparse.load_bsr and bsr_linear, checked against x @ W.T with W scattered from the (accepted)
    indices in plain torch. bsr_linear is also called on the unvalidated tensors: the CPU op re-checks the
    indices on every call, so it must either raise ValueError/TypeError or return exactly what the
    reference computes from those indices (duplicate columns summed)."""

    name = "bsr"
    keys = ("crow_indices", "col_indices", "values", "schedule")
    int_fields = ("shape", "version")

    def optional_keys(self):  # a state dict with an entry missing
        return ("schedule", "col_indices", "shape", "format")

    @staticmethod
    def write_seeds(out: Path):
        from tersor.sparse import to_bsr

        g = torch.Generator().manual_seed(5)
        for name, (n, k, bs, dt, chunk) in {"f32_bs16": (64, 48, 16, torch.float32, 1),
                                             "bf16_bs32": (64, 64, 32, torch.bfloat16, None),
                                             "f16_bs16_split": (32, 96, 16, torch.float16, 2)}.items():
            keep = torch.rand(n // bs, k // bs, generator=g) < 0.6
            keep[1] = False  # an empty block row
            keep[0] = True  # a row split into several chunks
            w = torch.randn(n, k, generator=g) * keep.repeat_interleave(bs, 0).repeat_interleave(bs, 1)
            state = to_bsr(w.to(dt), bs, chunk_blocks=chunk).state_dict()
            torch.save(state, out / f"{name}.pt")

    def mutate_key(self, key, t, rng, pool):
        if key in ("crow_indices", "col_indices", "schedule") and rng.random() < 0.5 and t.numel() \
                and not t.dtype.is_floating_point:
            t = t.clone(memory_format=torch.contiguous_format)
            i = rng.randrange(t.numel())
            try:
                t.view(-1)[i] = rng.choice((0, 1, -1, 2**31 - 1, -(2**31), int(t.view(-1)[i]) + 1,
                                            int(t.view(-1)[i]) - 1, t.numel(), t.numel() + 1))
            except RuntimeError:  # the value does not fit this (mutated) dtype
                pass
            return t
        return mutate_tensor(t, rng, pool)

    @staticmethod
    def reference_dense(crow, col, values, n, k):
        bs = values.shape[1]
        w = torch.zeros(n // bs, k // bs, bs, bs, dtype=torch.float64)
        rows = torch.repeat_interleave(torch.arange(n // bs), crow[1:].long() - crow[:-1].long())
        w.index_put_((rows, col.long()), values.double(), accumulate=True)
        return w.permute(0, 2, 1, 3).reshape(n, k)

    def run(self, case: dict, expect) -> str:
        from tersor.sparse.bsr import bsr_linear, load_bsr

        crow, col, values, schedule = (case.get(k) for k in self.keys)
        shape = case.get("shape")
        gen = torch.Generator().manual_seed(2)
        # the op straight on the unvalidated indices (it re-checks them on every call)
        if all(isinstance(t, torch.Tensor) for t in (crow, col, values, schedule)) and isinstance(shape, list) \
                and len(shape) == 2 and all(isinstance(v, int) for v in shape):
            k = shape[1]
            if values.dtype.is_floating_point and 0 < k < 4096:
                x = torch.randn(3, k, generator=gen).to(values.dtype)
                y, out = _call(tersor.ops.lib.bsr_linear, x, crow, col, values, schedule, k, None)
                if out is None:
                    bs = values.shape[1]
                    n = (crow.numel() - 1) * bs
                    want = x.double() @ self.reference_dense(crow, col, values, n, k).T
                    if not _close(y.double(), want.to(y.dtype).double(), rtol=1e-2, atol=1e-2 * (1 + float(
                            want.abs().nan_to_num().max()))):
                        raise Finding("bsr_linear (unvalidated indices) differs from the reference")
        w, out = _call(load_bsr, case)
        if out:
            return out
        n, k = w.shape
        x = torch.randn(4, k, generator=gen).to(w.dtype)
        bias = torch.randn(n, generator=gen).to(w.dtype)
        y, out = _call(bsr_linear, x, w, bias)
        if out:
            raise Finding(f"bsr_linear raises {out} on a weight load_bsr accepted")
        dense = self.reference_dense(w.crow_indices, w.col_indices, w.values, n, k)
        want = x.double() @ dense.T + bias.double()
        if not _close(y.double(), want.to(y.dtype).double(), rtol=1e-2,
                      atol=1e-2 * (1 + float(want.abs().nan_to_num().max()))):
            raise Finding("bsr_linear differs from x @ reference_dense.T on a weight load_bsr accepted")
        got_dense = w.to_dense()
        if expect is not None and _bits_equal(got_dense, expect):
            return "same"
        return "other"

    def seed_info(self, case):
        from tersor.sparse.bsr import load_bsr

        return load_bsr(case).to_dense()


# ==================================================================================================== aqlm
class AqlmTarget(TensorTarget):
    """AQLM codes [out, in/8, C] (int8/int16), codebooks [C, 2^b, 1, 8], scales [out, 1, 1, 1], bias, through
    AQLMLinear (its validators) and tersor.ops.aqlm_decode / aqlm_linear (directly too, on the unvalidated
    tensors), checked against tersor.quant.aqlm_dequantize_reference (plain torch indexing). Every code is a
    valid code (index = code mod 2^b), so an accepted mutation legitimately decodes to another weight; what is
    checked is that tersor decodes exactly what the reference reads from those tensors."""

    name = "aqlm"
    keys = ("codes", "codebooks", "scales", "bias")

    @staticmethod
    def write_seeds(out: Path):
        from tersor.quant.aqlm import quantize_aqlm

        g = torch.Generator().manual_seed(8)
        for name, (m, k, books, nbits, cdt) in {"2x4_f16": (16, 32, 2, 4, torch.float16),
                                                  "1x9_bf16": (8, 24, 1, 9, torch.bfloat16),
                                                  "3x3_f32": (8, 16, 3, 3, torch.float32)}.items():
            w = torch.randn(m, k, generator=g)
            q = quantize_aqlm(w, num_codebooks=books, nbits=nbits, in_group_size=8, out_group_size=1,
                              codebook_dtype=cdt, iters=0, kmeans_iters=1, beam_size=1)
            torch.save({"codes": q["codes"], "codebooks": q["codebooks"], "scales": q["scales"],
                        "bias": torch.randn(m, generator=g).to(cdt)}, out / f"{name}.pt")

    def optional_keys(self):
        return ("bias",)

    def mutate_key(self, key, t, rng, pool):
        if key == "codes" and rng.random() < 0.3 and t.numel():  # codes to their limits (signed storage)
            t = t.clone(memory_format=torch.contiguous_format)
            for _ in range(rng.choice((1, 4))):
                t.view(-1)[rng.randrange(t.numel())] = rng.choice(_INT_LIMITS[_dname(t)] if _dname(t) in _INT_LIMITS
                                                                  else (0, 1))
            return t
        return mutate_tensor(t, rng, pool)

    def run(self, case: dict, expect) -> str:
        from tersor.nn import AQLMLinear
        from tersor.quant.aqlm import aqlm_dequantize_reference

        codes, books, scales, bias = (case.get(k) for k in self.keys)
        gen = torch.Generator().manual_seed(3)
        tensors = all(isinstance(t, torch.Tensor) for t in (codes, books, scales))
        if tensors:  # the ops on the unvalidated tensors
            d, out = _call(tersor.ops.aqlm_decode, codes, books, scales, torch.float32)
            if out is None:
                ref, rout = _call(aqlm_dequantize_reference, codes, books, scales)
                if rout is None and not _close(d, ref.float(), rtol=1e-2, atol=1e-2):
                    raise Finding("aqlm_decode (unvalidated tensors) differs from aqlm_dequantize_reference")
                x = torch.randn(2, d.shape[1], generator=gen)
                _call(tersor.ops.aqlm_linear, x, codes, books, scales, None)
        layer, out = _call(AQLMLinear, codes, books, scales, bias)
        if out:
            return out
        w, out = _call(layer.dequantize, torch.float32)
        if out:
            raise Finding(f"AQLMLinear.dequantize raises {out} on a layer that constructed")
        ref = aqlm_dequantize_reference(layer.codes, layer.codebooks, layer.scales)
        if not _close(w, ref.float(), rtol=1e-2, atol=1e-2 * (1 + float(ref.float().abs().nan_to_num().max()))):
            raise Finding("AQLMLinear.dequantize differs from aqlm_dequantize_reference")
        ref_orig, rout = _call(aqlm_dequantize_reference, codes, books,
                               scales.expand(codes.shape[0], 1, 1, 1) if tuple(scales.shape) == (1, 1, 1, 1) else scales)
        if rout is None and not _close(w, ref_orig.float(), rtol=1e-2,
                                       atol=1e-2 * (1 + float(ref_orig.float().abs().nan_to_num().max()))):
            raise Finding("AQLMLinear (after its layout conversions) decodes differently from its input tensors")
        for dt in (torch.float32, torch.bfloat16):
            x = torch.randn(3, layer.in_features, generator=gen).to(dt)
            y, out = _call(layer, x)
            if out:
                raise Finding(f"AQLMLinear.forward raises {out} on a layer that constructed")
            want = x.double() @ ref.double().T + (layer.bias.double() if layer.bias is not None else 0)
            if not _close(y.double(), want.to(dt).double(), rtol=2e-2,
                          atol=2e-2 * (1 + float(want.abs().nan_to_num().max()))):
                raise Finding(f"AQLMLinear.forward ({dt}) differs from x @ reference.T")
        if expect is not None and _bits_equal(w, expect):
            return "same"
        return "other"

    def seed_info(self, case):
        from tersor.nn import AQLMLinear

        return AQLMLinear(case["codes"], case["codebooks"], case["scales"], case.get("bias")).dequantize(torch.float32)


# ===================================================================================================== e8p
class E8pTarget(TensorTarget):
    """QuIP# E8P12 states (Qidxs [m, n/32 | 3n/64 | n/16] int64, SU [n], SV [m], Wscale, bias, resid_scale)
    through E8PLinear (its validators) and tersor.ops.e8p_decode / e8p_linear (directly too, with in_features
    pushed to limits), checked against tersor.quant.quipsharp.decode_qidxs (plain torch) and dequantize_e8p.
    Every 16-bit code is a valid E8P code, so an accepted mutation legitimately decodes to another weight."""

    name = "e8p"
    # codebook_id: the declared layout (issue 19: a state without it is refused; mutated like the rest)
    keys = ("Qidxs", "SU", "SV", "Wscale", "bias", "resid_scale", "codebook_id")
    int_fields = ("in_features",)

    @staticmethod
    def write_seeds(out: Path):
        from tersor.quant.quipsharp import quantize_e8p

        g = torch.Generator().manual_seed(88)
        for name, (m, n, bits) in {"2bit_16x64": (16, 64, 2), "3bit_32x64": (32, 64, 3),
                                   "4bit_16x128": (16, 128, 4)}.items():
            st = quantize_e8p(torch.randn(m, n, generator=g), bits=bits, seed=1)
            st = {k: v for k, v in st.items()}
            st["resid_scale"] = torch.tensor({2: 1.0, 3: 2.04, 4: 3.45}[bits])  # as E8PLinear's state dict has it
            st["bias"] = torch.randn(m, generator=g)
            st["in_features"] = n
            torch.save(st, out / f"{name}.pt")

    def optional_keys(self):
        return ("bias", "Wscale", "resid_scale", "codebook_id")

    def mutate_key(self, key, t, rng, pool):
        if key == "Qidxs" and rng.random() < 0.3 and t.numel() and t.dtype == torch.int64:
            t = t.clone(memory_format=torch.contiguous_format)
            for _ in range(rng.choice((1, 4))):
                t.view(-1)[rng.randrange(t.numel())] = rng.choice(_INT_LIMITS["int64"] + (rng.getrandbits(63),))
            return t
        return mutate_tensor(t, rng, pool)

    def run(self, case: dict, expect) -> str:
        from tersor.nn import E8PLinear
        from tersor.quant.quipsharp import decode_qidxs, dequantize_e8p

        q, n = case.get("Qidxs"), case.get("in_features")
        gen = torch.Generator().manual_seed(4)
        if isinstance(q, torch.Tensor) and isinstance(n, int):  # the ops on the unvalidated tensors
            d, out = _call(tersor.ops.e8p_decode, q, n, None, torch.float32)
            if out is None:
                ref, rout = _call(decode_qidxs, q, n)
                if rout is None and not _close(d, ref, rtol=1e-6, atol=1e-6):
                    raise Finding("e8p_decode (unvalidated Qidxs) differs from decode_qidxs")
                x = torch.randn(2, n, generator=gen)
                _call(tersor.ops.e8p_linear, x, q, n, None)
        state = {k: case[k] for k in self.keys if k in case and k != "bias"}
        layer, out = _call(E8PLinear, state, case.get("bias"))
        if out:
            return out
        x = torch.randn(3, layer.in_features, generator=gen)
        y, out = _call(layer, x)
        if out:
            raise Finding(f"E8PLinear.forward raises {out} on a layer that constructed")
        st = {"Qidxs": layer.Qidxs, "SU": layer.SU.float(), "SV": layer.SV.float(), "Wscale": layer.Wscale}
        w = dequantize_e8p(st, bits=layer.bits, hadamard=layer.hadamard) if layer.bits == 2 else None
        if w is not None:
            want = x.double() @ w.double().T + (layer.bias.double() if layer.bias is not None else 0)
            if not _close(y.double(), want, rtol=1e-3, atol=1e-3 * (1 + float(want.abs().nan_to_num().max()))):
                raise Finding("E8PLinear.forward differs from x @ dequantize_e8p(state).T")
        what = decode_qidxs(layer.Qidxs, layer.in_features)
        if expect is not None and _bits_equal(what, expect):
            return "same"
        return "other"

    def seed_info(self, case):
        from tersor.quant.quipsharp import decode_qidxs

        return decode_qidxs(case["Qidxs"], case["in_features"])


# ================================================================================================ manifest
def _tiny_model():
    """A fresh tiny model with one layer per tersor format, plain nn.Linear everywhere (what tersor.load
    fills), a LayerNorm and a non-persistent buffer."""
    _lazy_imports()
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.e8p = nn.Linear(64, 16)
            self.aqlm = nn.Linear(16, 16, bias=False)
            self.s24 = nn.Linear(64, 16)
            self.bsr = nn.Linear(32, 32)
            self.codec = nn.Linear(32, 16)
            self.norm = nn.LayerNorm(16)
            self.register_buffer("pos", torch.arange(4), persistent=False)

        def forward(self, x):  # x [B, 64]
            h = self.e8p(x) + self.s24(x)
            h = self.aqlm(h)
            h2 = self.bsr(torch.cat([h, h], -1))
            return self.norm(self.codec(h2) + h) * (1 + self.pos.sum())

    torch.manual_seed(0)
    return Tiny().eval()


class ManifestTarget:
    """tersor checkpoint v1 (tersor.save: model.safetensors + tersor_manifest.json), loaded with tersor.load
    into a fresh tiny model. Mutations: the manifest's JSON (values replaced by other types, limits, deleted
    keys, raw byte damage), the safetensors header (its length, dtypes, shapes, data offsets) and data bytes,
    and consistent rewrites of one tensor in both files (shape/dtype/value mutations that reach the layers'
    own validators). A load that succeeds must give a model whose forward runs; it must equal the seed's
    output when the tensors (read independently with safetensors) and the manifest (JSON-equal, ignoring the
    informational tersor_version/torch_version) are the seed's. Tensor data has no checksum: other data
    legitimately loads as another model ("other")."""

    name = "manifest"

    @staticmethod
    def write_seeds(out: Path):
        from tersor.nn import AQLMLinear, CompressedLinear, E8PLinear, SparseLinear

        m = _tiny_model()
        m.e8p = E8PLinear.from_linear(m.e8p, bits=2)
        m.aqlm = AQLMLinear.from_linear(m.aqlm, num_codebooks=1, nbits=4, iters=0, kmeans_iters=1, beam_size=1)
        m.s24 = SparseLinear.from_linear(m.s24, pattern="2:4", dtype=torch.float32)
        m.bsr = SparseLinear.from_linear(m.bsr, pattern="bsr", blocksize=16, density=0.5)
        m.codec = CompressedLinear.from_linear(m.codec, chunk_elems=128)
        with tempfile.TemporaryDirectory() as d:
            tersor.save(m, d)
            blob = ManifestTarget.pack(Path(d, "tersor_manifest.json").read_bytes(),
                                       Path(d, "model.safetensors").read_bytes())
        (out / "tiny_all_formats.tck").write_bytes(blob)

    @staticmethod
    def pack(manifest: bytes, st: bytes) -> bytes:
        return struct.pack("<Q", len(manifest)) + manifest + st

    @staticmethod
    def unpack(blob: bytes):
        if len(blob) < 8:
            return b"", b""
        n = min(struct.unpack_from("<Q", blob)[0], len(blob) - 8)
        return blob[8:8 + n], blob[8 + n:]

    def load_seed(self, path: Path):
        return path.read_bytes()

    def save_case(self, case, path: Path):
        path.write_bytes(case[0])

    def load_case(self, path: Path):
        return (path.read_bytes(), None)

    def run_case(self, case, expect):
        return self.run(case[0], expect)

    # ---- mutation ----
    @staticmethod
    def _st_split(st: bytes):
        if len(st) < 8:
            return None
        n = struct.unpack_from("<Q", st)[0]
        if n > len(st) - 8:
            return None
        try:
            return json.loads(st[8:8 + n]), st[8 + n:]
        except ValueError:
            return None

    @staticmethod
    def _st_join(header: dict, data: bytes) -> bytes:
        h = json.dumps(header, separators=(",", ":")).encode()
        h += b" " * (-len(h) % 8)
        return struct.pack("<Q", len(h)) + h + data

    def _mutate_json(self, obj, rng: random.Random):
        """One mutation at a random path of a JSON document (in place; returns the new root)."""
        paths = []

        def walk(o, p):
            paths.append(p)
            if isinstance(o, dict):
                for k, v in o.items():
                    walk(v, p + (k,))
            elif isinstance(o, list):
                for i, v in enumerate(o):
                    walk(v, p + (i,))

        walk(obj, ())
        p = rng.choice(paths)
        parent = obj
        for k in p[:-1]:
            parent = parent[k]
        cur = parent[p[-1]] if p else obj
        r = rng.random()
        if isinstance(cur, bool) or cur is None:
            new = rng.choice((not cur if isinstance(cur, bool) else True, None, 0, 1, "x", [], {}))
        elif isinstance(cur, int):
            new = rng.choice(LIMITS + (cur + 1, cur - 1, -cur, cur * 2, float(cur), str(cur), None, True))
        elif isinstance(cur, float):
            new = rng.choice((0.0, -1.0, 1e308, float("nan"), float("inf"), -0.0, 1, None, "1.0"))
        elif isinstance(cur, str):
            new = rng.choice(("", "float32", "int64", "bfloat16", "float8_e4m3fn", "complex64", "e8p", "aqlm",
                              "sparse", "codec", "2:4", "bsr", "../model.safetensors", "/etc/passwd",
                              cur + ".", cur[:-1], "x" * 1000, 0, None, [cur]))
        elif isinstance(cur, list):
            if r < 0.3 and cur:
                new = cur[:-1]
            elif r < 0.5 and cur:
                new = cur + [copy.deepcopy(rng.choice(cur))]
            elif r < 0.7:
                new = list(reversed(cur))
            else:
                new = rng.choice(([], {}, None, 0, "x"))
        else:  # dict
            if r < 0.4 and cur:
                k = rng.choice(list(cur))
                new = dict(cur)
                del new[k]
            elif r < 0.6 and cur:
                k = rng.choice(list(cur))
                new = dict(cur)
                new[k + "_"] = new[k]
            else:
                new = rng.choice(([], {}, None, 0, "x", [copy.deepcopy(cur)]))
        if not p:
            return new
        parent[p[-1]] = new
        return obj

    def mutate(self, seed: bytes, seeds: list, rng: random.Random):
        man, st = self.unpack(seed)
        r = rng.random()
        if r < 0.30:  # manifest JSON, structure-aware
            obj = json.loads(man)
            for _ in range(rng.choice((1, 1, 2, 3))):
                obj = self._mutate_json(obj, rng)
            man = json.dumps(obj, indent=1, allow_nan=True).encode()
        elif r < 0.40:  # manifest bytes
            b = bytearray(man)
            c = rng.random()
            if c < 0.4:
                _flip_bits(b, rng)
            elif c < 0.7:
                b = _truncate_or_extend(b, rng)
            else:
                b = _splice(b, man, rng)
            man = bytes(b)
        elif r < 0.60:  # safetensors header, structure-aware
            split = self._st_split(st)
            if split is not None:
                header, data = split
                for _ in range(rng.choice((1, 1, 2))):
                    if not isinstance(header, dict):
                        break
                    names = [k for k in header if k != "__metadata__"]
                    ent = header[rng.choice(names)] if names else None
                    if isinstance(ent, dict) and isinstance(ent.get("data_offsets"), list) and \
                            len(ent["data_offsets"]) == 2 and isinstance(ent.get("shape"), list) and \
                            rng.random() < 0.7:
                        c = rng.random()
                        if c < 0.4:
                            i = rng.randrange(2)
                            o = ent["data_offsets"][i] if isinstance(ent["data_offsets"][i], int) else 0
                            ent["data_offsets"][i] = rng.choice(LIMITS + (o + 1, o - 1, len(data)))
                        elif c < 0.7 and ent["shape"]:
                            i = rng.randrange(len(ent["shape"]))
                            d0 = ent["shape"][i] if isinstance(ent["shape"][i], int) else 1
                            ent["shape"][i] = rng.choice((0, 1, 2, d0 * 2, d0 + 1, 2**31, 2**32, 2**63 - 1))
                        elif c < 0.85:
                            ent["dtype"] = rng.choice(("F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL",
                                                       "F64", "F8_E4M3", "F8_E5M2", "U64", "XX"))
                        else:
                            header = self._mutate_json(header, rng)
                    else:
                        header = self._mutate_json(header, rng)
                if isinstance(header, dict):
                    st = self._st_join(header, data)
            else:
                _flip_bits(b := bytearray(st), rng, 0, min(len(st), 4096))
                st = bytes(b)
        elif r < 0.75:  # safetensors raw bytes: length field, header, data
            b = bytearray(st)
            c = rng.random()
            if c < 0.2:
                _put(b, 0, 8, _limit(rng, 8, _get(b, 0, 8)))
            elif c < 0.5:
                n = _get(b, 0, 8)
                _flip_bits(b, rng, min(8 + n, len(b)))  # data bytes: tensor values (no checksum)
            elif c < 0.7:
                b = _truncate_or_extend(b, rng)
            else:
                _flip_bits(b, rng)
            st = bytes(b)
        else:  # one tensor rewritten consistently in both files
            from safetensors.torch import load as st_load
            from safetensors.torch import save as st_save

            obj = json.loads(man)
            tensors = st_load(st)
            name = rng.choice(sorted(tensors))
            pool = list(tensors.values())
            t = mutate_tensor(tensors[name], rng, pool)
            tensors[name] = t.contiguous()
            for k, v in tensors.items():
                tensors[k] = v.contiguous()
            meta = {"format": "pt", "tersor-checkpoint": "1"}
            st = st_save(tensors, metadata=meta)
            spec = {"dtype": _dname(t), "shape": list(t.shape)}
            obj["tensors"][name] = spec
            for layer in obj.get("layers", []):
                pre = layer["fqn"] + "."
                if name.startswith(pre) and name[len(pre):] in layer["tensors"]:
                    layer["tensors"][name[len(pre):]] = dict(spec)
            man = json.dumps(obj, indent=1).encode()
        return self.pack(man, st), None

    # ---- the oracle ----
    def seed_info(self, blob: bytes):
        model, out = self._load(blob)
        return self._forward(model), self.unpack(blob)

    @staticmethod
    def _x():
        return torch.randn(3, 64, generator=torch.Generator().manual_seed(6))

    def _forward(self, model):
        with torch.no_grad():
            return model(self._x())

    _dir = None
    _template = None

    def _load(self, blob: bytes):
        # One directory for the process (in memory where /dev/shm exists), its two files rewritten per case,
        # and a deep copy of one fresh tiny model: a temporary directory on disk and a seeded model per case
        # were most of a case's time (file creation and rmdir ~5 ms each on this machine's disk), which kept
        # the sanitized run at ~80 cases/s. tersor.load sees the same files and model.
        if ManifestTarget._dir is None:
            shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
            ManifestTarget._dir = tempfile.mkdtemp(prefix="tersor-fuzz-manifest-", dir=shm)
            atexit.register(shutil.rmtree, ManifestTarget._dir, True)
            ManifestTarget._template = _tiny_model()
        man, st = self.unpack(blob)
        d = ManifestTarget._dir
        Path(d, "tersor_manifest.json").write_bytes(man)
        Path(d, "model.safetensors").write_bytes(st)
        return _call(tersor.load, copy.deepcopy(ManifestTarget._template), d)

    @staticmethod
    def _same_files(blob: bytes, seed_files) -> bool:
        from safetensors.torch import load as st_load

        man, st = ManifestTarget.unpack(blob)
        sman, sst = seed_files
        try:
            a, b = json.loads(man), json.loads(sman)
        except ValueError:
            return False
        if not isinstance(a, dict):
            return False
        for o in (a, b):
            o.pop("tersor_version", None)
            o.pop("torch_version", None)
        if a != b:
            return False
        try:
            ta, tb = st_load(st), st_load(sst)
        except Exception:  # noqa: BLE001
            return False
        return ta.keys() == tb.keys() and all(_bits_equal(ta[k], tb[k]) for k in ta)

    def run(self, blob: bytes, expect) -> str:
        model, out = self._load(blob)
        if out == "TypeError":  # no dtype reaches the caller here: a damaged checkpoint is a ValueError
            raise Finding(f"tersor.load raises TypeError on a damaged checkpoint (ValueError expected): {LAST_ERROR}")
        if out:
            return out
        y, out = _call(self._forward, model)
        if out:
            raise Finding(f"tersor.load accepted the checkpoint, the model's forward raises {out}")
        if expect is not None:
            want, seed_files = expect
            if self._same_files(blob, seed_files):
                if not _bits_equal(y, want):
                    raise Finding("the checkpoint's tensors and manifest are the seed's, the loaded model is not")
                return "same"
        return "other"


TARGET_CLASSES = {"codec": CodecTarget, "sparse24": Sparse24Target, "bsr": BsrTarget, "aqlm": AqlmTarget,
                  "e8p": E8pTarget, "manifest": ManifestTarget}


# ============================================================================================== the driver
class Fuzzer:
    """One target's seeds and its deterministic case generator: case i of run `seed` is a pure function of
    (target, seed, i), so a failing case can be regenerated from its index."""

    def __init__(self, target: str):
        _lazy_imports()
        torch.set_num_threads(1)
        self.target = TARGET_CLASSES[target]()
        files = sorted(p for p in (CORPUS / target).glob("*") if p.suffix == EXT[target])
        self.seed_files = [p for p in files if not p.name.startswith("crash-")]
        self.replay_files = [p for p in files if p.name.startswith("crash-")]
        if not self.seed_files:
            raise SystemExit(f"fuzz.py: no seeds in {CORPUS / target} (run scripts/fuzz.py --write-corpus)")
        self.seeds = [self.target.load_seed(p) for p in self.seed_files]
        if target == "codec":
            self.target.known_streams = set(self.seeds)
        self.expect = [self.target.seed_info(s) for s in self.seeds]
        # Every seed must pass as itself (a harness check, and it warms up every code path before timing).
        for p, s, e in zip(self.seed_files, self.seeds, self.expect):
            case = (s, False) if self.target.name == "codec" else (s, None)
            got = self.target.run_case(case, e)
            if got != "same":
                raise SystemExit(f"fuzz.py: seed {p} gives {got!r}, not 'same'")

    def case(self, run_seed: int, i: int):
        return self.case_from(random.Random(f"{self.target.name}:{run_seed}:{i}"))

    def case_from(self, rng: random.Random):
        k = rng.randrange(len(self.seeds))
        case = self.target.mutate(self.seeds[k], self.seeds, rng)
        return case, k

    def run_one(self, run_seed: int, i: int) -> str:
        case, k = self.case(run_seed, i)
        return self.target.run_case(case, self.expect[k])


def _save_failure(fz: Fuzzer, run_seed: int, i: int, out_dir: Path, why: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    case, _ = fz.case(run_seed, i)
    path = out_dir / f"crash-{fz.target.name}-s{run_seed}-i{i}{EXT[fz.target.name]}"
    fz.target.save_case(case, path)
    path.with_suffix(path.suffix + ".txt").write_text(why + "\n")
    return path


def worker(target: str, run_seed: int, start: int, stop: int, step: int, out_dir: Path):
    """Runs cases start, start + step, ... < stop; protocol on stdout: 'S i' before case i, 'E i outcome'
    after it, 'F i message' for a finding (the input is already saved)."""
    fz = Fuzzer(target)
    w = sys.stdout
    w.write("READY\n")
    w.flush()
    for i in range(start, stop, step):
        w.write(f"S {i}\n")
        w.flush()
        try:
            outcome = fz.run_one(run_seed, i)
            w.write(f"E {i} {outcome}\n")
        except Finding as f:
            path = _save_failure(fz, run_seed, i, out_dir, str(f))
            w.write(f"F {i} {str(f)[:300].replace(chr(10), ' ')} -> {path}\n")
        except Exception as err:  # noqa: BLE001 - a bug in the harness itself, or a mutation it cannot build
            w.write(f"F {i} harness error {type(err).__name__}: {str(err)[:200]} "
                    f"{traceback.format_exc().splitlines()[-3][:200]}\n".replace("\n", " ") + "\n")
        w.flush()


class Runner:
    """The parent: starts workers, enforces the per-case timeout, restarts after crashes, counts."""

    def __init__(self, args):
        self.args = args
        self.counts: dict[str, int] = {}
        self.failures: list[str] = []

    def _spawn(self, start: int, log):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", self.target, str(self.args.seed),
               str(start), str(self.stop), str(self.step), str(self.args.out)]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log)

    @staticmethod
    def _read_line(p, timeout):
        """The worker's next line ('' at EOF), or None if none completes within `timeout` s. Reads the pipe's
        fd directly with its own buffer: select() on a buffered file object misses lines already buffered."""
        buf = p._fuzz_buf = getattr(p, "_fuzz_buf", b"")
        end = time.time() + timeout
        while b"\n" not in buf:
            left = end - time.time()
            if left <= 0:
                return None
            r, _, _ = select.select([p.stdout], [], [], left)
            if not r:
                return None
            chunk = os.read(p.stdout.fileno(), 65536)
            if not chunk:
                p._fuzz_buf = b""
                return ""
            buf += chunk
            p._fuzz_buf = buf
        line, _, p._fuzz_buf = buf.partition(b"\n")
        return line.decode() + "\n"

    def _confirm_hang(self, i: int) -> bool:
        """Re-runs case i alone in a fresh worker (twice) with the same timeout: a hang only if it is slow
        every time (a loaded machine can stall one run for a second)."""
        return self._slow_again(i) and self._slow_again(i)

    def _slow_again(self, i: int) -> bool:
        log = open(os.devnull, "w")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", self.target, str(self.args.seed), str(i),
               str(i + 1), "1", str(self.args.out)]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log)
        try:
            line = self._read_line(p, 300)
            if line != "READY\n":
                return True
            self._read_line(p, 60)  # S i
            return self._read_line(p, self.args.timeout) is None
        finally:
            p.kill()
            p.wait()

    def run_target(self, target: str, budget_end: float | None):
        args = self.args
        self.target, self.stop, self.step = target, args.iters, 1
        counts = {"same": 0, "other": 0, "ValueError": 0, "TypeError": 0, "FAIL": 0, "crash": 0, "hang": 0}
        nxt = 0
        args.out.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        log_path = args.out / f"worker-{target}.log"
        while nxt < self.stop and (budget_end is None or time.time() < budget_end):
            log = open(log_path, "w")
            p = self._spawn(nxt, log)
            line = self._read_line(p, 600)
            if line != "READY\n":
                p.kill()
                raise SystemExit(f"fuzz.py: the {target} worker did not start; see {log_path}")
            current = None
            while True:
                if budget_end is not None and time.time() >= budget_end:
                    p.kill()
                    p.wait()
                    nxt = self.stop
                    break
                line = self._read_line(p, args.timeout if current is not None else 600)
                if line is None:  # no word within the timeout
                    p.kill()
                    p.wait()
                    if current is None:
                        nxt = self.stop
                        break
                    if self._confirm_hang(current):
                        counts["hang"] += 1
                        self._fail(target, current, f"hang: case ran longer than {args.timeout} s")
                    else:
                        counts["slow-retried"] = counts.get("slow-retried", 0) + 1
                    nxt = current + 1
                    break
                if line == "":  # the worker died: a crash (or a sanitizer report)
                    rc = p.wait()
                    log.close()
                    text = Path(log_path).read_text(errors="replace")
                    at = max(text.find("==ERROR"), text.find("runtime error:"), 0)
                    tail = (text[at:at + 8000] if at else text[-4000:])
                    if current is None:
                        nxt = self.stop
                        if rc == 0:  # ran its range
                            break
                        print(f"[fuzz] worker exited rc={rc} between cases\n{tail}", file=sys.stderr)
                        counts["crash"] += 1
                        self.failures.append(f"{target}: worker exit rc={rc} between cases")
                        break
                    counts["crash"] += 1
                    self._fail(target, current, f"crash: worker exit status {rc}\n{tail}")
                    nxt = current + 1
                    break
                kind, _, rest = line.rstrip("\n").partition(" ")
                if kind == "S":
                    current = int(rest)
                elif kind == "E":
                    i, outcome = rest.split(" ", 1)
                    counts[outcome] = counts.get(outcome, 0) + 1
                    current = None
                    done = sum(counts.values())
                    if args.progress and done % args.progress == 0:
                        rate = done / max(1e-9, time.time() - t0)
                        print(f"[fuzz] {target}: {done} cases ({rate:.0f}/s) {self._fmt(counts)}", flush=True)
                elif kind == "F":
                    counts["FAIL"] += 1
                    i, msg = rest.split(" ", 1)
                    self.failures.append(f"{target} case {i}: {msg}")
                    print(f"[fuzz] FAIL {target} case {i}: {msg}", flush=True)
                    current = None
            p.kill()
            p.wait()
        elapsed = time.time() - t0
        total = sum(counts.values())
        print(f"[fuzz] {target}: {total} cases in {elapsed:.1f} s ({total / max(elapsed, 1e-9):.1f}/s): "
              f"{self._fmt(counts)}", flush=True)
        return counts

    def _fail(self, target, i, why):
        fz = getattr(self, "_fz", {}).get(target)
        if fz is None:
            fz = Fuzzer(target)
            self._fz = {target: fz}
        path = _save_failure(fz, self.args.seed, i, self.args.out, why)
        msg = f"{target} case {i}: {why.splitlines()[0]} -> {path}"
        self.failures.append(msg)
        print(f"[fuzz] FAIL {msg}", flush=True)

    @staticmethod
    def _fmt(c):
        return " ".join(f"{k}={v}" for k, v in c.items() if v)


def replay(paths) -> int:
    """Re-runs case files (corpus entries or saved failures), with no seed to compare to: accepted inputs
    are checked against the reference decoders only."""
    _lazy_imports()
    torch.set_num_threads(1)
    bad = 0
    cache = {}
    for p in map(Path, paths):
        target = p.parent.name if p.parent.name in TARGETS else \
            next((t for t in TARGETS if p.name.startswith(f"crash-{t}-")), None)
        if target is None:
            print(f"{p}: cannot tell the target (name it crash-<target>-... or put it under fuzz_corpus/<target>/)")
            bad += 1
            continue
        t = cache.setdefault(target, TARGET_CLASSES[target]())
        try:
            outcome = t.run_case(t.load_case(p), None)
            print(f"{p}: {outcome}")
        except Finding as f:
            print(f"{p}: FAIL {f}")
            bad += 1
    return 1 if bad else 0


def atheris_main(target: str, libfuzzer_args: list) -> None:
    """libFuzzer's engine (atheris) over the same targets and oracles: each input's bytes seed the
    structure-aware mutator (which seed, which mutations); for codec and manifest an input starting with
    0x00 is also tried as the raw stream / packed checkpoint itself. Coverage guidance comes from the
    instrumented Python (tersor's loaders, this mutator); tersor's C++ is built by gcc without libFuzzer
    instrumentation, so it contributes none. A Finding is raised to libFuzzer, which writes the input
    (crash-<sha1>) and stops. atheris is optional: install it into a separate environment and put that on
    PYTHONPATH (docs/build.md)."""
    import atheris

    with atheris.instrument_imports(include=["tersor"]):
        _lazy_imports()
        import tersor.api.checkpoint  # noqa: F401
        import tersor.nn  # noqa: F401
        import tersor.sparse.bsr  # noqa: F401
    fz = Fuzzer(target)

    def one(data: bytes):
        if data[:1] == b"\x00" and target in ("codec", "manifest"):
            case, expect = ((data[1:], None), None)
        else:
            rng = random.Random(data)
            (case, k) = fz.case_from(rng)
            expect = fz.expect[k]
        fz.target.run_case(case, expect)

    atheris.Setup([sys.argv[0]] + libfuzzer_args, one)
    atheris.Fuzz()


def write_corpus():
    _lazy_imports()
    torch.set_num_threads(1)
    for target, cls in TARGET_CLASSES.items():
        d = CORPUS / target
        d.mkdir(parents=True, exist_ok=True)
        for p in d.glob("*"):
            if not p.name.startswith("crash-"):
                p.unlink()
        cls.write_seeds(d)
        print(f"{d}: {', '.join(sorted(p.name for p in d.iterdir()))}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=None, help="one of " + ", ".join(TARGETS) + ", or 'all'")
    ap.add_argument("--iters", type=int, default=1000, help="cases per target (default 1000)")
    ap.add_argument("--seconds", type=float, default=None, help="time budget per target (stops early)")
    ap.add_argument("--seed", type=int, default=0, help="run seed: case i of a run is a function of (target, seed, i)")
    ap.add_argument("--timeout", type=float, default=1.0, help="per-case limit in seconds (default 1)")
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "fuzz-failures", help="where failing inputs go (default build/fuzz-failures)")
    ap.add_argument("--progress", type=int, default=0, help="print counts every N cases")
    ap.add_argument("--replay", nargs="+", help="re-run these case files")
    ap.add_argument("--write-corpus", action="store_true", help="regenerate the seeds of tests/fuzz_corpus/")
    ap.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    ap.add_argument("--atheris", action="store_true",
                    help="use libFuzzer's engine (atheris must be importable); arguments after -- go to libFuzzer, "
                         "e.g. -- -runs=100000 -timeout=1 -max_total_time=600")
    argv = sys.argv[1:] if argv is None else list(argv)
    libfuzzer_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    args = ap.parse_args(argv)
    if args.atheris:
        if args.target not in TARGETS:
            ap.error("--atheris needs one --target")
        atheris_main(args.target, libfuzzer_args)
        return 0
    if args.worker:
        t, s, a, b, step, out = args.worker
        worker(t, int(s), int(a), int(b), int(step), Path(out))
        return 0
    if args.write_corpus:
        write_corpus()
        return 0
    if args.replay:
        return replay(args.replay)
    if not args.target:
        ap.error("--target is required")
    targets = TARGETS if args.target == "all" else (args.target,)
    for t in targets:
        if t not in TARGETS:
            ap.error(f"unknown target {t!r}")
    runner = Runner(args)
    totals = {}
    for t in targets:
        end = time.time() + args.seconds if args.seconds else None
        totals[t] = runner.run_target(t, end)
    if runner.failures:
        print(f"[fuzz] {len(runner.failures)} failure(s); inputs in {args.out}/", file=sys.stderr)
        for f in runner.failures[:50]:
            print("  " + f, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
