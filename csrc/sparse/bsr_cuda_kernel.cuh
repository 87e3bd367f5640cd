// The BSR tensor-core kernel (included by one .cu per dtype). y = x @ W^T (+ bias):
// one CTA per (work item, token tile); an item is a run of weight blocks of one block row (schedule in
// bsr_format.h). Each block and the x tile at its column are staged in shared memory with cp.async
// (kStages-deep pipeline), read into mma.m16n8k16 fragments with ldmatrix (weight rows = MMA M, tokens =
// MMA N, block columns = K), accumulated in fp32. An item that covers its whole row adds the bias and
// rounds once; a chunk of a split row writes fp32 partials that bsr_partial_sum_kernel adds in slot
// order. No atomics: the result is deterministic.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "common/cuda_elem.cuh"
#include "common/smem_load.cuh"
#include "common/mma.cuh"
#include "sparse/bsr_cuda.h"
#include "sparse/bsr_cuda_traits.h"
#include "sparse/bsr_format.h"

namespace tersor::sparse {

template <typename Elem>
__device__ __forceinline__ void mma_16bit(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<Elem, __half>)
    mma_m16n8k16_f16_f32(c, a, b0, b1);
  else
    mma_m16n8k16_bf16_f32(c, a, b0, b1);
}

template <typename Elem, int BS, int TN>
__global__ void __launch_bounds__(BsrTile<BS, TN>::kThreads)
    bsr_mm_kernel(const Elem* __restrict__ x, const Elem* __restrict__ values, const int32_t* __restrict__ col,
                  const int32_t* __restrict__ items, const Elem* __restrict__ bias, Elem* __restrict__ y,
                  float* __restrict__ partial, int tokens, int in_features, int out_features) {
  using Tile = BsrTile<BS, TN>;
  constexpr int cpr = bsr_chunks_per_row(BS);
  extern __shared__ __align__(16) uint16_t smem[];

  const int32_t* it = items + kItemInts * blockIdx.x;
  const int row = it[kItemRow], begin = it[kItemBegin], end = it[kItemEnd], slot = it[kItemSlot];
  const int tok0 = blockIdx.y * TN;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wm = warp % Tile::kWarpsM, wn = warp / Tile::kWarpsM;
  const int warp_tok = wn * Tile::kWarpTokens;
  const uint16_t* xg = reinterpret_cast<const uint16_t*>(x);
  const uint16_t* vg = reinterpret_cast<const uint16_t*>(values);

  auto load_stage = [&](int stage, int j) {
    uint16_t* ws = smem + stage * Tile::kStageElems;
    uint16_t* xs = ws + BS * BS;
    // int64 offsets: bsr_format.h
#pragma unroll
    for (int c = tid; c < BS * cpr; c += Tile::kThreads) {
      const int r = bsr_copy_row(BS, c), ch = bsr_copy_chunk(BS, c);
      cp_async_16(ws + bsr_smem_chunk(BS, r, ch) * 8, vg + bsr_value_offset(j, BS, r) + ch * 8, 16);
    }
    const int32_t kb = col[j];
#pragma unroll
    for (int c = tid; c < TN * cpr; c += Tile::kThreads) {
      const int t = bsr_copy_row(BS, c), ch = bsr_copy_chunk(BS, c);
      const bool ok = tok0 + t < tokens;
      const uint16_t* src = ok ? xg + bsr_x_offset(tok0 + t, in_features, kb, BS) + ch * 8 : xg;
      cp_async_16(xs + bsr_smem_chunk(BS, t, ch) * 8, src, ok ? 16 : 0);
    }
  };

  float acc[Tile::kNFrags][4];
#pragma unroll
  for (int f = 0; f < Tile::kNFrags; ++f)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[f][e] = 0.f;

  const int n = end - begin;
#pragma unroll
  for (int s = 0; s < Tile::kStages - 1; ++s) {
    if (s < n) load_stage(s, begin + s);
    cp_async_commit();  // empty groups keep the wait counts uniform
  }
  for (int i = 0; i < n; ++i) {
    cp_async_wait<Tile::kStages - 2>();
    __syncthreads();  // stage i landed for every thread; stage i - 1 is free again
    const int next = i + Tile::kStages - 1;
    if (next < n) load_stage(next % Tile::kStages, begin + next);
    cp_async_commit();
    const uint16_t* ws = smem + (i % Tile::kStages) * Tile::kStageElems;
    const uint16_t* xs = ws + BS * BS;
#pragma unroll
    for (int k16 = 0; k16 < Tile::kK16; ++k16) {
      uint32_t a[4];
      ldmatrix_x4(a, ws + bsr_smem_chunk(BS, wm * 16 + bsr_a_ld_row(lane), bsr_a_ld_chunk(lane, k16)) * 8);
      if constexpr (Tile::kNFrags == 1) {
        uint32_t b[2];
        const int l16 = lane % 16;  // .x2 reads lanes 0-15 only
        ldmatrix_x2(b, xs + bsr_smem_chunk(BS, warp_tok + bsr_b_ld_token(l16), bsr_b_ld_chunk(l16, k16)) * 8);
        mma_16bit<Elem>(acc[0], a, b[0], b[1]);
      } else {
#pragma unroll
        for (int fp = 0; fp < Tile::kNFrags / 2; ++fp) {
          if (tok0 + warp_tok + fp * 16 < tokens) {  // skip pairs wholly past the last token (warp-uniform)
            uint32_t b[4];
            ldmatrix_x4(b, xs + bsr_smem_chunk(BS, warp_tok + fp * 16 + bsr_b_ld_token(lane),
                                               bsr_b_ld_chunk(lane, k16)) * 8);
            mma_16bit<Elem>(acc[2 * fp], a, b[0], b[1]);
            mma_16bit<Elem>(acc[2 * fp + 1], a, b[2], b[3]);
          }
        }
      }
    }
  }
  cp_async_wait<0>();

#pragma unroll
  for (int f = 0; f < Tile::kNFrags; ++f)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int m = wm * 16 + mma_c_row(lane, e);
      const int t = tok0 + warp_tok + f * 8 + mma_c_col(lane, e);
      if (t >= tokens) continue;
      if (slot < 0) {
        const float b = bias ? ElemIO<Elem>::to_float(bias[row * BS + m]) : 0.f;
        y[bsr_y_offset(t, out_features, row, BS, m)] = ElemIO<Elem>::from_float(acc[f][e] + b);
      } else {
        partial[bsr_partial_index(slot, t, m, tokens, BS)] = acc[f][e];
      }
    }
}

// Rows cut into several items: their partials summed in slot order, then bias, one rounding.
template <typename Elem, int BS>
__global__ void __launch_bounds__(BsrReduceTraits::kThreads)
    bsr_partial_sum_kernel(const float* __restrict__ partial, const int32_t* __restrict__ partial_ptr,
                           const Elem* __restrict__ bias, Elem* __restrict__ y, int tokens, int out_features,
                           int64_t total) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * BsrReduceTraits::kThreads + threadIdx.x;
  if (idx >= total) return;
  const int m = static_cast<int>(idx % BS);
  const int t = static_cast<int>((idx / BS) % tokens);
  const int r = static_cast<int>(idx / (static_cast<int64_t>(BS) * tokens));
  const int p0 = partial_ptr[r], p1 = partial_ptr[r + 1];
  if (p0 == p1) return;  // written directly by its single item
  float s = 0.f;
  for (int p = p0; p < p1; ++p) s += partial[bsr_partial_index(p, t, m, tokens, BS)];
  const float b = bias ? ElemIO<Elem>::to_float(bias[r * BS + m]) : 0.f;
  y[bsr_y_offset(t, out_features, r, BS, m)] = ElemIO<Elem>::from_float(s + b);
}

template <typename Elem, int BS, int TN>
cudaError_t launch_tile(const BsrKernelArgs& a, cudaStream_t stream) {
  using Tile = BsrTile<BS, TN>;
  // Every tile fits the default dynamic shared-memory limit, so no per-device opt-in is needed.
  static_assert(Tile::kSmemBytes <= 48 * 1024, "tile needs cudaFuncAttributeMaxDynamicSharedMemorySize");
  auto kernel = bsr_mm_kernel<Elem, BS, TN>;
  const bool split = bsr_use_split(a.tokens);
  const int64_t n_items = split ? a.n_split : a.mb;
  const int32_t* items = a.schedule + (split ? bsr_split_items_offset(a.mb) : bsr_row_items_offset(a.mb));
  const int64_t tiles = (a.tokens + TN - 1) / TN;
  if (n_items > 0x7fffffff || tiles > kBsrMaxTokenTiles) return cudaErrorInvalidConfiguration;  // glue checks first
  const dim3 grid(static_cast<unsigned>(n_items), static_cast<unsigned>(tiles));
  kernel<<<grid, Tile::kThreads, Tile::kSmemBytes, stream>>>(
      static_cast<const Elem*>(a.x), static_cast<const Elem*>(a.values), a.col, items,
      static_cast<const Elem*>(a.bias), static_cast<Elem*>(a.y), a.partial, static_cast<int>(a.tokens),
      static_cast<int>(a.in_features), static_cast<int>(a.out_features));
  cudaError_t err = cudaGetLastError();
  // No partial pass when every row fits one item (then S == Mb: a split row has >= 2 items).
  if (err != cudaSuccess || !split || a.n_split == a.mb) return err;
  const int64_t total = a.mb * a.tokens * BS;
  const int64_t blocks = (total + BsrReduceTraits::kThreads - 1) / BsrReduceTraits::kThreads;
  bsr_partial_sum_kernel<Elem, BS><<<static_cast<unsigned>(blocks), BsrReduceTraits::kThreads, 0, stream>>>(
      a.partial, a.schedule + bsr_partial_ptr_offset(a.mb, a.n_split), static_cast<const Elem*>(a.bias),
      static_cast<Elem*>(a.y), static_cast<int>(a.tokens), static_cast<int>(a.out_features), total);
  return cudaGetLastError();
}

template <typename Elem, int BS>
cudaError_t launch_bs(const BsrKernelArgs& a, cudaStream_t stream) {
  if (bsr_tile_tokens(BS, a.tokens) == kBsrLargeTokens) return launch_tile<Elem, BS, kBsrLargeTokens>(a, stream);
  return launch_tile<Elem, BS, bsr_small_tokens(BS)>(a, stream);
}

template <typename Elem>
cudaError_t launch_bsr_linear_t(const BsrKernelArgs& a, cudaStream_t stream) {
  switch (a.bs) {
    case 16: return launch_bs<Elem, 16>(a, stream);
    case 32: return launch_bs<Elem, 32>(a, stream);
    case 64: return launch_bs<Elem, 64>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace tersor::sparse
