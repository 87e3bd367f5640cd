// Pieces shared by the codec decode and GEMV kernels: the kernel-side stream description, the
// per-block table load, the per-warp chunk opening (record validation, lane offsets) and the
// segment-wise lane decode into shared memory (phase 1), plus SWAR value merges used by phase 2.
// Torch-free.
//
// Work split: one warp decodes one chunk at a time (persistent loop over chunks, so each block
// loads the 16 KiB decode table into shared memory once). A chunk is decoded segment by segment:
//   phase 1: lane l decodes the next kSegment symbols of its own lane stream (the 32 lane streams
//            are independent, so this is the only parallel way to run a Huffman decoder) into row l
//            of a per-warp shared scratch;
//   phase 2: the warp walks the 32 rows and handles 128 consecutive elements at a time, lane t
//            taking 4 of them, so raw-byte loads and output stores are coalesced.
//
// Host compilers (the CPU replay in codec_cuda_emulate.cpp, built in every TERSOR_TESTING build) see no
// CUDA header: codec_host_shim.h supplies the few CUDA types and conversions the host-callable parts use,
// bit-exact with the device intrinsics.
#pragma once

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "codec/codec_cuda.h"
#else
#include "codec/codec_host_shim.h"
#endif

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "codec/codec_format.h"
#include "codec/codec_lane.h"
#include "codec/codec_view.h"
#include "common/macros.h"

namespace tersor::codec::cuda_detail {

#if defined(__CUDACC__)
using ::make_uint2;
using ::make_uint4;
using ::uint2;
using ::uint4;
#else
using namespace host_shim;
#endif

using Traits = CodecCudaTraits;
inline constexpr unsigned kFullMask = 0xffffffffu;
// `#pragma unroll` for functions that are also compiled for the host (where the pragma is unknown).
#if defined(__CUDA_ARCH__)
#define TERSOR_CODEC_UNROLL(n) _Pragma(#n)
#else
#define TERSOR_CODEC_UNROLL(n)
#endif

static_assert(Traits::kSegment % 128 == 0, "phase 2 walks whole 128-element strips");
static_assert(Traits::kRowBytes % 4 == 0 && (Traits::kRowWords % 32) == 1,
              "scratch rows must be word aligned and start in distinct banks");

// The stream as the kernels see it (a by-value kernel parameter): the view plus two derived values.
struct KStream : DeviceStreamView {
  uint32_t lane_run;   // lane_elems(chunk_elems): elements owned by each lane of a full chunk
  uint64_t exp_bytes;  // raw_pos - exp_pos: the chunk records must fill exactly this
};

inline KStream make_kstream(const DeviceStreamView& v) {
  KStream s;
  static_cast<DeviceStreamView&>(s) = v;
  s.lane_run = lane_elems(v.chunk_elems);
  s.exp_bytes = v.raw_pos - v.exp_pos;
  return s;
}

// Host-side sanity of a view before any kernel reads through it (check_decode_call has done the real
// checking; this guards direct launcher users against positions that would let a kernel stray).
inline bool view_ok(const DeviceStreamView& v) {
  if (v.mode != Mode::kHuffman || !v.stream || !v.lut) return false;
  if (reinterpret_cast<uintptr_t>(v.stream) % kAlign || reinterpret_cast<uintptr_t>(v.lut) % kAlign) return false;
  if (v.chunk_elems == 0 || v.chunk_elems > kMaxChunkElems || v.row_len == 0) return false;
  if (v.n_chunks != geom_num_chunks(v.geom())) return false;
  const int eb = wire_dtype_bytes(v.dtype);
  if (v.exp_pos % kAlign || v.raw_pos % kAlign || v.raw_pos < v.exp_pos || v.offsets_pos % 8) return false;
  if (v.code_len_pos + 256 > v.offsets_pos || v.offsets_pos + 8 * (v.n_chunks + 1) > v.exp_pos) return false;
  if (v.raw_pos + v.numel * (eb - 1) != v.stream_bytes) return false;
  return true;
}

// ---- SWAR merges: 4 symbols (bytes of sym4) + their raw bits -> 4 values, equal to merge_value ----
// Two 16-bit values (elements 2h, 2h+1) packed as they sit in memory (low half = element 2h).
template <int kHalf>
TERSOR_HD inline uint32_t merge16x2(uint32_t sym4, uint32_t raw4) {
  const uint32_t s = sym4 >> (16 * kHalf), r = raw4 >> (16 * kHalf);
  const uint32_t p = (r & 0xffu) | ((s & 0xffu) << 8) | ((r & 0xff00u) << 8) | ((s & 0xff00u) << 16);
  return ((p >> 1) & 0x7fff7fffu) | ((p << 15) & 0x80008000u);
}
// Four fp8 values (no raw part): rotate each byte right by one.
TERSOR_HD inline uint32_t merge8x4(uint32_t sym4) { return ((sym4 >> 1) & 0x7f7f7f7fu) | ((sym4 << 7) & 0x80808080u); }
// Four fp32 values from the 12 raw bytes (three little-endian words, 3 bytes per element).
TERSOR_HD inline void merge32x4(uint32_t sym4, uint32_t r0, uint32_t r1, uint32_t r2, uint32_t* v) {
  const uint32_t raw[4] = {r0 & 0xffffffu, (r0 >> 24) | ((r1 & 0xffffu) << 8), (r1 >> 16) | ((r2 & 0xffu) << 16),
                           r2 >> 8};
  TERSOR_CODEC_UNROLL(unroll)
  for (int i = 0; i < 4; ++i) {
    const uint32_t u = ((sym4 >> (8 * i)) << 24) | raw[i];
    v[i] = (u >> 1) | (u << 31);
  }
}

// ---- per-block tables ----
struct alignas(16) BlockTables {
  uint32_t lut[kLutSize];
  uint8_t code_len[256];
};

struct LaneState {
  LaneBitReader rd;
  uint32_t count;  // symbols this lane owns in the chunk
  uint32_t bytes;  // its declared stream length
};

// Phase 1: decodes this lane's symbols [seg * kSegment, +kSegment) (clamped to its count) into its
// scratch row. The 1-3 symbols per table hit are gathered in a register and stored as whole aligned
// words; only a lane's very last word can be partial (its unused bytes are never read as elements).
// Returns false on a bit pattern no valid stream contains. (Host-callable for the CPU-side tests of
// the index arithmetic; no cross-lane operations.)
TERSOR_HD inline bool decode_segment(LaneState& st, const BlockTables& t, uint32_t seg, uint32_t* row) {
  const uint32_t first = seg * Traits::kSegment;
  const uint32_t left = st.count > first ? st.count - first : 0u;
  const uint32_t n = left < Traits::kSegment ? left : Traits::kSegment;
  uint64_t pend = 0;
  uint32_t npend = 0, w = 0;
  const bool ok = decode_lane_symbols(st.rd, t.lut, t.code_len, n, [&](uint32_t, uint32_t packed, uint32_t k) {
    pend |= static_cast<uint64_t>(packed) << (8 * npend);
    npend += k;
    if (npend >= 4) {
      row[w++] = static_cast<uint32_t>(pend);
      pend >>= 32;
      npend -= 4;
    }
  });
  if (npend) row[w] = static_cast<uint32_t>(pend);
  return ok;
}

// Segments a chunk of `len` elements takes: lane 0 owns the most symbols, so its count decides.
TERSOR_HD inline uint32_t chunk_segments(uint32_t len, uint32_t lane_run) {
  return (lane_count(len, lane_run, 0) + Traits::kSegment - 1) / Traits::kSegment;
}

// Symbols lane l owns in the segment starting at symbol `first` of a chunk of `len` elements.
TERSOR_HD inline uint32_t segment_count(uint32_t len, uint32_t lane_run, int l, uint32_t first) {
  const uint32_t cnt = lane_count(len, lane_run, l);
  const uint32_t left = cnt > first ? cnt - first : 0u;
  return left < Traits::kSegment ? left : Traits::kSegment;
}

TERSOR_HD inline uint32_t ld_stream_u32(const uint8_t* p) {
#if defined(__CUDA_ARCH__)
  // Raw bytes are read exactly once: evict-first, so they do not push the lane streams out of L1.
  return __ldcs(reinterpret_cast<const unsigned int*>(p));
#else
  return *reinterpret_cast<const uint32_t*>(p);
#endif
}

// ---- phase 2 of the decode kernel (host-callable: _codec_emulate_cuda_decode replays it on the CPU) ----
// Four elements whose first index g is a multiple of 4: one raw load per 4 bytes of raw data and one
// vector store (4, 8 or 16 bytes, aligned because g % 4 == 0 and the output is 16-byte aligned).
template <int kEB>
TERSOR_HD inline void store_group(const uint8_t* raw, uint8_t* out, uint64_t g, uint32_t sym4) {
  if constexpr (kEB == 1) {
    *reinterpret_cast<uint32_t*>(out + g) = merge8x4(sym4);
  } else if constexpr (kEB == 2) {
    const uint32_t raw4 = ld_stream_u32(raw + g);
    *reinterpret_cast<uint2*>(out + 2 * g) = make_uint2(merge16x2<0>(sym4, raw4), merge16x2<1>(sym4, raw4));
  } else {
    const uint8_t* r = raw + 3 * g;
    uint32_t v[4];
    merge32x4(sym4, ld_stream_u32(r), ld_stream_u32(r + 4), ld_stream_u32(r + 8), v);
    *reinterpret_cast<uint4*>(out + 4 * g) = make_uint4(v[0], v[1], v[2], v[3]);
  }
}

// `k` (1..4) elements from index g with no alignment assumed: chunks that start at an element index
// that is not a multiple of 4, and the end of a tensor whose size is not.
template <int kEB>
TERSOR_HD inline void store_scalar(const uint8_t* raw, uint8_t* out, uint64_t g, uint32_t sym4, uint32_t k) {
  constexpr int kW = 8 * kEB;
  for (uint32_t i = 0; i < k; ++i) {
    const uint64_t gi = g + i;
    uint32_t r = 0;
    TERSOR_CODEC_UNROLL(unroll)
    for (int b = 0; b < kEB - 1; ++b) r |= static_cast<uint32_t>(raw[gi * (kEB - 1) + b]) << (8 * b);
    const uint32_t v = merge_value((sym4 >> (8 * i)) & 0xffu, r, kW);
    TERSOR_CODEC_UNROLL(unroll)
    for (int b = 0; b < kEB; ++b) out[gi * kEB + b] = static_cast<uint8_t>(v >> (8 * b));
  }
}

// Phase 2 of one segment: the warp walks lane rows 0..31 of the scratch; in each, lane t handles
// elements [4t, 4t + 4) of every 128-element strip. No cross-lane operations (host-callable for tests).
template <int kEB>
TERSOR_HD inline void emit_segment(const KStream& s, uint8_t* out, const uint32_t* scratch, uint64_t start,
                                             uint32_t len, uint32_t first, bool aligned, int lane) {
  const uint8_t* raw = s.stream + s.raw_pos;
  TERSOR_CODEC_UNROLL(unroll 2)
  for (int l = 0; l < kLanes; ++l) {
    const uint32_t n = segment_count(len, s.lane_run, l, first);
    if (n == 0) break;  // lane counts never increase with l
    const uint64_t g0 = lane_elem_index(start, l, s.lane_run, first);
    const uint32_t* row = scratch + l * Traits::kRowWords;
    for (uint32_t e = 4u * lane; e < n; e += 128u) {
      const uint32_t sym4 = row[e / 4];
      if (aligned && e + 4 <= n)
        store_group<kEB>(raw, out, g0 + e, sym4);
      else
        store_scalar<kEB>(raw, out, g0 + e, sym4, n - e < 4u ? n - e : 4u);
    }
  }
}


// ---- phase 2 of the GEMV kernel, per lane (host-callable: _codec_emulate_cuda_linear replays it) ----
TERSOR_HD inline float f32_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

// bf16 / fp16 as raw 16-bit patterns: 2 values per u32 (low half first, as in memory).
template <bool kF16>
struct Half16;
#if defined(__CUDACC__)
TERSOR_HD inline uint16_t bf16_bits_rn(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
TERSOR_HD inline uint16_t f16_bits_rn(float v) { return __half_as_ushort(__float2half_rn(v)); }
TERSOR_HD inline float f16_bits_to_float(uint16_t u) { return __half2float(__ushort_as_half(u)); }
#endif
template <>
struct Half16<false> {  // bfloat16: the value is the top half of an fp32
  static TERSOR_HD float lo(uint32_t p) { return f32_from_bits(p << 16); }
  static TERSOR_HD float hi(uint32_t p) { return f32_from_bits(p & 0xffff0000u); }
  static TERSOR_HD float one(uint16_t u) { return f32_from_bits(static_cast<uint32_t>(u) << 16); }
  static TERSOR_HD uint16_t round(float v) { return bf16_bits_rn(v); }
};
template <>
struct Half16<true> {
  static TERSOR_HD float lo(uint32_t p) { return f16_bits_to_float(static_cast<uint16_t>(p & 0xffffu)); }
  static TERSOR_HD float hi(uint32_t p) { return f16_bits_to_float(static_cast<uint16_t>(p >> 16)); }
  static TERSOR_HD float one(uint16_t u) { return f16_bits_to_float(u); }
  static TERSOR_HD uint16_t round(float v) { return f16_bits_rn(v); }
};

TERSOR_HD inline uint2 ld_x_u2(const uint16_t* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(reinterpret_cast<const uint2*>(p));  // x is small and re-read by every warp: keep it in L1
#else
  return *reinterpret_cast<const uint2*>(p);
#endif
}

// Row (relative to the chunk's first row) of the 128-element strip at `strip` in the lane run at
// `local0`: every strip lies in one row (gemv_fused_eligible), so this is warp-uniform.
TERSOR_HD inline uint32_t gemv_strip_row(bool whole_rows, uint32_t row_len32, uint32_t local0, uint32_t strip) {
  return whole_rows ? (local0 + strip) / row_len32 : 0u;
}

// Lane `lane`'s share of one strip: weights [strip + 4 lane, +4) of a lane segment (symbols in
// row_words, raw bytes from the stream) times x, accumulated in fp32 per batch row in a fixed order.
template <bool kF16, int kB>
TERSOR_HD inline void gemv_lane_strip(const uint8_t* raw, const uint16_t* x, uint64_t K, uint64_t start, uint64_t col0,
                                      uint32_t local0, uint32_t strip, uint32_t n, uint32_t rl,
                                      const uint32_t* row_words, int lane, float (&p)[kB]) {
  using E = Half16<kF16>;
  const uint32_t e = strip + 4u * static_cast<uint32_t>(lane);
  if (e >= n) return;
  const uint32_t sym4 = row_words[e / 4];
  const uint32_t raw4 = ld_stream_u32(raw + start + local0 + e);
  const uint32_t w01 = merge16x2<0>(sym4, raw4), w23 = merge16x2<1>(sym4, raw4);
  const float w0 = E::lo(w01), w1 = E::hi(w01), w2 = E::lo(w23), w3 = E::hi(w23);
  const uint64_t col = col0 + local0 + e - static_cast<uint64_t>(rl) * K;  // 8-byte aligned: col % 4 == 0
  const uint16_t* xc = x + col;
  TERSOR_CODEC_UNROLL(unroll)
  for (int b = 0; b < kB; ++b) {
    const uint2 xv = ld_x_u2(xc + b * K);
    float v = p[b];
    v = fmaf(w0, E::lo(xv.x), v);
    v = fmaf(w1, E::hi(xv.x), v);
    v = fmaf(w2, E::lo(xv.y), v);
    v = fmaf(w3, E::hi(xv.y), v);
    p[b] = v;
  }
}

#if defined(__CUDACC__)

// Loads the decode table (coalesced 16-byte loads) and the stream's code lengths. Code lengths are
// clamped to kMaxCodeLen: a valid stream never exceeds it, and the clamp keeps the bit reader's
// shifts in range on a hostile one (whose lanes then fail the length check).
__device__ __forceinline__ void load_tables(BlockTables& t, const KStream& s) {
  const uint4* src = reinterpret_cast<const uint4*>(s.lut);
  uint4* dst = reinterpret_cast<uint4*>(t.lut);
  for (int i = threadIdx.x; i < kLutSize / 4; i += blockDim.x) dst[i] = __ldg(src + i);
  for (int i = threadIdx.x; i < 256; i += blockDim.x) {
    const uint32_t len = __ldg(s.stream + s.code_len_pos + i);
    t.code_len[i] = static_cast<uint8_t>(len > static_cast<uint32_t>(kMaxCodeLen) ? kMaxCodeLen : len);
  }
  __syncthreads();
}

// Validates chunk c's record and sets up this lane's reader. Warp-uniform result (every input of the
// decision is the same in all lanes or reduced across the warp). Checks: offsets 16-aligned, the first
// 0 and the last exactly the section size, the record at least the 64-byte lane table and inside the
// section, and align16(64 + sum of lane lengths) == record size, which bounds every lane inside it.
__device__ __forceinline__ bool open_chunk(const KStream& s, uint64_t c, uint32_t len, int lane, LaneState& st) {
  const uint64_t* offs = reinterpret_cast<const uint64_t*>(s.stream + s.offsets_pos);
  const uint64_t o0 = __ldg(offs + c), o1 = __ldg(offs + c + 1);
  if (o0 % kAlign != 0 || o1 % kAlign != 0 || o1 > s.exp_bytes || o0 >= o1 || o1 - o0 < kLaneTableBytes)
    return false;
  if ((c == 0 && o0 != 0) || (c + 1 == s.n_chunks && o1 != s.exp_bytes)) return false;
  const uint8_t* rec = s.stream + s.exp_pos + o0;
  const uint64_t rec_bytes = o1 - o0;
  const uint32_t mine = __ldg(reinterpret_cast<const uint16_t*>(rec) + lane);
  uint32_t incl = mine;
#pragma unroll
  for (int d = 1; d < kLanes; d <<= 1) {
    const uint32_t v = __shfl_up_sync(kFullMask, incl, d);
    if (lane >= d) incl += v;
  }
  const uint32_t total = __shfl_sync(kFullMask, incl, kLanes - 1);
  if (align_up(kLaneTableBytes + static_cast<uint64_t>(total), kAlign) != rec_bytes) return false;
  // Warm L1 with the start of the record: the 32 readers then refill from L1 instead of each paying
  // an L2 round trip per 32-byte sector on its critical path. Bounded so a big record cannot flush L1.
  for (uint32_t off = static_cast<uint32_t>(lane) * 128u; off < rec_bytes && off < 16384u; off += 32u * 128u)
    asm volatile("prefetch.global.L1 [%0];" ::"l"(rec + off));
  st.count = lane_count(len, s.lane_run, lane);
  st.bytes = mine;
  st.rd.init(reinterpret_cast<const uint32_t*>(rec), static_cast<uint32_t>(rec_bytes / 4),
             kLaneTableBytes + incl - mine);
  return true;
}

// Phase 1 for the whole warp: every lane decodes its part of segment `seg` into its scratch row. Returns
// (warp-uniformly) whether all lanes succeeded; on success the rows are visible to the whole warp.
__device__ __forceinline__ bool warp_decode_segment(LaneState& st, const BlockTables& t, uint32_t seg, uint32_t* scr,
                                                    int lane) {
  const bool lane_ok = decode_segment(st, t, seg, scr + lane * Traits::kRowWords);
  if (!__all_sync(kFullMask, lane_ok)) return false;
  __syncwarp();
  return true;
}

__device__ __forceinline__ void flag_error(int* err) {
  if (err) *err = 1;
}

// ---- launch helpers ----
// Blocks to launch for `work` warps' worth of chunks: never more than can be resident at once (the
// kernels loop over chunks), so each block loads the decode table once. The per-device resident count
// is cached by the caller (one cache per kernel instantiation).
template <class Kernel>
cudaError_t persistent_grid(Kernel kernel, uint64_t work_warps, std::atomic<int>* cache, int cache_len,
                            unsigned* grid) {
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  int slots = dev < cache_len ? cache[dev].load(std::memory_order_relaxed) : 0;
  if (slots <= 0) {
    int sms = 0, per_sm = 0;
    e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    if (e != cudaSuccess) return e;
    e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, Traits::kThreads, 0);
    if (e != cudaSuccess) return e;
    slots = sms * (per_sm > 0 ? per_sm : 1);
    if (dev < cache_len) cache[dev].store(slots, std::memory_order_relaxed);
  }
  const uint64_t want = (work_warps + Traits::kWarps - 1) / Traits::kWarps;
  *grid = static_cast<unsigned>(want < static_cast<uint64_t>(slots) ? want : static_cast<uint64_t>(slots));
  return cudaSuccess;
}

inline constexpr int kMaxCachedDevices = 64;

#endif  // __CUDACC__

}  // namespace tersor::codec::cuda_detail
