// XAttention scoring on CUDA: the strided antidiagonal GEMM, softmax and per-block sums, and the block selection,
// fused in one kernel (one CTA per (batch, query head, query block)). The same definitions as the CPU op
// (xattn_cpu.cpp, xattn_format.h); fp32 on the CUDA cores (a tensor-core INT8 version is future work), so the
// masses agree with the CPU's fp64 ones to float rounding and a near-tie can select differently.
//   1. Q' rows of the block (query rows reversed within each stride, concatenated: stride * D floats each) into
//      shared memory (zero past the sequence); a K' row is stride consecutive key rows, read in place.
//   2. Per group of 16 reduced query rows: pass 1, every thread scores its reduced keys and keeps an online
//      (max, sum) per row, combined over the CTA; pass 2 rescores and adds exp(s - max) / sum into the key
//      block's mass (shared-memory atomics: the summation order varies from run to run).
//   3. Selection: a parallel rank sort of the block masses (descending, ties by index), then one thread walks
//      the order as the CPU op does.
// CUDA path compiled, not run.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "attention/xattn_cuda.h"
#include "attention/xattn_format.h"
#include "attention/xattn_kernel.h"
#include "common/cuda_elem.cuh"

namespace tersor::attention {
namespace {

constexpr int kThreads = kXattnThreads;
constexpr int kWarps = kXattnWarps;
constexpr int kRowGroup = kXattnRowGroup;

// Key row `row`, channel d of the CTA's key head, as float.
template <typename T>
struct KeyLoad {
  const T* kh;
  int64_t sk_l;
  __device__ __forceinline__ float operator()(int64_t row, int64_t d) const {
    return ElemIO<T>::to_float(kh[row * sk_l + d]);
  }
};

struct Smem {
  float *qs, *mass, *row_m, *row_l, *warp_m, *warp_l;
  int* order;
};

__device__ inline Smem carve(float* base, const XattnArgs& a) {
  Smem s;
  s.qs = base;
  s.mass = s.qs + xattn_rows_padded(a.block, a.stride) * a.stride * a.head_dim;
  s.row_m = s.mass + a.k_blocks;
  s.row_l = s.row_m + kRowGroup;
  s.warp_m = s.row_l + kRowGroup;
  s.warp_l = s.warp_m + kWarps * kRowGroup;
  s.order = reinterpret_cast<int*>(s.warp_l + kWarps * kRowGroup);
  return s;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) xattn_score_kernel(const XattnArgs a) {
  extern __shared__ __align__(16) float smem_f[];
  const Smem sm = carve(smem_f, a);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t S = a.stride, D = a.head_dim, SD = S * D, per = a.block / S;
  const int64_t nq = (a.len_q + S - 1) / S;
  const int64_t w = blockIdx.x, bh = w / a.q_blocks, qb = w % a.q_blocks;
  const int64_t b = bh / a.heads_q, h = bh % a.heads_q, hk = h / (a.heads_q / a.heads_kv);
  const T* qh = static_cast<const T*>(a.q) + b * a.sq_b + h * a.sq_h;
  const T* kh = static_cast<const T*>(a.k) + b * a.sk_b + hk * a.sk_h;
  const int64_t i0 = qb * per;
  const int64_t rows = per < nq - i0 ? per : nq - i0;
  const int64_t rows_pad = xattn_rows_padded(a.block, a.stride);
  const KeyLoad<T> load{kh, a.sk_l};

  for (int64_t e = tid; e < rows_pad * SD; e += kThreads) {
    const int64_t r = e / SD, c = e % SD, s = c / D, d = c % D;
    const int64_t row = xattn_query_row(i0 + r, s, S);
    sm.qs[e] = r < rows && row < a.len_q ? ElemIO<T>::to_float(qh[row * a.sq_l + d]) : 0.f;
  }
  for (int64_t j = tid; j < a.k_blocks; j += kThreads) sm.mass[j] = 0.f;
  __syncthreads();

  const float mul = a.scale / static_cast<float>(S);
  for (int64_t g0 = 0; g0 < rows; g0 += kRowGroup) {
    int64_t nv[kRowGroup];
    int64_t nv_max = 0;
#pragma unroll
    for (int r = 0; r < kRowGroup; ++r) {
      nv[r] = g0 + r < rows ? xattn_visible_reduced_keys(i0 + g0 + r, S, a.len_q, a.len_k, a.causal) : 0;
      nv_max = nv[r] > nv_max ? nv[r] : nv_max;
    }
    // ---- pass 1: per-row max and sum of exp over the visible reduced keys ----
    float m[kRowGroup], l[kRowGroup];
#pragma unroll
    for (int r = 0; r < kRowGroup; ++r) m[r] = -INFINITY, l[r] = 0.f;
    for (int64_t j = tid; j < nv_max; j += kThreads) {
      float acc[kRowGroup];
      xattn_score_group(sm.qs, S, D, a.len_k, g0, j, load, acc);
#pragma unroll
      for (int r = 0; r < kRowGroup; ++r)
        if (j < nv[r]) xattn_combine(m[r], l[r], acc[r] * mul, 1.f);
    }
#pragma unroll
    for (int r = 0; r < kRowGroup; ++r) {
      for (int off = 16; off > 0; off >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m[r], off), l2 = __shfl_xor_sync(0xffffffffu, l[r], off);
        xattn_combine(m[r], l[r], m2, l2);
      }
      if (lane == 0) sm.warp_m[warp * kRowGroup + r] = m[r], sm.warp_l[warp * kRowGroup + r] = l[r];
    }
    __syncthreads();
    if (tid < kRowGroup) {
      float mm = -INFINITY, ll = 0.f;
      for (int wi = 0; wi < kWarps; ++wi) xattn_combine(mm, ll, sm.warp_m[wi * kRowGroup + tid], sm.warp_l[wi * kRowGroup + tid]);
      sm.row_m[tid] = mm;
      sm.row_l[tid] = ll;
    }
    __syncthreads();
    // ---- pass 2: normalized probabilities summed per key block ----
    for (int64_t j = tid; j < nv_max; j += kThreads) {
      float acc[kRowGroup];
      xattn_score_group(sm.qs, S, D, a.len_k, g0, j, load, acc);
      float psum = 0.f;
#pragma unroll
      for (int r = 0; r < kRowGroup; ++r)
        if (j < nv[r]) psum += expf(acc[r] * mul - sm.row_m[r]) / sm.row_l[r];
      atomicAdd(&sm.mass[j / per], psum);
    }
    __syncthreads();
  }

  // ---- selection ----
  const int64_t nkb = a.k_blocks;
  for (int64_t j = tid; j < nkb; j += kThreads) {
    sm.order[xattn_rank(sm.mass, nkb, j)] = static_cast<int>(j);
    a.mass[w * nkb + j] = sm.mass[j];
  }
  __syncthreads();
  if (tid == 0)
    xattn_select(sm.mass, sm.order, nkb, xattn_diagonal_block(qb, a.block, a.len_q, a.len_k), a.causal, a.threshold,
                 a.mask + w * nkb);
}

template <typename T>
cudaError_t launch(const XattnArgs& a, cudaStream_t stream) {
  const int64_t bytes = xattn_smem_bytes(a);
  auto kernel = xattn_score_kernel<T>;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (e != cudaSuccess) return e;
  kernel<<<static_cast<unsigned>(a.batch * a.heads_q * a.q_blocks), kThreads, static_cast<size_t>(bytes), stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

int64_t xattn_smem_bytes(const XattnArgs& a) {
  const int64_t floats = xattn_rows_padded(a.block, a.stride) * a.stride * a.head_dim + a.k_blocks + 2 * kRowGroup + 2 * kWarps * kRowGroup;
  return floats * 4 + a.k_blocks * 4;  // + the int order
}

cudaError_t xattention_mask_cuda_launch(const XattnArgs& a, cudaStream_t stream) {
  if (a.batch * a.heads_q * a.q_blocks == 0) return cudaSuccess;
  switch (a.dtype) {
    case DType::kFloat16: return launch<__half>(a, stream);
    case DType::kBFloat16: return launch<__nv_bfloat16>(a, stream);
    case DType::kFloat32: return launch<float>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace tersor::attention
