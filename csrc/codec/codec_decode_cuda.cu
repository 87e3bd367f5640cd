// codec v1 decode on CUDA: one warp per chunk, persistent blocks (see codec_cuda_common.cuh for the
// two-phase scheme). Templated on the element width only: fp8 e4m3 and e5m2 decode identically.
#include <cuda_runtime.h>

#include "codec/codec_cuda.h"
#include "codec/codec_cuda_common.cuh"

namespace tersor::codec {
namespace cuda_detail {
namespace {

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
    const uint64_t g0 = start + static_cast<uint64_t>(l) * s.lane_run + first;
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

template <int kEB>
__global__ void __launch_bounds__(Traits::kThreads)
    codec_decode_kernel(const KStream s, uint8_t* __restrict__ out, int* __restrict__ err) {
  __shared__ BlockTables tables;
  __shared__ uint32_t scratch[Traits::kWarps][kLanes * Traits::kRowWords];
  load_tables(tables, s);

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint32_t* scr = scratch[warp];
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * Traits::kWarps;
  for (uint64_t c = static_cast<uint64_t>(blockIdx.x) * Traits::kWarps + warp; c < s.n_chunks; c += stride) {
    uint64_t start;
    uint32_t len;
    geom_chunk(s.geom(), c, &start, &len);
    LaneState st;
    bool ok = open_chunk(s, c, len, lane, st);
    if (ok) {
      // Lane 0 owns the most symbols, so its count sets the number of segments.
      const uint32_t segs = (lane_count(len, s.lane_run, 0) + Traits::kSegment - 1) / Traits::kSegment;
      const bool aligned = start % 4 == 0;
      for (uint32_t seg = 0; seg < segs; ++seg) {
        const bool lane_ok = decode_segment(st, tables, seg, scr + lane * Traits::kRowWords);
        if (!__all_sync(kFullMask, lane_ok)) {
          ok = false;
          break;
        }
        __syncwarp();
        emit_segment<kEB>(s, out, scr, start, len, seg * Traits::kSegment, aligned, lane);
        __syncwarp();  // the next phase 1 overwrites the rows just read
      }
      if (ok) ok = __all_sync(kFullMask, lane_length_matches(st.rd.consumed, st.bytes));
    }
    if (!ok) {
      // A corrupt chunk reads as zeros (it may already be partly written).
      uint8_t* dst = out + start * kEB;
      for (uint64_t i = lane; i < static_cast<uint64_t>(len) * kEB; i += kLanes) dst[i] = 0;
      if (lane == 0) flag_error(err);
    }
  }
}

template <int kEB>
cudaError_t launch_decode_typed(const KStream& s, void* out, int* err, cudaStream_t stream) {
  static std::atomic<int> cache[kMaxCachedDevices];
  auto kernel = codec_decode_kernel<kEB>;
  unsigned grid = 0;
  cudaError_t e = persistent_grid(kernel, s.n_chunks, cache, kMaxCachedDevices, &grid);
  if (e != cudaSuccess) return e;
  kernel<<<grid, Traits::kThreads, 0, stream>>>(s, static_cast<uint8_t*>(out), err);
  return cudaGetLastError();
}

}  // namespace
}  // namespace cuda_detail

cudaError_t launch_codec_decode(const DeviceStreamView& v, void* out, int* err_flag, cudaStream_t stream) {
  using namespace cuda_detail;
  if (!view_ok(v) || (!out && v.numel)) return cudaErrorInvalidValue;
  if (reinterpret_cast<uintptr_t>(out) % kAlign) return cudaErrorInvalidValue;
  if (v.n_chunks == 0) return cudaSuccess;
  const KStream s = make_kstream(v);
  switch (wire_dtype_bytes(v.dtype)) {
    case 1: return launch_decode_typed<1>(s, out, err_flag, stream);
    case 2: return launch_decode_typed<2>(s, out, err_flag, stream);
    case 4: return launch_decode_typed<4>(s, out, err_flag, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace tersor::codec
