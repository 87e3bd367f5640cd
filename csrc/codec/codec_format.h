// tersor codec format v1: the byte layout and the small pieces of arithmetic shared by the CPU codec,
// the CUDA decoders and the CPU tests. Byte-for-byte specification: docs/formats.md ("codec v1").
// Torch-free so kernel sources can include it.
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace tersor::codec {

// ---- constants of format v1 ----
inline constexpr uint32_t kMagic = 0x43535254u;     // "TRSC" read as a little-endian u32
inline constexpr uint16_t kVersion = 1;
inline constexpr int kFixedHeaderBytes = 80;        // fields up to and including `reserved`
inline constexpr int kMaxNdim = 8;
inline constexpr int kLanes = 32;                   // independent Huffman streams per chunk (= warp lanes)
inline constexpr int kLaneTableBytes = kLanes * 2;  // u16 byte length of each lane stream, at a chunk's start
inline constexpr int kMaxCodeLen = 12;              // Huffman code lengths are limited to this (LUT = 2^12)
inline constexpr int kLutSize = 1 << kMaxCodeLen;
inline constexpr int kAlign = 16;                   // sections and chunk records start 16-byte aligned
inline constexpr uint32_t kDefaultChunkElems = 8192;
inline constexpr uint32_t kMaxChunkElems = 1u << 20; // a lane then holds <= 32768 symbols * 12 bits < 2^16 bytes

enum class Mode : uint8_t { kStored = 0, kHuffman = 1 };

// Element types, by their wire code (never reorder: the code is in every stream).
enum class WireDType : uint8_t { kFloat32 = 1, kFloat16 = 2, kBFloat16 = 3, kFloat8E4M3 = 4, kFloat8E5M2 = 5 };

TERSOR_HD constexpr int wire_dtype_bytes(WireDType t) {
  return t == WireDType::kFloat32 ? 4 : (t == WireDType::kFloat16 || t == WireDType::kBFloat16) ? 2 : 1;
}
TERSOR_HD constexpr bool wire_dtype_valid(uint8_t code) { return code >= 1 && code <= 5; }

// ---- value split: symbol byte (entropy coded) + raw bytes (stored) ----
// A w-bit value is rotated left by one bit, which moves the sign below the mantissa; the top byte
// of the rotated value is then the exponent for bf16/fp32 (exponent and 3 mantissa bits for fp16), the
// part that carries the redundancy, and the low w-8 bits are sign+mantissa, stored raw. fp8 values are
// one symbol each with no raw part. Why rotate rather than mask: one rule for every width, and the
// inverse is a single funnel shift on the GPU.
TERSOR_HD inline uint32_t rotl_bits(uint32_t v, int w) {
  const uint32_t mask = w == 32 ? 0xffffffffu : ((1u << w) - 1u);
  return ((v << 1) | (v >> (w - 1))) & mask;
}
TERSOR_HD inline uint32_t rotr_bits(uint32_t v, int w) {
  const uint32_t mask = w == 32 ? 0xffffffffu : ((1u << w) - 1u);
  return ((v >> 1) | (v << (w - 1))) & mask;
}
// bits -> (symbol, raw); raw holds the low (w - 8) bits of the rotated value.
TERSOR_HD inline uint32_t split_symbol(uint32_t bits, int w) {
  // The top byte of rotl_w(bits, 1): bits w-2 .. w-9 of the value (for w = 8, the rotated byte itself).
  return w == 8 ? rotl_bits(bits, 8) : (bits >> (w - 9)) & 0xffu;
}
TERSOR_HD inline uint32_t split_raw(uint32_t bits, int w) {
  return w == 8 ? 0u : (rotl_bits(bits, w) & ((1u << (w - 8)) - 1u));
}
TERSOR_HD inline uint32_t merge_value(uint32_t symbol, uint32_t raw, int w) {
  return rotr_bits((symbol << (w - 8)) | raw, w);
}
// bf16 special case used by the GEMV: symbol/raw byte straight to the fp32 bit pattern of the value.
TERSOR_HD inline uint32_t merge_bf16_to_f32_bits(uint32_t symbol, uint32_t raw) {
  return merge_value(symbol, raw, 16) << 16;
}

// ---- chunk geometry ----
// The tensor is viewed as rows of `row_len` elements (its last dim; numel for 0-d/1-d). A chunk either
// holds whole rows (chunk_elems is a multiple of row_len) or a piece of one row (chunk_elems < row_len;
// the last piece of each row is shorter). A chunk never straddles a row boundary, so a GEMV kernel can
// give each chunk's dot products to one warp. Inside a chunk, lane l owns the contiguous elements
// [l * lane_elems, min((l + 1) * lane_elems, chunk_len)).
struct ChunkGeom {
  uint64_t numel, row_len;
  uint32_t chunk_elems;
};
TERSOR_HD inline bool geom_whole_rows(const ChunkGeom& g) { return g.chunk_elems % g.row_len == 0; }
TERSOR_HD inline uint64_t geom_chunks_per_row(const ChunkGeom& g) {  // only for split rows
  return (g.row_len + g.chunk_elems - 1) / g.chunk_elems;
}
TERSOR_HD inline uint64_t geom_num_chunks(const ChunkGeom& g) {
  if (g.numel == 0) return 0;
  if (geom_whole_rows(g)) return (g.numel + g.chunk_elems - 1) / g.chunk_elems;
  return (g.numel / g.row_len) * geom_chunks_per_row(g);
}
// First element (flat index) and element count of chunk c.
TERSOR_HD inline void geom_chunk(const ChunkGeom& g, uint64_t c, uint64_t* start, uint32_t* len) {
  if (geom_whole_rows(g)) {
    *start = c * g.chunk_elems;
    const uint64_t left = g.numel - *start;
    *len = left < g.chunk_elems ? static_cast<uint32_t>(left) : g.chunk_elems;
  } else {
    const uint64_t m = geom_chunks_per_row(g), row = c / m, j = c % m;
    *start = row * g.row_len + j * g.chunk_elems;
    const uint64_t left = g.row_len - j * g.chunk_elems;
    *len = left < g.chunk_elems ? static_cast<uint32_t>(left) : g.chunk_elems;
  }
}
// Elements per lane: ceil(chunk_elems / 32) rounded up to a multiple of 4 (GPU decoders write the
// decoded symbols of a lane four at a time).
TERSOR_HD inline uint32_t lane_elems(uint32_t chunk_elems) { return ((chunk_elems + 127u) / 128u) * 4u; }
// Elements of lane l in a chunk of `len` elements.
TERSOR_HD inline uint32_t lane_count(uint32_t len, uint32_t per_lane, int l) {
  const uint64_t lo = static_cast<uint64_t>(l) * per_lane;
  if (lo >= len) return 0;
  const uint64_t hi = lo + per_lane;
  return static_cast<uint32_t>((hi < len ? hi : len) - lo);
}

// Flat element index of symbol `first` of lane l in a chunk that starts at element `start`: 64-bit, since
// start passes 2^32 in a large tensor (issue 17; tested through tersor_testing::_codec_index).
TERSOR_HD inline uint64_t lane_elem_index(uint64_t start, int l, uint32_t lane_run, uint32_t first) {
  return start + static_cast<uint64_t>(l) * lane_run + first;
}
// The GEMV's fp32 partial of batch row b for chunk c ([batch, n_chunks]) and its output y[b, row] ([batch, N]).
TERSOR_HD inline uint64_t gemv_partial_index(int b, uint64_t n_chunks, uint64_t c) {
  return static_cast<uint64_t>(b) * n_chunks + c;
}
TERSOR_HD inline uint64_t gemv_out_index(int b, uint64_t n_rows, uint64_t row) {
  return static_cast<uint64_t>(b) * n_rows + row;
}

// Whether the CUDA GEMV may treat every 128-element strip of a lane run as lying in a single row:
// true for chunks that are one row or a piece of one, or when lane runs and rows are both multiples
// of 128 elements. Rows must also be a multiple of 8 elements (16-byte loads of x).
TERSOR_HD inline bool gemv_geom_ok(const ChunkGeom& g) {
  if (g.row_len % 8 != 0) return false;
  if (!geom_whole_rows(g) || g.chunk_elems == g.row_len) return true;
  return g.row_len % 128 == 0 && lane_elems(g.chunk_elems) % 128 == 0;
}

// ---- multi-symbol decode table ----
// The decoder peeks the next kMaxCodeLen stream bits (LSB-first) and looks up one u32 entry:
//   bits  0..7 , 8..15, 16..23 : up to three decoded symbols, in stream order
//   bits 24..25               : how many symbols (1..3); 0 marks a bit pattern no valid stream has
//   bits 26..29               : how many stream bits those symbols use (1..12)
// Three symbols per lookup: the most common weight exponents get 2-3 bit codes, so a 12-bit peek
// usually holds 3 of them, and a u32 entry keeps the table at 16 KiB (a GPU block keeps it in smem).
TERSOR_HD inline uint32_t lut_count(uint32_t e) { return (e >> 24) & 3u; }
TERSOR_HD inline uint32_t lut_bits(uint32_t e) { return (e >> 26) & 15u; }
TERSOR_HD inline uint32_t lut_symbol(uint32_t e, int i) { return (e >> (8 * i)) & 0xffu; }
TERSOR_HD inline uint32_t lut_pack(const uint32_t* syms, uint32_t count, uint32_t bits) {
  uint32_t e = (count << 24) | (bits << 26);
  for (uint32_t i = 0; i < count; ++i) e |= syms[i] << (8 * i);
  return e;
}

TERSOR_HD inline uint64_t align_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

}  // namespace tersor::codec
