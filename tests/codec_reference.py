"""Independent pure-Python/numpy reader of the codec v1 format, written from docs/formats.md only.

Nothing here calls tersor: it checks that the C++ encoder writes exactly what the spec says and gives
the tests a CRC-32C to forge "valid-checksum" hostile streams.
"""

from __future__ import annotations

import struct

import numpy as np
import torch

_CRC_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ (0x82F63B78 if _c & 1 else 0)
    _CRC_TABLE.append(_c)
_CRC_NP = np.array(_CRC_TABLE, dtype=np.uint32)


def crc32c(data: bytes, crc: int = 0) -> int:
    c = crc ^ 0xFFFFFFFF
    for b in data:
        c = (c >> 8) ^ _CRC_TABLE[(c ^ b) & 0xFF]
    return c ^ 0xFFFFFFFF


WIRE_DTYPES = {1: (torch.float32, 4), 2: (torch.float16, 2), 3: (torch.bfloat16, 2),
               4: (torch.float8_e4m3fn, 1), 5: (torch.float8_e5m2, 1)}
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32}


def parse(blob: bytes) -> dict:
    (magic, version, dtype, mode, ndim, max_len, res0, chunk_elems, numel, row_len, n_chunks, exp_pos,
     exp_bytes, raw_pos, raw_bytes, res1) = struct.unpack_from("<IHBBBBHIQQQQQQQQ", blob, 0)
    assert magic == 0x43535254 and version == 1
    shape = list(struct.unpack_from(f"<{ndim}Q", blob, 80))
    h = dict(dtype=dtype, mode=mode, ndim=ndim, max_len=max_len, chunk_elems=chunk_elems, numel=numel,
             row_len=row_len, n_chunks=n_chunks, exp_pos=exp_pos, exp_bytes=exp_bytes, raw_pos=raw_pos,
             raw_bytes=raw_bytes, shape=shape, reserved=(res0, res1))
    pos = 80 + 8 * ndim
    if mode == 1:
        h["code_len"] = list(blob[pos:pos + 256])
        pos += 256
        h["offsets"] = list(struct.unpack_from(f"<{n_chunks + 1}Q", blob, pos))
        pos += 8 * (n_chunks + 1)
        h["chunk_crc"] = list(struct.unpack_from(f"<{n_chunks}I", blob, pos))
        pos += 4 * n_chunks
    else:
        h["data_crc"] = struct.unpack_from("<I", blob, pos)[0]
        pos += 4
    h["meta_crc_pos"] = pos
    h["meta_crc"] = struct.unpack_from("<I", blob, pos)[0]
    return h


def chunk_span(h: dict, c: int) -> tuple[int, int]:
    E, L, n = h["chunk_elems"], h["row_len"], h["numel"]
    if E % L == 0:
        start = c * E
        return start, min(E, n - start)
    m = -(-L // E)
    row, j = divmod(c, m)
    return row * L + j * E, min(E, L - j * E)


def canonical_codes(lengths: list[int]) -> dict[int, tuple[int, int]]:
    """symbol -> (code, length), deflate's canonical assignment (MSB-first code value)."""
    order = sorted((l, s) for s, l in enumerate(lengths) if l)
    codes, code, prev = {}, 0, order[0][0]
    for k, (l, s) in enumerate(order):
        if k:
            code = (code + 1) << (l - prev)
        prev = l
        codes[s] = (code, l)
    return codes


def decode(blob: bytes) -> torch.Tensor:
    """Decodes a codec v1 stream bit by bit (slow; small tensors only)."""
    h = parse(blob)
    tdtype, eb = WIRE_DTYPES[h["dtype"]]
    w = 8 * eb
    if h["mode"] == 0:
        vals = np.frombuffer(blob, dtype=_UINT[eb], count=h["numel"], offset=h["raw_pos"]).copy()
    else:
        decode_map = {(l, c): s for s, (c, l) in canonical_codes(h["code_len"]).items()}
        syms = np.zeros(h["numel"], dtype=np.uint32)
        for c in range(h["n_chunks"]):
            start, n = chunk_span(h, c)
            rec = h["exp_pos"] + h["offsets"][c]
            lane_len = struct.unpack_from("<32H", blob, rec)
            R = -(-h["chunk_elems"] // 128) * 4
            byte = rec + 64
            for lane in range(32):
                cnt = max(0, min(R, n - lane * R))
                bits = np.unpackbits(np.frombuffer(blob, np.uint8, lane_len[lane], byte), bitorder="little")
                pos = 0
                for i in range(cnt):
                    code, length = 0, 0
                    while (length, code) not in decode_map:  # first stream bit = code's MSB
                        code = (code << 1) | int(bits[pos])
                        pos += 1
                        length += 1
                    syms[start + lane * R + i] = decode_map[(length, code)]
                assert -(-pos // 8) == lane_len[lane]
                byte += lane_len[lane]
        rb = eb - 1
        raw = np.zeros(h["numel"], dtype=np.uint32)
        if rb:
            rawb = np.frombuffer(blob, np.uint8, h["numel"] * rb, h["raw_pos"]).reshape(-1, rb).astype(np.uint32)
            for k in range(rb):
                raw |= rawb[:, k] << (8 * k)
        rot = (syms << (w - 8)) | raw  # the value rotated left by one bit
        mask = (1 << w) - 1
        vals = (((rot >> 1) | (rot << (w - 1))) & mask).astype(_UINT[eb])
    t = torch.from_numpy(vals.view({1: np.int8, 2: np.int16, 4: np.int32}[eb]).copy()).view(tdtype)
    return t.reshape(h["shape"]) if h["ndim"] else t.reshape(())
