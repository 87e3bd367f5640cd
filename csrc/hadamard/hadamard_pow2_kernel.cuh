// Power-of-two fast Walsh-Hadamard transform: one row per thread group, fp32 in registers.
// The work split (registers / lanes / warps, shared-memory rounds and layout) is Pow2Plan in
// hadamard_plan.h; read its comment first.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_elem.cuh"
#include "hadamard/hadamard_plan.h"

namespace tersor::hadamard {

// In-register butterflies over the index bits of a power-of-two array, natural (Sylvester) order.
template <int kCount>
__device__ __forceinline__ void fwht_registers(float* v) {
#pragma unroll
  for (int h = 1; h < kCount; h <<= 1) {
#pragma unroll
    for (int i = 0; i < kCount; ++i) {
      if ((i & h) == 0) {
        float a = v[i], b = v[i + h];
        v[i] = a + b;
        v[i + h] = a - b;
      }
    }
  }
}

template <typename Tin, typename Tout, int kLogN>
__global__ void __launch_bounds__(make_pow2_plan(kLogN, sizeof(Tin)).block_threads)
    fwht_pow2_kernel(const Tin* __restrict__ x, Tout* __restrict__ y, int64_t rows, float scale) {
  constexpr Pow2Plan P = make_pow2_plan(kLogN, sizeof(Tin));
  static_assert(P.ok, "no plan for this size");
  constexpr int kInChunk = P.vec_bytes;                                         // bytes per load
  constexpr int kInElems = kInChunk / static_cast<int>(sizeof(Tin));
  constexpr int kOutBytes = P.ept * static_cast<int>(sizeof(Tout));
  constexpr int kOutChunk = kOutBytes < 16 ? kOutBytes : 16;                    // bytes per store
  constexpr int kOutElems = kOutChunk / static_cast<int>(sizeof(Tout));

  const int tid = threadIdx.x;
  const int t = tid % P.tpr;  // thread index inside its row
  const int64_t row = pow2_row(P, blockIdx.x, tid);  // int64 index math: hadamard_plan.h
  // Rows past the end still run the shuffles (full-warp masks) but never touch memory.
  const bool active = row < rows;

  float v[P.ept];
  if (active) {
    const Tin* src = x + pow2_elem_offset(P, row, t);
#pragma unroll
    for (int c = 0; c < P.ept; c += kInElems) load_chunk_as_float<Tin, kInChunk>(src + c, v + c);
  } else {
#pragma unroll
    for (int i = 0; i < P.ept; ++i) v[i] = 0.f;
  }

  fwht_registers<P.ept>(v);

  // Lane bits. The thread group of a row is a run of consecutive lanes (tpr divides 32 or is a
  // multiple of it), so xor-shuffles with masks below tpr stay inside the row.
#pragma unroll
  for (int j = 0; j < P.lane_bits; ++j) {
    const bool upper = (t >> j) & 1;
#pragma unroll
    for (int i = 0; i < P.ept; ++i) {
      float other = __shfl_xor_sync(0xffffffffu, v[i], 1 << j);
      v[i] = upper ? other - v[i] : v[i] + other;
    }
  }

  if constexpr (P.wpr > 1) {
    extern __shared__ float4 smem_raw[];
    float* smem = reinterpret_cast<float*>(smem_raw);
    constexpr int kSpan = 32 * P.ept_round;                 // distance between warp-bit neighbours
    constexpr int kStoreFloats = P.ept_round < 4 ? P.ept_round : 4;
#pragma unroll
    for (int r = 0; r < P.rounds; ++r) {
      float* vr = v + r * P.ept_round;
      const int own = t * P.ept_round;
#pragma unroll
      for (int c = 0; c < P.ept_round; c += kStoreFloats) {
        if constexpr (kStoreFloats == 4) {
          *reinterpret_cast<float4*>(smem + smem_index(own + c)) = make_float4(vr[c], vr[c + 1], vr[c + 2], vr[c + 3]);
        } else {
          *reinterpret_cast<float2*>(smem + smem_index(own + c)) = make_float2(vr[c], vr[c + 1]);
        }
      }
      __syncthreads();
      // The slice's registers are in shared memory now; reuse them for the gathered groups.
#pragma unroll
      for (int g = 0; g < P.groups; ++g) {
        const int m = g * P.tpr + t;
#pragma unroll
        for (int w = 0; w < P.wpr; ++w) vr[g * P.wpr + w] = smem[smem_index(w * kSpan + m)];
        fwht_registers<P.wpr>(vr + g * P.wpr);
#pragma unroll
        for (int w = 0; w < P.wpr; ++w) smem[smem_index(w * kSpan + m)] = vr[g * P.wpr + w];
      }
      __syncthreads();
#pragma unroll
      for (int c = 0; c < P.ept_round; c += kStoreFloats) {
        if constexpr (kStoreFloats == 4) {
          float4 q = *reinterpret_cast<const float4*>(smem + smem_index(own + c));
          vr[c] = q.x; vr[c + 1] = q.y; vr[c + 2] = q.z; vr[c + 3] = q.w;
        } else {
          float2 q = *reinterpret_cast<const float2*>(smem + smem_index(own + c));
          vr[c] = q.x; vr[c + 1] = q.y;
        }
      }
      if (r + 1 < P.rounds) __syncthreads();  // the next round overwrites what was just read
    }
  }

  if (active) {
#pragma unroll
    for (int i = 0; i < P.ept; ++i) v[i] *= scale;
    Tout* dst = y + pow2_elem_offset(P, row, t);
#pragma unroll
    for (int c = 0; c < P.ept; c += kOutElems) store_chunk_from_float<Tout, kOutChunk>(dst + c, v + c);
  }
}

template <typename Tin, typename Tout, int kLogN>
cudaError_t launch_fwht_pow2_fixed(const Tin* x, Tout* y, int64_t rows, float scale, cudaStream_t stream) {
  constexpr Pow2Plan P = make_pow2_plan(kLogN, sizeof(Tin));
  if (rows <= 0) return cudaSuccess;
  const int64_t blocks = pow2_blocks(P, rows);
  if (blocks > kMaxGridX) return cudaErrorInvalidValue;  // the glue refuses such calls first (cuda_max_rows)
  auto kernel = fwht_pow2_kernel<Tin, Tout, kLogN>;
  if constexpr (P.smem_bytes > 48 * 1024) {
    // Above 48 KB of dynamic shared memory a kernel must opt in (per device; cheap to repeat).
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, P.smem_bytes);
    if (err != cudaSuccess) return err;
  }
  kernel<<<static_cast<unsigned>(blocks), P.block_threads, P.smem_bytes, stream>>>(x, y, rows, scale);
  return cudaGetLastError();
}

template <typename Tin, typename Tout>
cudaError_t launch_fwht_pow2_typed(const Tin* x, Tout* y, int64_t rows, int log_n, float scale,
                                   cudaStream_t stream) {
  switch (log_n) {
#define TERSOR_FWHT_CASE(L) \
  case L: return launch_fwht_pow2_fixed<Tin, Tout, L>(x, y, rows, scale, stream);
    TERSOR_FWHT_CASE(0) TERSOR_FWHT_CASE(1) TERSOR_FWHT_CASE(2) TERSOR_FWHT_CASE(3)
    TERSOR_FWHT_CASE(4) TERSOR_FWHT_CASE(5) TERSOR_FWHT_CASE(6) TERSOR_FWHT_CASE(7)
    TERSOR_FWHT_CASE(8) TERSOR_FWHT_CASE(9) TERSOR_FWHT_CASE(10) TERSOR_FWHT_CASE(11)
    TERSOR_FWHT_CASE(12) TERSOR_FWHT_CASE(13) TERSOR_FWHT_CASE(14) TERSOR_FWHT_CASE(15)
#undef TERSOR_FWHT_CASE
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace tersor::hadamard
