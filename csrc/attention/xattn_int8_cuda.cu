// XAttention scoring on the INT8 tensor cores (qk = "int8"): the reduced rows quantized to INT8 (one scale per
// row), the strided antidiagonal GEMM as mma.sync.m16n8k32.s8 (exact int32), then the fp32 kernel's softmax,
// block sums and selection (xattn_cuda.cu; per-thread pieces in xattn_kernel.h). CUDA path compiled, not run.
//   prologue: one warp per reduced row (Q' rows grouped per query block, padded to 16-row m-tiles; K' rows padded
//             to 8-key n-tiles): amax over the S D values, codes = RNE(x * 127 / amax) (the attention kernels'
//             int_quant_params / quantize_int), one fp32 scale.
//   scoring:  one CTA (4 warps) per (batch, query head, query block). The block's Q' codes in shared memory (rows
//             padded by 16 bytes); per 16-row m-tile, warps take 8-key n-tiles in turn, A fragments from shared
//             memory, B fragments straight from the K' codes in global memory; pass 1 keeps an online (max, sum)
//             per lane and row (quad shuffles, then across warps), pass 2 sums the probabilities of the n-tile
//             (which lies in one key block: (block / stride) % 8 == 0) and adds them with one atomic per warp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "attention/xattn_cuda.h"
#include "attention/xattn_kernel.h"
#include "common/cuda_elem.cuh"
#include "common/mma_int8_fp8.cuh"

namespace tersor::attention {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;

template <typename T, bool kQuery>
__global__ void __launch_bounds__(kThreads) xattn_quant_rows_kernel(const XattnArgs a, int8_t* codes, float* scales,
                                                                    int64_t n_rows) {
  const int64_t row_id = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row_id >= n_rows) return;
  const int lane = threadIdx.x % 32;
  const int64_t S = a.stride, D = a.head_dim, SD = S * D;
  const int64_t per = a.block / S, rows_pad = xattn_rows_padded(a.block, S);
  const int64_t nq = (a.len_q + S - 1) / S, nk = (a.len_k + S - 1) / S, nk_pad = xattn_nk_pad(a.len_k, S);
  const T* base;
  int64_t reduced, sl, len;
  bool valid;
  if (kQuery) {
    const int64_t bh = row_id / (a.q_blocks * rows_pad), rem = row_id % (a.q_blocks * rows_pad);
    const int64_t qb = rem / rows_pad, r = rem % rows_pad;
    reduced = qb * per + r;
    valid = r < per && reduced < nq;
    base = static_cast<const T*>(a.q) + (bh / a.heads_q) * a.sq_b + (bh % a.heads_q) * a.sq_h;
    sl = a.sq_l;
    len = a.len_q;
  } else {
    const int64_t bkv = row_id / nk_pad;
    reduced = row_id % nk_pad;
    valid = reduced < nk;
    base = static_cast<const T*>(a.k) + (bkv / a.heads_kv) * a.sk_b + (bkv % a.heads_kv) * a.sk_h;
    sl = a.sk_l;
    len = a.len_k;
  }
  auto value = [&](int64_t e) -> float {
    const int64_t s = e / D, d = e % D;
    const int64_t row = kQuery ? xattn_query_row(reduced, s, S) : xattn_key_row(reduced, s, S);
    return valid && row < len ? ElemIO<T>::to_float(base[row * sl + d]) : 0.f;
  };
  float amax = 0.f;
  for (int64_t e = lane; e < SD; e += 32) amax = fmaxf(amax, fabsf(value(e)));
  for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  const IntQuantParams p = int_quant_params(amax, 8);
  for (int64_t e = lane; e < SD; e += 32) codes[row_id * SD + e] = static_cast<int8_t>(quantize_int(value(e), p.inv_scale, 8));
  if (lane == 0) scales[row_id] = p.scale;
}

__device__ __forceinline__ uint32_t ld32(const void* p) { return *reinterpret_cast<const uint32_t*>(p); }

// acc = Q' (m-tile mt) x K'^T (8-key n-tile starting at kt), exact int32.
__device__ __forceinline__ void mma_tile(int32_t acc[4], const uint8_t* qs, int64_t row_bytes, const int8_t* kt,
                                         int64_t sd, int mt, int g, int t) {
  acc[0] = acc[1] = acc[2] = acc[3] = 0;
#pragma unroll 1
  for (int kk = 0; kk < sd / 32; ++kk) {
    uint32_t af[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) af[r] = ld32(qs + xattn_a_frag_byte(mt, g, t, kk, r, row_bytes));
    const uint32_t b0 = ld32(kt + xattn_b_frag_byte(g, t, kk, 0, sd)), b1 = ld32(kt + xattn_b_frag_byte(g, t, kk, 1, sd));
    mma_m16n8k32_s8_s32(acc, af, b0, b1);
  }
}

__global__ void __launch_bounds__(kThreads) xattn_int8_score_kernel(const XattnArgs a, const int8_t* __restrict__ qc,
                                                                     const float* __restrict__ qsc,
                                                                     const int8_t* __restrict__ kc,
                                                                     const float* __restrict__ ksc) {
  extern __shared__ __align__(16) uint8_t smem[];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int64_t S = a.stride, D = a.head_dim, SD = S * D, per = a.block / S;
  const int64_t rows_pad = xattn_rows_padded(a.block, S), row_bytes = xattn_int8_row_bytes(SD);
  const int64_t nq = (a.len_q + S - 1) / S, nk_pad = xattn_nk_pad(a.len_k, S);
  const int64_t w = blockIdx.x, bh = w / a.q_blocks, qb = w % a.q_blocks;
  const int64_t b = bh / a.heads_q, h = bh % a.heads_q, bkv = b * a.heads_kv + h / (a.heads_q / a.heads_kv);
  uint8_t* qs = smem;
  float* q_scale = reinterpret_cast<float*>(smem + rows_pad * row_bytes);
  float* mass = q_scale + rows_pad;
  float* row_m = mass + a.k_blocks;
  float* row_l = row_m + 16;
  float* warp_m = row_l + 16;
  float* warp_l = warp_m + kWarps * 16;
  int* order = reinterpret_cast<int*>(warp_l + kWarps * 16);

  const int8_t* q_src = qc + xattn_int8_q_row(bh, qb, 0, a.q_blocks, rows_pad) * SD;
  const int64_t chunks = SD / 16;
  for (int64_t c = tid; c < rows_pad * chunks; c += kThreads) {
    const int64_t r = c / chunks, cb = (c % chunks) * 16;
    *reinterpret_cast<uint4*>(qs + r * row_bytes + cb) = *reinterpret_cast<const uint4*>(q_src + r * SD + cb);
  }
  for (int64_t r = tid; r < rows_pad; r += kThreads) q_scale[r] = qsc[xattn_int8_q_row(bh, qb, r, a.q_blocks, rows_pad)];
  for (int64_t j = tid; j < a.k_blocks; j += kThreads) mass[j] = 0.f;
  __syncthreads();

  const int8_t* k_base = kc + xattn_int8_k_row(bkv, 0, nk_pad) * SD;
  const float* k_scale = ksc + xattn_int8_k_row(bkv, 0, nk_pad);
  const float mul = a.scale / static_cast<float>(S);
  const int64_t i0 = qb * per, rows = per < nq - i0 ? per : nq - i0;
  for (int mt = 0; mt * 16 < rows; ++mt) {
    // Visible reduced keys of the lane's rows g and g + 8 (scalars: no local-memory array), and of the m-tile.
    int64_t nv_max = 0, nv0 = 0, nv1 = 0;
    for (int r = 0; r < 16; ++r) {
      const int64_t rr = mt * 16 + r;
      const int64_t n = rr < rows ? xattn_visible_reduced_keys(i0 + rr, S, a.len_q, a.len_k, a.causal) : 0;
      nv_max = n > nv_max ? n : nv_max;
      nv0 = r == g ? n : nv0;
      nv1 = r == g + 8 ? n : nv1;
    }
    const int64_t n_tiles = (nv_max + 7) / 8;
    // ---- pass 1 ----
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
    for (int64_t nt = warp; nt < n_tiles; nt += kWarps) {
      int32_t acc[4];
      mma_tile(acc, qs, row_bytes, k_base + nt * 8 * SD, SD, mt, g, t);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t col = nt * 8 + frag_c_col(t, i);
        if (col < ((i >> 1) ? nv1 : nv0))
          xattn_combine(m[i >> 1], l[i >> 1],
                        xattn_int8_score(acc[i], q_scale[mt * 16 + frag_c_row(g, i)], k_scale[col], mul), 1.f);
      }
    }
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      for (int off = 1; off <= 2; off <<= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m[hh], off), l2 = __shfl_xor_sync(0xffffffffu, l[hh], off);
        xattn_combine(m[hh], l[hh], m2, l2);
      }
      if (t == 0) warp_m[warp * 16 + g + 8 * hh] = m[hh], warp_l[warp * 16 + g + 8 * hh] = l[hh];
    }
    __syncthreads();
    if (tid < 16) {
      float mm = -INFINITY, ll = 0.f;
      for (int wi = 0; wi < kWarps; ++wi) xattn_combine(mm, ll, warp_m[wi * 16 + tid], warp_l[wi * 16 + tid]);
      row_m[tid] = mm;
      row_l[tid] = ll;
    }
    __syncthreads();
    // ---- pass 2: the n-tile's probabilities, summed over the warp, into its key block ----
    for (int64_t nt = warp; nt < n_tiles; nt += kWarps) {
      int32_t acc[4];
      mma_tile(acc, qs, row_bytes, k_base + nt * 8 * SD, SD, mt, g, t);
      float psum = 0.f;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t col = nt * 8 + frag_c_col(t, i);
        const int rr = frag_c_row(g, i);
        if (col < ((i >> 1) ? nv1 : nv0))
          psum += expf(xattn_int8_score(acc[i], q_scale[mt * 16 + rr], k_scale[col], mul) - row_m[rr]) / row_l[rr];
      }
      for (int off = 16; off > 0; off >>= 1) psum += __shfl_xor_sync(0xffffffffu, psum, off);
      if (lane == 0) atomicAdd(&mass[nt * 8 / per], psum);
    }
    __syncthreads();
  }

  // ---- selection (as the fp32 kernel) ----
  const int64_t nkb = a.k_blocks;
  for (int64_t j = tid; j < nkb; j += kThreads) {
    order[xattn_rank(mass, nkb, j)] = static_cast<int>(j);
    a.mass[w * nkb + j] = mass[j];
  }
  __syncthreads();
  if (tid == 0)
    xattn_select(mass, order, nkb, xattn_diagonal_block(qb, a.block, a.len_q, a.len_k), a.causal, a.threshold,
                 a.mask + w * nkb);
}

template <typename T>
cudaError_t launch_prologue(const XattnArgs& a, const XattnInt8Scratch& s, cudaStream_t stream) {
  const int64_t nq_rows = a.batch * a.heads_q * a.q_blocks * xattn_rows_padded(a.block, a.stride);
  const int64_t nk_rows = a.batch * a.heads_kv * xattn_nk_pad(a.len_k, a.stride);
  xattn_quant_rows_kernel<T, true><<<static_cast<unsigned>((nq_rows + kWarps - 1) / kWarps), kThreads, 0, stream>>>(
      a, s.q_codes, s.q_scale, nq_rows);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  xattn_quant_rows_kernel<T, false><<<static_cast<unsigned>((nk_rows + kWarps - 1) / kWarps), kThreads, 0, stream>>>(
      a, s.k_codes, s.k_scale, nk_rows);
  return cudaGetLastError();
}

}  // namespace

int64_t xattn_int8_smem_bytes(const XattnArgs& a) {
  const int64_t rows_pad = xattn_rows_padded(a.block, a.stride);
  return rows_pad * xattn_int8_row_bytes(a.stride * a.head_dim) +
         4 * (rows_pad + a.k_blocks + 2 * 16 + 2 * kWarps * 16 + a.k_blocks);
}

void xattn_int8_scratch_sizes(const XattnArgs& a, int64_t* q_rows, int64_t* k_rows) {
  *q_rows = a.batch * a.heads_q * a.q_blocks * xattn_rows_padded(a.block, a.stride);
  *k_rows = a.batch * a.heads_kv * xattn_nk_pad(a.len_k, a.stride);
}

cudaError_t xattention_mask_int8_cuda_launch(const XattnArgs& a, const XattnInt8Scratch& s, cudaStream_t stream) {
  if (a.batch * a.heads_q * a.q_blocks == 0) return cudaSuccess;
  if ((a.block / a.stride) % 8 != 0 || (a.stride * a.head_dim) % 32 != 0) return cudaErrorInvalidValue;
  cudaError_t e = a.dtype == DType::kFloat16    ? launch_prologue<__half>(a, s, stream)
                  : a.dtype == DType::kBFloat16 ? launch_prologue<__nv_bfloat16>(a, s, stream)
                                                : launch_prologue<float>(a, s, stream);
  if (e != cudaSuccess) return e;
  const int64_t bytes = xattn_int8_smem_bytes(a);
  e = cudaFuncSetAttribute(xattn_int8_score_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (e != cudaSuccess) return e;
  xattn_int8_score_kernel<<<static_cast<unsigned>(a.batch * a.heads_q * a.q_blocks), kThreads, static_cast<size_t>(bytes),
                            stream>>>(a, s.q_codes, s.q_scale, s.k_codes, s.k_scale);
  return cudaGetLastError();
}

}  // namespace tersor::attention
