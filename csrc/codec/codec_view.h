// The codec CUDA kernels' tile limits, the stream view they read, and the glue's choice between them:
// plain C++ with no CUDA or torch header, so the CPU build (the kernels' CPU replay in tersor._C_testing,
// the route op) uses exactly what the CUDA glue and the kernels use.
#pragma once

#include <cstdint>

#include "codec/codec_format.h"
#include "codec/codec_host.h"

namespace tersor::codec {

// Tile and architecture choices of both kernels, in one place (the glue reads the limits to decide
// whether the fused GEMV applies).
struct CodecCudaTraits {
  // 4 warps share one 16 KiB copy of the decode table; more warps per block would amortise it
  // further but push static shared memory past 48 KiB.
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  // Symbols each lane decodes per phase. A multiple of 128 so that a lane segment is whole
  // 128-element strips (the GEMV's unit of "one row"); 128 keeps the per-warp scratch at 4.1 KiB.
  static constexpr uint32_t kSegment = 128;
  // Scratch row of a lane: kSegment symbol bytes + 4 bytes of padding, so the 32 rows start in 32
  // different banks (lanes writing the same word offset of their rows do not conflict).
  static constexpr uint32_t kRowBytes = kSegment + 4;
  static constexpr uint32_t kRowWords = kRowBytes / 4;
  // GEMV: rows of x handled by the fused kernel (compile-time batch), and the most weight rows one
  // chunk may hold (the per-warp fp32 accumulators live in shared memory: batch x rows).
  static constexpr int kMaxBatch = 8;
  static constexpr uint32_t kMaxRowsPerChunk = 64;
};

// What the kernels need to know about a stream living in device memory. Positions are byte offsets
// from `stream`, as in the header list (check_decode_call has checked them against each other and
// against the stream size; the kernels bounds-check everything they read inside the stream).
struct DeviceStreamView {
  const uint8_t* stream = nullptr;  // device, 16-byte aligned
  uint64_t stream_bytes = 0;
  const uint32_t* lut = nullptr;    // device, kLutSize entries (codec_decode_table), 16-byte aligned
  WireDType dtype = WireDType::kFloat32;
  Mode mode = Mode::kStored;
  uint64_t numel = 0, row_len = 1, n_chunks = 0;
  uint32_t chunk_elems = 0;
  uint64_t code_len_pos = 0, offsets_pos = 0, exp_pos = 0, raw_pos = 0;

  TERSOR_HD ChunkGeom geom() const { return ChunkGeom{numel, row_len, chunk_elems}; }
};

// The view of a stream whose metadata is `s` (positions as checked by check_decode_call), stored at
// `stream`, with its decode table at `lut` (device pointers for launches, host ones for the emulation).
inline DeviceStreamView make_stream_view(const StreamInfo& s, uint64_t code_len_pos, const uint8_t* stream,
                                         const uint32_t* lut) {
  DeviceStreamView v;
  v.stream = stream;
  v.stream_bytes = s.total_bytes;
  v.lut = lut;
  v.dtype = s.dtype;
  v.mode = s.mode;
  v.numel = s.numel;
  v.row_len = s.row_len;
  v.n_chunks = s.n_chunks;
  v.chunk_elems = s.chunk_elems;
  v.code_len_pos = code_len_pos;
  v.offsets_pos = s.offsets_pos;
  v.exp_pos = s.exp_pos;
  v.raw_pos = s.raw_pos;
  return v;
}

// Whether launch_codec_gemv accepts this weight stream (2-d [N, K] = numel / row_len x row_len) with
// `batch` rows of x. Beyond gemv_geom_ok: chunk_elems % 4 == 0 (with K % 8 == 0 every lane segment is
// then whole groups of 4 elements at 4-aligned element indices, so no scalar tails), and whole-row
// chunks of at most kMaxRowsPerChunk rows.
inline bool gemv_fused_eligible(const DeviceStreamView& s, int batch) {
  if (s.mode != Mode::kHuffman) return false;
  if (s.dtype != WireDType::kBFloat16 && s.dtype != WireDType::kFloat16) return false;
  if (batch < 1 || batch > CodecCudaTraits::kMaxBatch) return false;
  if (s.numel == 0 || s.row_len == 0 || s.chunk_elems == 0 || s.chunk_elems % 4 != 0) return false;
  const ChunkGeom g = s.geom();
  if (!gemv_geom_ok(g)) return false;
  if (geom_whole_rows(g) && s.chunk_elems / s.row_len > CodecCudaTraits::kMaxRowsPerChunk) return false;
  return true;
}

// Chunks of pieces of rows (chunk_elems < row_len) need an fp32 scratch of batch * n_chunks floats
// for launch_codec_gemv (the per-chunk partial dot products, summed per row in chunk order).
inline bool gemv_needs_partials(const DeviceStreamView& s) { return !geom_whole_rows(s.geom()); }
inline uint64_t gemv_partials_floats(const DeviceStreamView& s, int batch) {
  return gemv_needs_partials(s) ? static_cast<uint64_t>(batch) * s.n_chunks : 0;
}

// The two ways the CUDA codec_linear computes y = x @ W^T (+ bias).
enum class LinearPath {
  kFusedGemv,     // launch_codec_gemv: decode in on-chip memory and multiply, fp32 accumulation
  kDecodeMatmul,  // launch_codec_decode (or a copy, stored streams) into a scratch W, then aten::linear
};

// The CUDA glue's choice for `rows` rows of x (the product of x's leading dims) and the weight stream
// `s` (stream and table pointers are not looked at): the fused GEMV when it takes the call, otherwise
// decode + matmul. The same on every architecture (both kernels are built for all of them).
inline LinearPath choose_linear_path(const DeviceStreamView& s, int64_t rows) {
  if (rows < 1 || rows > CodecCudaTraits::kMaxBatch) return LinearPath::kDecodeMatmul;
  return gemv_fused_eligible(s, static_cast<int>(rows)) ? LinearPath::kFusedGemv : LinearPath::kDecodeMatmul;
}

inline const char* linear_path_name(LinearPath p) {
  return p == LinearPath::kFusedGemv ? "fused_gemv" : "decode_matmul";
}

}  // namespace tersor::codec
