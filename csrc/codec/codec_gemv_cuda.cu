// Fused codec v1 decode + GEMV on CUDA: y = x W^T (+ bias) for 1..8 rows of x, W [N, K] bf16/fp16 in a
// codec stream. The weight is never materialised: each warp decodes a chunk (phase 1 as in the
// decode kernel, see codec_cuda_common.cuh) and, in phase 2, multiplies 128-element strips of it with
// x, lane t taking 4 consecutive weights. Every strip lies in one row of W (gemv_fused_eligible), so
// per-lane fp32 partial sums are kept in registers while consecutive strips stay in the same row and
// are reduced across the warp only when the row changes, into per-warp shared accumulators
// acc[b][row - first row of the chunk]. One warp does all adds to its accumulators, in an order that
// depends only on the geometry, so results are identical run to run.
// Chunks of whole rows write y directly; chunks that are pieces of a row write an fp32 partial per
// (batch row, chunk), which a second small kernel sums in chunk order.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "codec/codec_cuda.h"
#include "codec/codec_cuda_common.cuh"

namespace tersor::codec {
namespace cuda_detail {
namespace {

constexpr uint32_t kMaxRows = Traits::kMaxRowsPerChunk;
constexpr uint32_t kNoRow = 0xffffffffu;

// Reduces every batch row's per-lane partial over the warp (fixed xor order) and adds it to the row's
// accumulator; lane b owns acc[b][*], so each accumulator has a single writer in program order.
template <int kB>
__device__ __forceinline__ void flush_row(float* acc, uint32_t row, float (&p)[kB], int lane) {
  float mine = 0.f;
#pragma unroll
  for (int b = 0; b < kB; ++b) {
    float v = p[b];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
    if (lane == b) mine = v;
    p[b] = 0.f;
  }
  if (lane < kB) acc[lane * kMaxRows + row] += mine;
}

template <bool kF16, int kB>
__global__ void __launch_bounds__(Traits::kThreads)
    codec_gemv_kernel(const KStream s, const uint16_t* __restrict__ x, const uint16_t* __restrict__ bias,
                      uint16_t* __restrict__ y, float* __restrict__ partials, int* __restrict__ err) {
  using E = Half16<kF16>;
  __shared__ BlockTables tables;
  __shared__ uint32_t scratch[Traits::kWarps][kLanes * Traits::kRowWords];
  __shared__ float acc_all[Traits::kWarps][kB * kMaxRows];
  load_tables(tables, s);

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint32_t* scr = scratch[warp];
  float* acc = acc_all[warp];
  const uint8_t* raw = s.stream + s.raw_pos;
  const uint64_t K = s.row_len, N = s.numel / K;
  const bool whole = geom_whole_rows(s.geom());
  const uint32_t k32 = whole ? static_cast<uint32_t>(K) : 1u;  // whole rows: K <= chunk_elems <= 2^20
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * Traits::kWarps;
  for (uint64_t c = static_cast<uint64_t>(blockIdx.x) * Traits::kWarps + warp; c < s.n_chunks; c += stride) {
    uint64_t start;
    uint32_t len;
    geom_chunk(s.geom(), c, &start, &len);
    const uint64_t first_row = start / K;
    const uint64_t col0 = start - first_row * K;  // 0 for chunks of whole rows
    const uint32_t rows = whole ? len / k32 : 1u;
    for (uint32_t i = lane; i < kB * kMaxRows; i += kLanes) acc[i] = 0.f;
    __syncwarp();

    LaneState st;
    bool ok = open_chunk(s, c, len, lane, st);
    if (ok) {
      float p[kB];
#pragma unroll
      for (int b = 0; b < kB; ++b) p[b] = 0.f;
      uint32_t cur = kNoRow;
      const uint32_t segs = chunk_segments(len, s.lane_run);
      for (uint32_t seg = 0; seg < segs; ++seg) {
        if (!(ok = warp_decode_segment(st, tables, seg, scr, lane))) break;
        const uint32_t first = seg * Traits::kSegment;
        for (int l = 0; l < kLanes; ++l) {
          const uint32_t n = segment_count(len, s.lane_run, l, first);  // a multiple of 4 (eligibility)
          if (n == 0) break;
          const uint32_t local0 = l * s.lane_run + first;
          const uint32_t* row_words = scr + l * Traits::kRowWords;
          for (uint32_t strip = 0; strip < n; strip += 128u) {
            const uint32_t rl = gemv_strip_row(whole, k32, local0, strip);  // warp-uniform
            if (rl != cur) {
              if (cur != kNoRow) flush_row<kB>(acc, cur, p, lane);
              cur = rl;
            }
            gemv_lane_strip<kF16, kB>(raw, x, K, start, col0, local0, strip, n, rl, row_words, lane, p);
          }
        }
        __syncwarp();  // the next phase 1 overwrites the rows just read
      }
      if (ok) {
        if (cur != kNoRow) flush_row<kB>(acc, cur, p, lane);
        ok = __all_sync(kFullMask, lane_length_matches(st.rd.consumed, st.bytes));
      }
    }
    __syncwarp();
    if (!ok) {
      // A corrupt chunk contributes nothing (as if its weights were zero).
      for (uint32_t i = lane; i < kB * kMaxRows; i += kLanes) acc[i] = 0.f;
      if (lane == 0) flag_error(err);
      __syncwarp();
    }
    if (whole) {
      for (uint32_t i = lane; i < kB * rows; i += kLanes) {
        const uint32_t b = i / rows, r = i - b * rows;
        const uint64_t row = first_row + r;
        float v = acc[b * kMaxRows + r];
        if (bias) v += E::one(bias[row]);
        y[gemv_out_index(static_cast<int>(b), N, row)] = E::round(v);
      }
    } else if (lane < kB) {
      partials[gemv_partial_index(lane, s.n_chunks, c)] = acc[lane * kMaxRows];
    }
    __syncwarp();  // the accumulators are cleared for the next chunk
  }
}

// Split rows: y[b][row] = sum of the row's chunk partials in chunk order (+ bias), rounded once.
template <bool kF16>
__global__ void __launch_bounds__(256)
    codec_gemv_finalize_kernel(const float* __restrict__ partials, const uint16_t* __restrict__ bias,
                               uint16_t* __restrict__ y, uint64_t N, uint64_t n_chunks, uint64_t per_row,
                               uint64_t total) {
  using E = Half16<kF16>;
  for (uint64_t i = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<uint64_t>(gridDim.x) * blockDim.x) {
    const uint64_t b = i / N, row = i - b * N;
    const float* p = partials + gemv_partial_index(static_cast<int>(b), n_chunks, row * per_row);
    float v = 0.f;
    for (uint64_t j = 0; j < per_row; ++j) v += p[j];
    if (bias) v += E::one(bias[row]);
    y[i] = E::round(v);
  }
}

template <bool kF16, int kB>
cudaError_t launch_gemv_fixed(const KStream& s, const void* x, const void* bias, void* y, float* partials, int* err,
                              cudaStream_t stream) {
  static std::atomic<int> cache[kMaxCachedDevices];
  auto kernel = codec_gemv_kernel<kF16, kB>;
  unsigned grid = 0;
  cudaError_t e = persistent_grid(kernel, s.n_chunks, cache, kMaxCachedDevices, &grid);
  if (e != cudaSuccess) return e;
  const auto* xb = static_cast<const uint16_t*>(x);
  const auto* bb = static_cast<const uint16_t*>(bias);
  auto* yb = static_cast<uint16_t*>(y);
  kernel<<<grid, Traits::kThreads, 0, stream>>>(s, xb, bb, yb, partials, err);
  e = cudaGetLastError();
  if (e != cudaSuccess || geom_whole_rows(s.geom())) return e;
  const uint64_t N = s.numel / s.row_len, total = N * kB;
  const uint64_t blocks = (total + 255) / 256;
  const unsigned fgrid = static_cast<unsigned>(blocks < 4096 ? blocks : 4096);
  codec_gemv_finalize_kernel<kF16><<<fgrid, 256, 0, stream>>>(partials, bb, yb, N, s.n_chunks,
                                                              geom_chunks_per_row(s.geom()), total);
  return cudaGetLastError();
}

template <bool kF16>
cudaError_t launch_gemv_typed(const KStream& s, const void* x, int batch, const void* bias, void* y, float* partials,
                              int* err, cudaStream_t stream) {
  static_assert(Traits::kMaxBatch == 8, "one case per batch size below");
  switch (batch) {
    case 1: return launch_gemv_fixed<kF16, 1>(s, x, bias, y, partials, err, stream);
    case 2: return launch_gemv_fixed<kF16, 2>(s, x, bias, y, partials, err, stream);
    case 3: return launch_gemv_fixed<kF16, 3>(s, x, bias, y, partials, err, stream);
    case 4: return launch_gemv_fixed<kF16, 4>(s, x, bias, y, partials, err, stream);
    case 5: return launch_gemv_fixed<kF16, 5>(s, x, bias, y, partials, err, stream);
    case 6: return launch_gemv_fixed<kF16, 6>(s, x, bias, y, partials, err, stream);
    case 7: return launch_gemv_fixed<kF16, 7>(s, x, bias, y, partials, err, stream);
    case 8: return launch_gemv_fixed<kF16, 8>(s, x, bias, y, partials, err, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace
}  // namespace cuda_detail

cudaError_t launch_codec_gemv(const DeviceStreamView& v, const void* x, int batch, const void* bias, void* y,
                              float* partials, int* err_flag, cudaStream_t stream) {
  using namespace cuda_detail;
  if (!view_ok(v) || !gemv_fused_eligible(v, batch) || !x || !y) return cudaErrorInvalidValue;
  if (reinterpret_cast<uintptr_t>(x) % kAlign || reinterpret_cast<uintptr_t>(y) % 2 ||
      reinterpret_cast<uintptr_t>(bias) % 2)
    return cudaErrorInvalidValue;
  if (gemv_needs_partials(v) && !partials) return cudaErrorInvalidValue;
  const KStream s = make_kstream(v);
  if (v.dtype == WireDType::kBFloat16) return launch_gemv_typed<false>(s, x, batch, bias, y, partials, err_flag, stream);
  return launch_gemv_typed<true>(s, x, batch, bias, y, partials, err_flag, stream);
}

}  // namespace tersor::codec
