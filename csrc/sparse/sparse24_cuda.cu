// 2:4 sparse GEMV (1..16 rows of x) on mma.sp::ordered_metadata m16n8k32, and the decompress kernel.
// Layout: sparse24_format.h (format v1 stores each lane's A fragment and metadata register contiguously,
// so the kernel's weight loads are plain coalesced vector loads with no shuffles). Plan:
// Sparse24GemvTraits. Replayed lane by lane on the CPU by sparse24_cuda_emulate.cpp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_elem.cuh"
#include "common/mma_sp.cuh"
#include "sparse/sparse24_cuda.h"
#include "sparse/sparse24_format.h"

namespace tersor::sparse24 {
namespace {

using Traits = Sparse24GemvTraits;

// B fragment of m16n8k32 (16-bit): lane (g, q) register r holds x[n = g][k = 2q + 8r + {0, 1}] of the
// k-tile starting at column k0. Rows of x at or past `batch` are zeros.
__device__ __forceinline__ void load_b(const uint16_t* __restrict__ x, int64_t K, int batch, int n, int64_t k0, int q,
                                       uint32_t b[4]) {
  if (n < batch) {
    const uint32_t* row = reinterpret_cast<const uint32_t*>(x + n * K + k0 + 2 * q);
#pragma unroll
    for (int r = 0; r < 4; ++r) b[r] = __ldg(row + 4 * r);
  } else {
#pragma unroll
    for (int r = 0; r < 4; ++r) b[r] = 0u;
  }
}

template <typename T, int kNTiles>
__global__ void __launch_bounds__(Traits::kThreads) sparse24_gemv_kernel(const uint16_t* __restrict__ values,
                                                                         const uint32_t* __restrict__ meta,
                                                                         const uint16_t* __restrict__ x, int batch,
                                                                         int64_t M, int64_t K,
                                                                         const T* __restrict__ bias,
                                                                         T* __restrict__ y) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
  const int64_t rb = blockIdx.x, pairs = K / kColAlign;
  float acc[kNTiles][4] = {};
  const uint16_t* vrow = values + tile_offset(K, rb, 0) + lane * 8;  // this lane's 8 values of k-tile 0
  const uint32_t* mrow = meta + rb * pairs * 32 + lane;
#pragma unroll Traits::kUnroll
  for (int64_t p = warp; p < pairs; p += Traits::kWarps) {
    const uint32_t e = ldg_stream_u32(mrow + p * 32);
    const uint4 a_even = ldg_stream_u128(vrow + (2 * p) * kTileElems);
    const uint4 a_odd = ldg_stream_u128(vrow + (2 * p + 1) * kTileElems);
    const uint32_t ae[4] = {a_even.x, a_even.y, a_even.z, a_even.w};
    const uint32_t ao[4] = {a_odd.x, a_odd.y, a_odd.z, a_odd.w};
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
      uint32_t b[4];
      load_b(x, K, batch, nt * 8 + g, p * kColAlign, q, b);
      mma_sp_m16n8k32_f32<T, 0>(acc[nt], ae, b, e);
      load_b(x, K, batch, nt * 8 + g, p * kColAlign + kTileK, q, b);
      mma_sp_m16n8k32_f32<T, 1>(acc[nt], ao, b, e);
    }
  }
  // Deterministic split-K: every warp's accumulators to shared memory, summed in warp order.
  __shared__ float partial[Traits::kWarps][kNTiles * 4][32];
#pragma unroll
  for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) partial[warp][nt * 4 + i][lane] = acc[nt][i];
  __syncthreads();
  for (int t = threadIdx.x; t < kNTiles * 4 * 32; t += Traits::kThreads) {
    const int reg = t >> 5, l = t & 31, nt = reg >> 2, i = reg & 3;
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < Traits::kWarps; ++w) s += partial[w][reg][l];
    // D fragment: c0, c1 = (row g, cols 2q, 2q + 1), c2, c3 = (row g + 8, same cols); col = row of x.
    const int64_t row = rb * kRowAlign + (l >> 2) + 8 * (i >> 1);
    const int n = nt * 8 + 2 * (l & 3) + (i & 1);
    if (n < batch) {
      if (bias != nullptr) s += ElemIO<T>::to_float(bias[row]);
      y[n * M + row] = ElemIO<T>::from_float(s);
    }
  }
}

// One thread per lane-chunk of a tile: its 8 stored values are 4 chunks (2 rows x 2 chunk columns);
// it writes them, and zeros at the pruned positions, as 4 dense 4-element chunks.
__global__ void __launch_bounds__(Sparse24DecompressTraits::kThreads) sparse24_decompress_kernel(
    const uint16_t* __restrict__ values, const uint32_t* __restrict__ meta, int64_t M, int64_t K,
    uint16_t* __restrict__ out) {
  const int64_t gid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t ktiles = K / kTileK, total = (M / kRowAlign) * ktiles * 32;
  if (gid >= total) return;
  const int lane = static_cast<int>(gid & 31);
  const int64_t tile = gid >> 5, rb = tile / ktiles, kt = tile % ktiles;
  const uint4 raw = *reinterpret_cast<const uint4*>(values + tile_offset(K, rb, kt) + lane * 8);
  const uint16_t* v = reinterpret_cast<const uint16_t*>(&raw);
  const uint32_t* words = meta + (rb * (K / kColAlign) + kt / 2) * 32;
  // Slots (2j, 2j + 1) are the two kept values of one chunk (j = 0..3).
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const RowCol rc = tile_row_col(lane, 2 * j);
    const int ct = rc.kc >> 1, cip = static_cast<int>(kt & 1) * 8 + ct;
    const uint32_t nib = (words[meta_lane(rc.r, cip)] >> meta_shift(rc.r, cip)) & 0xfu;
    // Shifts instead of an indexed array: keeps the chunk in registers (no local-memory stack frame).
    const uint64_t dense = (static_cast<uint64_t>(v[2 * j]) << (16 * nibble_idx0(nib))) |
                           (static_cast<uint64_t>(v[2 * j + 1]) << (16 * nibble_idx1(nib)));
    uint2 packed;
    packed.x = static_cast<uint32_t>(dense);
    packed.y = static_cast<uint32_t>(dense >> 32);
    *reinterpret_cast<uint2*>(out + (rb * kRowAlign + rc.r) * K + kt * kTileK + 4 * ct) = packed;
  }
}

// One thread per metadata word: lane (g, q) of k-tile pair p describes rows g and g + 8 of k-tile
// 2p + q / 2, chunks 4 (q % 2) .. + 3 (sparse24_format.h), so it builds its word without atomics and
// scatters the 16 kept values to their fragment slots.
__global__ void __launch_bounds__(Sparse24CompressTraits::kThreads) sparse24_compress_kernel(
    const uint16_t* __restrict__ w, int64_t M, int64_t K, uint16_t* __restrict__ values, uint32_t* __restrict__ meta,
    int* __restrict__ bad_flag) {
  const int64_t gid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t pairs = K / kColAlign, total = (M / kRowAlign) * pairs * 32;
  if (gid >= total) return;
  const int lane = static_cast<int>(gid & 31), g = lane >> 2, q = lane & 3;
  const int64_t rb = (gid >> 5) / pairs, p = (gid >> 5) % pairs, kt = 2 * p + (q >> 1);
  uint32_t word = 0;
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int64_t row = rb * kRowAlign + g + 8 * hr;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t ch = kt * 8 + 4 * (q & 1) + j;  // dense chunk index along the row
      const uint2 raw = *reinterpret_cast<const uint2*>(w + row * K + 4 * ch);
      const uint32_t e[4] = {raw.x & 0xffffu, raw.x >> 16, raw.y & 0xffffu, raw.y >> 16};
      uint32_t mask = 0;
#pragma unroll
      for (int i = 0; i < 4; ++i) mask |= static_cast<uint32_t>((e[i] & 0x7fffu) != 0) << i;  // -0.0 is zero
      int nib = chunk_nibble_from_mask(mask);
      if (nib < 0) {
        atomicExch(bad_flag, 1);
        nib = static_cast<int>(encode_nibble(0, 1));
      }
      const int i0 = nibble_idx0(static_cast<uint32_t>(nib)), i1 = nibble_idx1(static_cast<uint32_t>(nib));
      values[value_offset(K, row, 2 * ch)] = static_cast<uint16_t>((i0 & 2 ? raw.y : raw.x) >> (16 * (i0 & 1)));
      values[value_offset(K, row, 2 * ch + 1)] = static_cast<uint16_t>((i1 & 2 ? raw.y : raw.x) >> (16 * (i1 & 1)));
      word |= static_cast<uint32_t>(nib) << (16 * hr + 4 * j);
    }
  }
  meta[gid] = word;
}

template <typename T>
cudaError_t launch_gemv_t(const Sparse24Args& a, const void* x, int batch, const void* bias, void* y,
                          cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.M / kRowAlign));
  const auto* v = static_cast<const uint16_t*>(a.values);
  const auto* xp = static_cast<const uint16_t*>(x);
  const auto* bp = static_cast<const T*>(bias);
  auto* yp = static_cast<T*>(y);
  if (batch <= 8)
    sparse24_gemv_kernel<T, 1><<<grid, Traits::kThreads, 0, stream>>>(v, a.meta, xp, batch, a.M, a.K, bp, yp);
  else
    sparse24_gemv_kernel<T, 2><<<grid, Traits::kThreads, 0, stream>>>(v, a.meta, xp, batch, a.M, a.K, bp, yp);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_sparse24_gemv(const Sparse24Args& a, const void* x, int batch, const void* bias, void* y,
                                 cudaStream_t stream) {
  if (batch < 1 || batch > Traits::kMaxBatch || a.M % kRowAlign != 0 || a.K % kColAlign != 0) {
    return cudaErrorInvalidValue;
  }
  if (a.dtype == DType::kFloat16) return launch_gemv_t<__half>(a, x, batch, bias, y, stream);
  if (a.dtype == DType::kBFloat16) return launch_gemv_t<__nv_bfloat16>(a, x, batch, bias, y, stream);
  return cudaErrorInvalidValue;
}

cudaError_t launch_sparse24_compress(const void* weight, int64_t M, int64_t K, void* values, uint32_t* meta,
                                     int* bad_flag, cudaStream_t stream) {
  if (M % kRowAlign != 0 || K % kColAlign != 0) return cudaErrorInvalidValue;
  const int64_t total = (M / kRowAlign) * (K / kColAlign) * 32;
  if (total == 0) return cudaSuccess;
  constexpr int kThreads = Sparse24CompressTraits::kThreads;
  const int64_t blocks = sparse24_elementwise_blocks(total, kThreads);
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;  // M * K > 2^44: never silently truncate the grid
  sparse24_compress_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const uint16_t*>(weight), M, K, static_cast<uint16_t*>(values), meta, bad_flag);
  return cudaGetLastError();
}

cudaError_t launch_sparse24_decompress(const Sparse24Args& a, void* out, cudaStream_t stream) {
  if (a.M % kRowAlign != 0 || a.K % kColAlign != 0) return cudaErrorInvalidValue;
  const int64_t total = (a.M / kRowAlign) * (a.K / kTileK) * 32;
  if (total == 0) return cudaSuccess;
  constexpr int kThreads = Sparse24DecompressTraits::kThreads;
  const int64_t blocks = sparse24_elementwise_blocks(total, kThreads);
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;  // M * K > 2^43: never silently truncate the grid
  sparse24_decompress_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const uint16_t*>(a.values), a.meta, a.M, a.K, static_cast<uint16_t*>(out));
  return cudaGetLastError();
}

}  // namespace tersor::sparse24
