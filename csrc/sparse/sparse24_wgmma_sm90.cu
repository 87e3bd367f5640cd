// 2:4 sparse GEMM y [N, M] = x [N, K] @ W^T (+ bias) for Hopper (sm90a): wgmma.mma_async.sp m64n128k32 with
// W as the sparse A operand from registers (y^T = W x^T) and x as B from shared memory through a matrix
// descriptor; a 4-stage cp.async pipeline; plan and tile in Sparse24Sm90Traits, addressing in
// sparse24_sm90_layout.h (shared with the CPU replay _sparse24_emulate_sm90_linear).
// Format v1 tiles are the per-warp wgmma.sp A fragment and metadata register already: a warp's A
// registers for one k-tile are one 16-byte shared load, its metadata one 4-byte load.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_elem.cuh"
#include "common/smem_load.cuh"
#include "common/wgmma.cuh"
#include "common/wgmma_sp.cuh"
#include "sparse/sparse24_cuda.h"
#include "sparse/sparse24_format.h"
#include "sparse/sparse24_sm90_layout.h"

namespace tersor::sparse24 {
namespace {

using S = Sparse24Sm90Traits;

// Issues the cp.async copies of k-step `kp` (dense columns 64 kp .. + 63) into one stage. Rows of W past
// M copy the last valid row block (gemm_stage_row_block, the rule the mma.sp GEMM shares: zero metadata is
// not valid ::ordered_metadata) and rows of x past N the last valid row; both only reach masked outputs.
__device__ __forceinline__ void load_stage(uint8_t* stage, const uint16_t* __restrict__ values,
                                           const uint32_t* __restrict__ meta, const uint16_t* __restrict__ x,
                                           int64_t M, int64_t K, int64_t N, int64_t rb0, int64_t n0, int64_t kp) {
  const int t = threadIdx.x;
  const int64_t row_blocks = M / kRowAlign;
#pragma unroll
  for (int i = 0; i < S::kXStageBytes / 16 / S::kThreads; ++i) {
    const XChunk c = sm90_x_chunk(t + i * S::kThreads);
    const int64_t row = n0 + c.n < N ? n0 + c.n : N - 1;
    cp_async_16(stage + S::kXOffset + sm90_x_store_offset(c.n, 8 * c.ch), x + row * K + kp * S::kBK + c.ch * 8);
  }
#pragma unroll
  for (int i = 0; i < S::kValueStageBytes / 16 / S::kThreads; ++i) {
    const int c = t + i * S::kThreads, rbl = c >> 6, off = c & 63;  // 64 chunks = two k-tiles of a row block
    const int64_t rb = gemm_stage_row_block(rb0 + rbl, row_blocks);
    cp_async_16(stage + S::kValueOffset + c * 16, values + tile_offset(K, rb, 2 * kp) + off * 8);
  }
  if (t < S::kMetaStageBytes / 16) {
    const int rbl = t >> 3, off = t & 7;
    const int64_t rb = gemm_stage_row_block(rb0 + rbl, row_blocks);
    cp_async_16(stage + S::kMetaOffset + t * 16, meta + (rb * (K / kColAlign) + kp) * 32 + off * 4);
  }
}

__device__ __forceinline__ void fence_accumulators(float (&acc)[S::kNInstr][S::kAccPerInstr]) {
#pragma unroll
  for (int ni = 0; ni < S::kNInstr; ++ni)
#pragma unroll
    for (int i = 0; i < S::kAccPerInstr; ++i) wgmma_fence_operand(acc[ni][i]);
}

// One k-step: this warp's A registers (both k-tiles) and metadata from the stage, then 2 k-tiles x kNInstr
// wgmma as one group. `a` must not be the registers of the group still in flight (the caller alternates
// two sets); after issuing, waits until at most this group is pending, then keeps `a_prev` (the retired
// group's registers) alive up to that point so the compiler cannot reuse them while the hardware reads them.
template <typename T>
__device__ __forceinline__ void mma_step(const uint8_t* stage, uint32_t stage_smem, int rbl, int lane,
                                         uint32_t (&a)[2][4], uint32_t (&a_prev)[2][4], uint32_t& e,
                                         uint32_t& e_prev, float (&acc)[S::kNInstr][S::kAccPerInstr]) {
#pragma unroll
  for (int sel = 0; sel < 2; ++sel) {
    const uint4 v = *reinterpret_cast<const uint4*>(stage + S::kValueOffset + sm90_value_offset(rbl, sel, lane));
    a[sel][0] = v.x;
    a[sel][1] = v.y;
    a[sel][2] = v.z;
    a[sel][3] = v.w;
  }
  e = reinterpret_cast<const uint32_t*>(stage + S::kMetaOffset)[sm90_meta_word(rbl, lane)];
  fence_accumulators(acc);
  wgmma_fence();
#pragma unroll
  for (int ni = 0; ni < S::kNInstr; ++ni) {
    const DescFields f0 = sm90_b_desc_fields(0, ni), f1 = sm90_b_desc_fields(1, ni);
    wgmma_sp_m64n128k32_f32<T, 0>(acc[ni], a[0], wgmma_smem_desc(stage_smem + f0.start, f0.lbo, f0.sbo), e);
    wgmma_sp_m64n128k32_f32<T, 1>(acc[ni], a[1], wgmma_smem_desc(stage_smem + f1.start, f1.lbo, f1.sbo), e);
  }
  wgmma_commit_group();
  fence_accumulators(acc);
  wgmma_wait_group<1>();
#pragma unroll
  for (int sel = 0; sel < 2; ++sel)
#pragma unroll
    for (int r = 0; r < 4; ++r) wgmma_fence_operand(a_prev[sel][r]);
  wgmma_fence_operand(e_prev);
}

template <typename T>
__global__ void __launch_bounds__(S::kThreads, 1) sparse24_sm90_kernel(const uint16_t* __restrict__ values,
                                                                      const uint32_t* __restrict__ meta,
                                                                      const uint16_t* __restrict__ x, int64_t N,
                                                                      int64_t M, int64_t K, const T* __restrict__ bias,
                                                                      T* __restrict__ y) {
  extern __shared__ __align__(1024) uint8_t smem[];
  const int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
  const int rbl = sm90_warp_row_block(wg, warp);
  const int64_t grid_m = (M / kRowAlign + S::kRowBlocks - 1) / S::kRowBlocks, grid_n = (N + S::kBN - 1) / S::kBN;
  const TileCoord tile = sm90_block_tile(blockIdx.x, grid_m, grid_n);
  const int64_t rb0 = tile.tm * S::kRowBlocks, n0 = tile.tn * S::kBN;
  const int64_t ksteps = K / S::kBK;
  const uint32_t smem_base = smem_u32(smem);
  float acc[S::kNInstr][S::kAccPerInstr];
#pragma unroll
  for (int ni = 0; ni < S::kNInstr; ++ni)
#pragma unroll
    for (int i = 0; i < S::kAccPerInstr; ++i) acc[ni][i] = 0.f;
  uint32_t a_even[2][4] = {}, a_odd[2][4] = {}, e_even = 0, e_odd = 0;

#pragma unroll
  for (int s = 0; s < S::kStages - 2; ++s) {
    if (s < ksteps) load_stage(smem + s * S::kStageBytes, values, meta, x, M, K, N, rb0, n0, s);
    cp_async_commit();
  }
  for (int64_t kp = 0; kp < ksteps; ++kp) {
    cp_async_wait<S::kStages - 3>();
    // cp.async writes through the generic proxy, wgmma reads B through the async proxy.
    fence_proxy_async_shared();
    // Stage kp landed for every thread; every warpgroup waited for its step kp - 2 group at the end of
    // step kp - 1, so the stage of kp - 2 is free to overwrite.
    __syncthreads();
    const int64_t next = kp + S::kStages - 2;
    if (next < ksteps) load_stage(smem + (next % S::kStages) * S::kStageBytes, values, meta, x, M, K, N, rb0, n0, next);
    cp_async_commit();
    const int st = static_cast<int>(kp % S::kStages);
    const uint8_t* stage = smem + st * S::kStageBytes;
    const uint32_t stage_x = smem_base + st * S::kStageBytes + S::kXOffset;
    if ((kp & 1) == 0) {
      mma_step<T>(stage, stage_x, rbl, lane, a_even, a_odd, e_even, e_odd, acc);
    } else {
      mma_step<T>(stage, stage_x, rbl, lane, a_odd, a_even, e_odd, e_even, acc);
    }
  }
  wgmma_wait_group<0>();
  fence_accumulators(acc);
  cp_async_wait<0>();

  // d[i] of lane (g, q) in warp w: W row 16 w + g (+ 8 for i % 4 >= 2), x row 8 (i / 4) + 2 q + i % 2.
  // Offsets inside the tile stay 32-bit (the tile is 256 rows of x) to keep the epilogue's registers few.
  const int64_t m_base = (rb0 + 4 * wg) * kRowAlign;
  const int n_valid = N - n0 < S::kBN ? static_cast<int>(N - n0) : S::kBN;
#pragma unroll
  for (int hi = 0; hi < 2; ++hi) {
    const int64_t m = m_base + sm90_d_pos(warp, lane, 2 * hi).m;
    if (m >= M) continue;
    const float bm = bias != nullptr ? ElemIO<T>::to_float(bias[m]) : 0.f;
    T* y_col = y + n0 * M + m;
#pragma unroll
    for (int ni = 0; ni < S::kNInstr; ++ni)
#pragma unroll
      for (int j = 0; j < S::kAccPerInstr / 4; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int i = 4 * j + 2 * hi + h;
          const int n = ni * S::kInstrN + sm90_d_pos(warp, lane, i).n;
          if (n < n_valid) y_col[static_cast<int64_t>(n) * M] = ElemIO<T>::from_float(acc[ni][i] + bm);
        }
  }
}

template <typename T>
cudaError_t launch_t(const Sparse24Args& a, const void* x, int64_t batch, const void* bias, void* y,
                     cudaStream_t stream) {
  const cudaError_t err =
      cudaFuncSetAttribute(sparse24_sm90_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, S::kSmemBytes);
  if (err != cudaSuccess) return err;
  const int64_t blocks = (a.M / kRowAlign + S::kRowBlocks - 1) / S::kRowBlocks * ((batch + S::kBN - 1) / S::kBN);
  const dim3 grid(static_cast<unsigned>(blocks));
  sparse24_sm90_kernel<T><<<grid, S::kThreads, S::kSmemBytes, stream>>>(
      static_cast<const uint16_t*>(a.values), a.meta, static_cast<const uint16_t*>(x), batch, a.M, a.K,
      static_cast<const T*>(bias), static_cast<T*>(y));
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_sparse24_gemm_sm90(const Sparse24Args& a, const void* x, int64_t batch, const void* bias, void* y,
                                      cudaStream_t stream) {
  const int64_t grid_m = (a.M / kRowAlign + S::kRowBlocks - 1) / S::kRowBlocks;
  if (batch < 1 || grid_m * ((batch + S::kBN - 1) / S::kBN) > 0x7fffffffLL || a.M < kRowAlign ||
      a.M % kRowAlign != 0 || a.K < kColAlign || a.K % kColAlign != 0) {
    return cudaErrorInvalidValue;
  }
  if (a.dtype == DType::kFloat16) return launch_t<__half>(a, x, batch, bias, y, stream);
  if (a.dtype == DType::kBFloat16) return launch_t<__nv_bfloat16>(a, x, batch, bias, y, stream);
  return cudaErrorInvalidValue;
}

}  // namespace tersor::sparse24
