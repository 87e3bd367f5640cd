// 2:4 sparse GEMM y [N, M] = x [N, K] @ W^T (+ bias) for many rows of x: mma.sp::ordered_metadata
// m16n8k32 with W as the sparse A operand (y^T = W x^T), a 3-stage cp.async pipeline (Sparse24GemmTraits).
// W's format v1 tiles are already in A-fragment order, so a lane's A registers are one 16-byte shared
// load and its metadata one 4-byte load; x's B fragments come from a swizzled tile through ldmatrix.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/smem_load.cuh"
#include "common/cuda_elem.cuh"
#include "common/mma_sp.cuh"
#include "sparse/sparse24_cuda.h"
#include "sparse/sparse24_format.h"

namespace tersor::sparse24 {
namespace {

using G = Sparse24GemmTraits;

// Issues the cp.async copies of k-step `kp` (dense columns 64 kp .. + 63) into one stage.
__device__ __forceinline__ void load_stage(uint8_t* stage, const uint16_t* __restrict__ values,
                                           const uint32_t* __restrict__ meta, const uint16_t* __restrict__ x,
                                           int64_t M, int64_t K, int64_t N, int64_t rb0, int64_t n0, int64_t kp) {
  const int t = threadIdx.x;
  const int64_t row_blocks = M / kRowAlign;
  uint8_t* vs = stage;
  uint8_t* ms = stage + G::kValueStageBytes;
  uint8_t* xs = ms + G::kMetaStageBytes;
  // Values: per row block, k-tiles 2kp and 2kp + 1 are 1 KiB contiguous (tile_offset).
#pragma unroll
  for (int i = 0; i < G::kValueStageBytes / 16 / G::kThreads; ++i) {
    const int c = t + i * G::kThreads, rbl = c >> 6, off = c & 63;
    const int64_t rb = gemm_stage_row_block(rb0 + rbl, row_blocks);  // past M: the last block (valid metadata)
    cp_async_16(vs + c * 16, values + tile_offset(K, rb, 2 * kp) + off * 8, 16);
  }
  if (t < G::kMetaStageBytes / 16) {
    const int rbl = t >> 3, off = t & 7;
    const int64_t rb = gemm_stage_row_block(rb0 + rbl, row_blocks);
    cp_async_16(ms + t * 16, meta + (rb * (K / kColAlign) + kp) * 32 + off * 4, 16);
  }
#pragma unroll
  for (int i = 0; i < G::kXStageBytes / 16 / G::kThreads; ++i) {
    const int c = t + i * G::kThreads, n = c >> 3, ch = c & 7;
    const bool ok = n0 + n < N;
    const uint16_t* src = ok ? x + (n0 + n) * K + kp * G::kBK + ch * 8 : x;
    cp_async_16(xs + gemm_x_chunk(n, ch) * 16, src, ok ? 16 : 0);
  }
}

// One k-tile (selector kSel) of a stage: 4 x 4 MMAs per warp.
template <typename T, int kSel>
__device__ __forceinline__ void compute_ktile(const uint8_t* stage, int warp_m, int warp_n, int lane,
                                              const uint32_t e[G::kMTiles], float acc[G::kMTiles][G::kNTiles][4]) {
  const uint8_t* vs = stage;
  const uint8_t* xs = stage + G::kValueStageBytes + G::kMetaStageBytes;
  uint32_t a[G::kMTiles][4];
#pragma unroll
  for (int mt = 0; mt < G::kMTiles; ++mt) {
    const uint4 v = *reinterpret_cast<const uint4*>(vs + ((warp_m * G::kMTiles + mt) * 2 + kSel) * 512 + lane * 16);
    a[mt][0] = v.x;
    a[mt][1] = v.y;
    a[mt][2] = v.z;
    a[mt][3] = v.w;
  }
#pragma unroll
  for (int nt = 0; nt < G::kNTiles; ++nt) {
    uint32_t b[4];
    const int n = gemm_ldmatrix_row(warp_n * G::kNTiles * 8 + nt * 8, lane);
    ldmatrix_x4(b, xs + gemm_x_chunk(n, gemm_ldmatrix_chunk(kSel, lane)) * 16);
#pragma unroll
    for (int mt = 0; mt < G::kMTiles; ++mt) mma_sp_m16n8k32_f32<T, kSel>(acc[mt][nt], a[mt], b, e[mt]);
  }
}

template <typename T>
__global__ void __launch_bounds__(G::kThreads, 1) sparse24_gemm_kernel(const uint16_t* __restrict__ values,
                                                                      const uint32_t* __restrict__ meta,
                                                                      const uint16_t* __restrict__ x, int64_t N,
                                                                      int64_t M, int64_t K, const T* __restrict__ bias,
                                                                      T* __restrict__ y) {
  extern __shared__ __align__(128) uint8_t smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warp_m = warp / G::kWarpsN, warp_n = warp % G::kWarpsN;
  const int64_t rb0 = static_cast<int64_t>(blockIdx.x) * G::kRowBlocks, n0 = static_cast<int64_t>(blockIdx.y) * G::kBN;
  const int64_t ksteps = K / G::kBK;
  float acc[G::kMTiles][G::kNTiles][4] = {};

#pragma unroll
  for (int s = 0; s < G::kStages - 1; ++s) {
    if (s < ksteps) load_stage(smem + s * G::kStageBytes, values, meta, x, M, K, N, rb0, n0, s);
    cp_async_commit();
  }
  for (int64_t kp = 0; kp < ksteps; ++kp) {
    cp_async_wait<G::kStages - 2>();
    __syncthreads();  // stage kp landed for every thread; every warp is done with stage kp - 1
    const int64_t next = kp + G::kStages - 1;
    if (next < ksteps) load_stage(smem + (next % G::kStages) * G::kStageBytes, values, meta, x, M, K, N, rb0, n0, next);
    cp_async_commit();
    const uint8_t* stage = smem + (kp % G::kStages) * G::kStageBytes;
    const uint32_t* ms = reinterpret_cast<const uint32_t*>(stage + G::kValueStageBytes);
    uint32_t e[G::kMTiles];
#pragma unroll
    for (int mt = 0; mt < G::kMTiles; ++mt) e[mt] = ms[(warp_m * G::kMTiles + mt) * 32 + lane];
    compute_ktile<T, 0>(stage, warp_m, warp_n, lane, e, acc);
    compute_ktile<T, 1>(stage, warp_m, warp_n, lane, e, acc);
  }
  cp_async_wait<0>();

  // D fragment: c0, c1 = (W row g, x rows 2q, 2q + 1), c2, c3 = (W row g + 8, same x rows).
  const int g = lane >> 2, q = lane & 3;
#pragma unroll
  for (int mt = 0; mt < G::kMTiles; ++mt)
#pragma unroll
    for (int i = 0; i < 4; i += 2) {
      const int64_t m = (rb0 + warp_m * G::kMTiles + mt) * kRowAlign + g + 8 * (i >> 1);
      if (m >= M) continue;
      const float bm = bias != nullptr ? ElemIO<T>::to_float(bias[m]) : 0.f;
#pragma unroll
      for (int nt = 0; nt < G::kNTiles; ++nt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int64_t n = n0 + warp_n * G::kNTiles * 8 + nt * 8 + 2 * q + h;
          if (n < N) y[n * M + m] = ElemIO<T>::from_float(acc[mt][nt][i + h] + bm);
        }
    }
}

template <typename T>
cudaError_t launch_gemm_t(const Sparse24Args& a, const void* x, int64_t batch, const void* bias, void* y,
                          cudaStream_t stream) {
  // Opt-in above 48 KiB of dynamic shared memory (per device, so set on every launch; it is cheap).
  const cudaError_t err = cudaFuncSetAttribute(sparse24_gemm_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               G::kSmemBytes);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>((a.M / kRowAlign + G::kRowBlocks - 1) / G::kRowBlocks),
                  static_cast<unsigned>((batch + G::kBN - 1) / G::kBN));
  sparse24_gemm_kernel<T><<<grid, G::kThreads, G::kSmemBytes, stream>>>(
      static_cast<const uint16_t*>(a.values), a.meta, static_cast<const uint16_t*>(x), batch, a.M, a.K,
      static_cast<const T*>(bias), static_cast<T*>(y));
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_sparse24_gemm(const Sparse24Args& a, const void* x, int64_t batch, const void* bias, void* y,
                                 cudaStream_t stream) {
  if (batch < 1 || batch > 65535LL * G::kBN || a.M % kRowAlign != 0 || a.K % kColAlign != 0) {
    return cudaErrorInvalidValue;
  }
  if (a.dtype == DType::kFloat16) return launch_gemm_t<__half>(a, x, batch, bias, y, stream);
  if (a.dtype == DType::kBFloat16) return launch_gemm_t<__nv_bfloat16>(a, x, batch, bias, y, stream);
  return cudaErrorInvalidValue;
}

}  // namespace tersor::sparse24
