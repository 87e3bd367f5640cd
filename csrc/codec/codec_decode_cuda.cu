// codec v1 decode on CUDA: one warp per chunk, persistent blocks (see codec_cuda_common.cuh for the
// two-phase scheme). Templated on the element width only: fp8 e4m3 and e5m2 decode identically.
#include <cuda_runtime.h>

#include "codec/codec_cuda.h"
#include "codec/codec_cuda_common.cuh"

namespace tersor::codec {
namespace cuda_detail {
namespace {

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
      const uint32_t segs = chunk_segments(len, s.lane_run);
      const bool aligned = start % 4 == 0;
      for (uint32_t seg = 0; seg < segs; ++seg) {
        if (!(ok = warp_decode_segment(st, tables, seg, scr, lane))) break;
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
