// Host-side pieces of codec v1 shared by the CPU ops and the CUDA glue: CRC-32C, length-limited
// canonical Huffman codes, the decode table, and the one function that reads (and validates) a
// stream's metadata. Torch-free. Format: docs/formats.md ("codec v1").
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "codec/codec_format.h"

namespace tersor::codec {

// CRC-32C (Castagnoli), as in iSCSI/ext4: init ~0, reflected, final xor ~0. crc32c_extend continues a
// CRC over more bytes (crc32c(a ++ b) == crc32c_extend(crc32c(a), b)). Uses SSE4.2 when present.
uint32_t crc32c_extend(uint32_t crc, const void* data, size_t n);
inline uint32_t crc32c(const void* data, size_t n) { return crc32c_extend(0, data, n); }

// Optimal code lengths (package-merge) with no length above max_len for the symbols with hist > 0;
// 0 for absent symbols. A single present symbol gets length 1.
void huffman_code_lengths(const uint64_t* hist, int nsym, int max_len, uint8_t* len_out);

// Canonical codes from lengths, bit-reversed for LSB-first emission: symbol s is written as the low
// len[s] bits of rev_code[s], first bit first. Returns false when the lengths violate Kraft.
bool canonical_reversed_codes(const uint8_t* len, uint32_t* rev_code);

// Multi-symbol decode table (see codec_format.h for the entry layout). Returns false, leaving
// `lut` unspecified, when the lengths are not a valid prefix code (a length > kMaxCodeLen, Kraft sum
// above 1, or no symbol at all).
bool build_decode_lut(const uint8_t* len, uint32_t* lut);

// Everything a stream's metadata says, after validation.
struct StreamInfo {
  uint16_t version = 0;
  WireDType dtype = WireDType::kFloat32;
  Mode mode = Mode::kStored;
  int ndim = 0;
  std::array<uint64_t, kMaxNdim> shape{};
  uint64_t numel = 0, row_len = 1, n_chunks = 0;
  uint32_t chunk_elems = 0;
  uint64_t offsets_pos = 0;  // chunk offset table (n_chunks + 1 u64), mode 1
  uint64_t crc_pos = 0;      // chunk CRC table (n_chunks u32), or the stored-data CRC in mode 0
  uint64_t exp_pos = 0, exp_bytes = 0, raw_pos = 0, raw_bytes = 0;
  uint64_t total_bytes = 0;
  const uint8_t* code_len = nullptr;  // 256 entries inside the stream, mode 1

  int elem_bytes() const { return wire_dtype_bytes(dtype); }
  uint64_t code_len_pos() const { return mode == Mode::kHuffman ? kFixedHeaderBytes + 8ull * ndim : 0; }
  ChunkGeom geom() const { return ChunkGeom{numel, row_len, chunk_elems}; }
};

// Positions of every section for a given metadata (used by the writer and re-checked by the reader).
struct Layout {
  uint64_t code_len_pos, offsets_pos, crc_pos, meta_crc_pos, exp_pos;
};
Layout layout_for(int ndim, Mode mode, uint64_t n_chunks);

// The format's consistency rules between a stream's header fields (shape, numel, row length, chunk
// layout, section positions and sizes) for a stream of `n` bytes: what can be checked without reading
// the stream's tables. nullptr when consistent, else what is wrong. parse_stream and the CUDA glue's
// check of a header list (which cannot read device memory) both use it.
const char* layout_error(const StreamInfo& s, uint64_t n);

// Reads and validates the metadata of a stream of `n` bytes: magic, version, field ranges, section
// positions and sizes, the metadata CRC, the code lengths, and that the chunk offsets are 16-aligned,
// increasing and inside the exponent section. Does not touch chunk contents. On failure returns false
// and says why in *err.
bool parse_stream(const uint8_t* p, uint64_t n, StreamInfo* info, std::string* err);

// The chunk layout the encoder picks for a tensor with rows of row_len elements, aiming at about
// `target` elements per chunk (0 = default). Chunks are multiples of 4096 elements where possible, so
// every lane run is a multiple of 128 elements (what the CUDA GEMV wants).
uint32_t choose_chunk_elems(uint64_t numel, uint64_t row_len, uint64_t target);

}  // namespace tersor::codec
