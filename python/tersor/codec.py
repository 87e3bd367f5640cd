"""Lossless compression of floating-point tensors (codec v1, docs/formats.md).

Each value is split into a symbol byte (the exponent, for bf16/fp32) that is Huffman-coded in
independently decodable chunks, and the remaining sign+mantissa bits, stored as they are. Typical
bf16 weights shrink to ~67% of their size; decoding is exact for every bit pattern (NaN payloads,
infinities, subnormals, -0.0).

    ct = tersor.codec.compress(w)           # CompressedTensor (encoding runs on the CPU)
    ct = ct.to("cuda")                      # decodable on the GPU; validated once on arrival
    w2 = tersor.codec.decompress(ct)        # same dtype, shape and bits as w
    blob = ct.to_bytes(); ct2 = tersor.codec.CompressedTensor.from_bytes(blob)
    tersor.codec.save_file({"w": ct}, "m.safetensors"); d = tersor.codec.load_file("m.safetensors")
"""

from __future__ import annotations

import json
from typing import Mapping, Optional, Union

import torch

from .ops import lib as _lib

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2)
_WIRE_TO_DTYPE = {1: torch.float32, 2: torch.float16, 3: torch.bfloat16, 4: torch.float8_e4m3fn, 5: torch.float8_e5m2}
# Positions in the header list (csrc/codec/codec_glue.h, HeaderField).
_H_DTYPE, _H_NUMEL, _H_NDIM = 1, 3, 12

_SAFETENSORS_KEY = "tersor.codec"


class CompressedTensor:
    """A tensor in codec v1 form: one validated byte stream plus its decode table, on one device.

    ``stream`` is the codec v1 byte stream (uint8), ``table`` the 4096-entry decode table derived from
    it. Construct with :func:`compress`, or with :meth:`from_bytes` for bytes from elsewhere, which
    validates the whole stream (metadata, every chunk's CRC-32C, every lane's length) before returning.
    """

    __slots__ = ("stream", "table", "header", "dtype", "shape")

    def __init__(self, stream: torch.Tensor, table: torch.Tensor, header: list[int]):
        self.stream = stream
        self.table = table
        self.header = list(header)
        self.dtype = _WIRE_TO_DTYPE[self.header[_H_DTYPE]]
        self.shape = torch.Size(self.header[_H_NDIM + 1 :])

    # -- construction / serialization --
    @classmethod
    def from_bytes(cls, data: Union[bytes, bytearray, memoryview, torch.Tensor]) -> "CompressedTensor":
        """Parses and fully validates a codec v1 stream (raises ``ValueError`` if corrupt)."""
        if isinstance(data, torch.Tensor):
            if data.dtype != torch.uint8:
                raise TypeError(f"from_bytes: expected a uint8 tensor, got {data.dtype}")
            stream = data.detach().to("cpu", torch.uint8).reshape(-1).contiguous().clone()
        else:
            stream = torch.frombuffer(bytearray(data), dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)
        header = _lib._codec_header(stream)
        table = _lib._codec_decode_table(stream)
        ct = cls(stream, table, header)
        ct._decode(verify=True)  # CRCs and lane lengths of every chunk
        return ct

    def to_bytes(self) -> bytes:
        """The codec v1 stream (docs/formats.md)."""
        return self.stream.cpu().numpy().tobytes()

    @property
    def nbytes(self) -> int:
        """Size of the stream in bytes, all metadata included."""
        return self.stream.numel()

    @property
    def numel(self) -> int:
        return self.header[_H_NUMEL]

    @property
    def device(self) -> torch.device:
        return self.stream.device

    @property
    def ratio(self) -> float:
        """Compressed size / original size."""
        return self.nbytes / max(1, self.numel * self.dtype.itemsize)

    def to(self, device: Union[str, torch.device], non_blocking: bool = False) -> "CompressedTensor":
        """A copy on ``device``. Arriving on a GPU, the stream is decoded once with full checks there."""
        device = torch.device(device)
        if device == self.stream.device:
            return self
        ct = CompressedTensor(self.stream.to(device, non_blocking=non_blocking),
                              self.table.to(device, non_blocking=non_blocking), self.header)
        if device.type != "cpu":
            ct._decode(verify=True)
        return ct

    def cuda(self, device: Optional[int] = None) -> "CompressedTensor":
        return self.to(torch.device("cuda", device) if device is not None else torch.device("cuda"))

    def cpu(self) -> "CompressedTensor":
        return self.to("cpu")

    def _decode(self, verify: bool = False) -> torch.Tensor:
        return _lib.codec_decode(self.stream, self.table, self.header, self.dtype, list(self.shape), verify)

    def __repr__(self) -> str:
        return (f"CompressedTensor(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, "
                f"nbytes={self.nbytes}, ratio={self.ratio:.4f})")


def compress(t: torch.Tensor, chunk_elems: int = 0) -> CompressedTensor:
    """Losslessly compresses ``t`` (float32/float16/bfloat16/float8, any shape, any strides, any device).

    Encoding runs on the CPU; the result lives on ``t``'s device. ``t`` is never modified.
    ``chunk_elems`` (0 = automatic, else 128 .. 262144) sets the target elements per chunk.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"compress: expected a tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"compress: unsupported dtype {t.dtype}; supported: {', '.join(map(str, SUPPORTED_DTYPES))}")
    stream = _lib._codec_encode(t.detach().cpu(), chunk_elems)
    ct = CompressedTensor(stream, _lib._codec_decode_table(stream), _lib._codec_header(stream))
    return ct.to(t.device)


def decompress(ct: CompressedTensor) -> torch.Tensor:
    """The original tensor (contiguous), on ``ct``'s device."""
    if not isinstance(ct, CompressedTensor):
        raise TypeError(f"decompress: expected a CompressedTensor, got {type(ct).__name__}")
    return ct._decode(verify=False)


def linear_path(ct: CompressedTensor, rows: int) -> str:
    """How ``codec_linear`` on CUDA computes ``x @ W.T`` for this 2-d weight and ``rows`` rows of ``x`` (the
    product of its leading dims): ``"fused_gemv"`` (one kernel decodes on chip and multiplies, fp32
    accumulation: bf16/fp16 Huffman streams, 1-8 rows, chunk layouts the kernel takes) or ``"decode_matmul"``
    (decode to a scratch weight, then ``F.linear``; bit-identical to the CPU). The C++ glue's own choice
    (``_codec_route``), the same on every GPU architecture. On the CPU it is always decode + ``F.linear``.
    """
    if not isinstance(ct, CompressedTensor):
        raise TypeError(f"linear_path: expected a CompressedTensor, got {type(ct).__name__}")
    return _lib._codec_route(ct.header, rows)


def save_file(tensors: Mapping[str, Union[CompressedTensor, torch.Tensor]], path: str,
              metadata: Optional[Mapping[str, str]] = None) -> None:
    """Saves compressed (and plain) tensors into one safetensors file.

    A CompressedTensor is stored as its uint8 stream under its name; the names of the compressed entries
    are listed in the file's metadata under ``"tersor.codec"``, so other safetensors readers still open it.
    """
    from safetensors.torch import save_file as _save

    out, names = {}, []
    for name, v in tensors.items():
        if isinstance(v, CompressedTensor):
            out[name] = v.stream.cpu()
            names.append(name)
        elif isinstance(v, torch.Tensor):
            out[name] = v.detach().cpu().contiguous()
        else:
            raise TypeError(f"save_file: {name!r} is a {type(v).__name__}, not a tensor")
    meta = dict(metadata or {})
    meta[_SAFETENSORS_KEY] = json.dumps({"version": 1, "compressed": sorted(names)})
    _save(out, path, metadata=meta)


def load_file(path: str, device: Union[str, torch.device] = "cpu") -> dict[str, Union[CompressedTensor, torch.Tensor]]:
    """Loads a file written by :func:`save_file`; compressed entries come back as validated CompressedTensors.

    A damaged file (safetensors header, offsets or sizes; the ``"tersor.codec"`` metadata; a compressed entry
    that is not a 1-d uint8 stream or not a valid codec stream) raises ValueError naming the file and entry."""
    from safetensors import SafetensorError, safe_open

    out = {}
    try:
        with safe_open(path, framework="pt") as f:
            names = set(f.keys())
            compressed = _compressed_names(f.metadata() or {}, names, path)
            for name in sorted(names):
                t = f.get_tensor(name)
                if name not in compressed:
                    out[name] = t.to(device)
                    continue
                if t.dtype != torch.uint8 or t.dim() != 1:
                    raise ValueError(f"load_file: {path}: compressed entry {name!r} is {t.dtype} {list(t.shape)}, "
                                     "not a 1-d uint8 codec stream")
                try:
                    out[name] = CompressedTensor.from_bytes(t).to(device)
                except ValueError as e:
                    raise ValueError(f"load_file: {path}: compressed entry {name!r}: {e}") from None
    except SafetensorError as e:  # a damaged container: the caller's data, not a library fault
        raise ValueError(f"load_file: {path} is not a valid safetensors file: {e}") from None
    return out


def _compressed_names(meta: Mapping[str, str], names: set, path: str) -> set:
    """The entries the file's ``"tersor.codec"`` metadata lists as codec streams (none when it has no such key)."""
    raw = meta.get(_SAFETENSORS_KEY)
    if raw is None:
        return set()
    try:
        info = json.loads(raw)
    except ValueError:
        raise ValueError(f"load_file: {path}: the {_SAFETENSORS_KEY!r} metadata is not JSON") from None
    if not isinstance(info, dict):
        raise ValueError(f"load_file: {path}: the {_SAFETENSORS_KEY!r} metadata is {type(info).__name__}, not an "
                         "object")
    if info.get("version", 1) != 1:
        raise ValueError(f"load_file: {path}: {_SAFETENSORS_KEY!r} metadata version {info.get('version')!r}; this "
                         "reader knows 1")
    listed = info.get("compressed")
    if not isinstance(listed, list) or not all(isinstance(n, str) for n in listed):
        raise ValueError(f"load_file: {path}: the {_SAFETENSORS_KEY!r} metadata needs a list of names under "
                         f"'compressed', got {listed!r}")
    missing = sorted(set(listed) - names)
    if missing:
        raise ValueError(f"load_file: {path}: compressed entries {missing[:5]} listed in the metadata are not in "
                         "the file")
    return set(listed)
