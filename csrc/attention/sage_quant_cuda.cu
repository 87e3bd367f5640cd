// Prologue kernels of the quantized attention (sm80+): K token mean, INT8 / packed INT4 Q and K per fragment
// group, Q smoothing (per 32-row block mean and its q_mean . K' bias),
// V to e4m3 per channel (token-permuted, transposed) or to a transposed 16-bit copy, LSE corrections.
// Each reproduces the CPU twin's arithmetic (sage_cpu.cpp) with the shared sage_format.h functions, the K mean
// in the same fp64 chunk order (chunked_channel_mean).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "attention/sage_cuda.h"
#include "attention/sage_cuda_layout.h"
#include "attention/sage_cuda_traits.h"
#include "attention/sage_format.h"

namespace tersor::attention {
namespace {

template <typename T>
__device__ __forceinline__ float to_f32(T x);
template <>
__device__ __forceinline__ float to_f32<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// grid (chunks, B * Hkv), block D: for one chunk of kKvStatsChunk tokens, K's fp64 channel sums (token order) and
// V's channel amax. Why chunks: one CTA per (batch, head) walking all Lk tokens is a serial chain of Lk dependent
// loads per thread (milliseconds at 32K tokens); chunks spread the reduction over Lk / 256 CTAs per head, each
// thread's loads coalesced across the CTA (consecutive channels).
template <typename T>
__global__ void kv_stats_partial_kernel(SageQuantArgs a) {
  const SageDims& d = a.dims;
  const int64_t chunks = kv_stats_chunks(d.len_k), chunk = blockIdx.x;
  const int64_t bh = blockIdx.y, b = bh / d.heads_kv, h = bh % d.heads_kv;
  const int c = threadIdx.x;
  const int64_t j0 = chunk * kKvStatsChunk, j1 = j0 + kKvStatsChunk < d.len_k ? j0 + kKvStatsChunk : d.len_k;
  const int64_t out = (bh * chunks + chunk) * d.head_dim + c;
  if (a.smooth_k) {
    const T* k = static_cast<const T*>(a.k) + b * a.sk.b + h * a.sk.h + c;
    double s = 0;
    for (int64_t j = j0; j < j1; ++j) s += to_f32(k[j * a.sk.l]);
    a.k_sum_part[out] = s;
  }
  if (a.pv_fp8) {
    const T* v = static_cast<const T*>(a.v) + b * a.sv.b + h * a.sv.h + c;
    float amax = 0.f;
    for (int64_t j = j0; j < j1; ++j) amax = fmaxf(amax, fabsf(to_f32(v[j * a.sv.l])));
    a.v_amax_part[out] = amax;
  }
}

// grid (B * Hkv), block D: the chunk sums in chunk order -> K's mean rounded once (sage_format.h
// chunked_channel_mean: the twin's and the replay's order), and V's channel amax.
__global__ void kv_stats_final_kernel(SageQuantArgs a) {
  const SageDims& d = a.dims;
  const int64_t chunks = kv_stats_chunks(d.len_k), bh = blockIdx.x;
  const int c = threadIdx.x;
  double s = 0;
  float amax = 0.f;
  for (int64_t i = 0; i < chunks; ++i) {
    const int64_t at = (bh * chunks + i) * d.head_dim + c;
    if (a.smooth_k) s += a.k_sum_part[at];
    if (a.pv_fp8) amax = fmaxf(amax, a.v_amax_part[at]);
  }
  a.k_mean[bh * d.head_dim + c] = a.smooth_k ? static_cast<float>(s / static_cast<double>(d.len_k)) : 0.f;
  if (a.pv_fp8) a.v_amax[bh * d.head_dim + c] = amax;
}

// grid (Lk_pad / 64, B * Hkv), block 128: warp t owns K group t of the tile (tokens 8i + 2t + {0, 1}).
// INT8: one code per byte; INT4: two channels per byte (pack_int4_pair), rows of D / 2 bytes.
template <typename T>
__global__ void quant_k_kernel(SageQuantArgs a) {
  using Tr = SageTraitsSm8x;
  const SageDims& d = a.dims;
  const int64_t bh = blockIdx.y, b = bh / d.heads_kv, h = bh % d.heads_kv;
  const int t = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int D = static_cast<int>(d.head_dim);
  const int bits = a.qk_bits, row_bytes = D * bits / 8;
  const int64_t tile0 = static_cast<int64_t>(blockIdx.x) * Tr::kCtaK;
  const T* k = static_cast<const T*>(a.k) + b * a.sk.b + h * a.sk.h;
  const float* mean = a.k_mean + bh * D;
  auto token_of = [&](int i) { return k_group_token(tile0, t, i); };  // i in [0, 16)
  float amax = 0.f;
  for (int idx = lane; idx < 16 * D; idx += 32) {
    const int64_t j = token_of(idx / D);
    const int c = idx % D;
    if (j < d.len_k) amax = fmaxf(amax, fabsf(to_f32(k[j * a.sk.l + c]) - mean[c]));
  }
  amax = warp_max(amax);
  const IntQuantParams qp = int_quant_params(amax, bits);
  auto code_of = [&](int64_t j, int c) {
    return j < d.len_k ? quantize_int(to_f32(k[j * a.sk.l + c]) - mean[c], qp.inv_scale, bits) : 0;
  };
  uint8_t* out = reinterpret_cast<uint8_t*>(a.k_int) + qk_row_offset(bh, d.len_k_pad, 0, row_bytes);
  for (int idx = lane; idx < 16 * row_bytes; idx += 32) {
    const int64_t j = token_of(idx / row_bytes);
    const int byte = idx % row_bytes;
    out[j * row_bytes + byte] = bits == 4 ? pack_int4_pair(code_of(j, 2 * byte), code_of(j, 2 * byte + 1))
                                          : static_cast<uint8_t>(static_cast<int8_t>(code_of(j, byte)));
  }
  if (lane == 0) a.k_scale[k_scale_index(bh, d.len_k_pad, blockIdx.x, t)] = qp.scale;
}

// grid (Lq_pad / 32, B * Hq), block 256: warp g owns Q group g of the 32-row block (rows g + 8i).
// smooth_q: first the block's mean of Q * qk_mul over its rows < Lq (fp64 in row order, rounded once, as the
// twin), stored to q_mean; the codes are then of (Q * qk_mul) - mean, both steps rounded (no FMA).
template <typename T>
__global__ void quant_q_kernel(SageQuantArgs a) {
  using Tr = SageTraitsSm8x;
  const SageDims& d = a.dims;
  const int64_t bh = blockIdx.y, b = bh / d.heads_q, h = bh % d.heads_q;
  const int64_t hkv = h / (d.heads_q / d.heads_kv);
  const int g = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int D = static_cast<int>(d.head_dim);
  const int bits = a.qk_bits, row_bytes = D * bits / 8;
  const int64_t block0 = static_cast<int64_t>(blockIdx.x) * Tr::kWarpQ;
  const T* q = static_cast<const T*>(a.q) + b * a.sq.b + h * a.sq.h;
  const float* mean = a.k_mean + (b * d.heads_kv + hkv) * D;
  __shared__ float q_mean_s[128];  // D <= 128
  if (a.smooth_q) {
    for (int c = threadIdx.x; c < D; c += blockDim.x) {
      double s = 0;
      int64_t n = 0;
      for (int64_t r = block0; r < block0 + Tr::kWarpQ && r < d.len_q; ++r, ++n)
        s += __fmul_rn(to_f32(q[r * a.sq.l + c]), a.qk_mul);
      q_mean_s[c] = n > 0 ? static_cast<float>(s / static_cast<double>(n)) : 0.f;
      a.q_mean[q_mean_index(bh, d.len_q_pad, block0, D, c)] = q_mean_s[c];
    }
    __syncthreads();
  }
  // The value quantized: Q * qk_mul, minus the block mean with smoothing.
  auto value = [&](int64_t r, int c) {
    const float x = __fmul_rn(to_f32(q[r * a.sq.l + c]), a.qk_mul);
    return a.smooth_q ? __fsub_rn(x, q_mean_s[c]) : x;
  };
  float amax = 0.f;
  for (int i = 0; i < 4; ++i) {
    const int64_t r = q_group_row(block0, g, i);
    if (r >= d.len_q) continue;
    float dot = 0.f;
    for (int c = lane; c < D; c += 32) {
      const float x = to_f32(q[r * a.sq.l + c]);
      amax = fmaxf(amax, fabsf(value(r, c)));
      dot += x * mean[c];
    }
    dot = warp_sum(dot);
    if (lane == 0) a.lse_corr[bh * d.len_q + r] = a.smooth_k ? dot * a.scale : 0.f;
  }
  amax = warp_max(amax);
  const IntQuantParams qp = int_quant_params(amax, bits);
  auto code_of = [&](int64_t r, int c) { return r < d.len_q ? quantize_int(value(r, c), qp.inv_scale, bits) : 0; };
  uint8_t* out = reinterpret_cast<uint8_t*>(a.q_int) + qk_row_offset(bh, d.len_q_pad, 0, row_bytes);
  for (int i = 0; i < 4; ++i) {
    const int64_t r = q_group_row(block0, g, i);
    for (int byte = lane; byte < row_bytes; byte += 32)
      out[r * row_bytes + byte] = bits == 4 ? pack_int4_pair(code_of(r, 2 * byte), code_of(r, 2 * byte + 1))
                                            : static_cast<uint8_t>(static_cast<int8_t>(code_of(r, byte)));
  }
  if (lane == 0) a.q_scale[q_scale_index(bh, d.len_q_pad, block0, g)] = qp.scale;
}

// Q smoothing bias, grid (Lq_pad / 32, B * Hq), block 128: thread j (strided) writes
// q_bias[block][j] = sum_c q_mean[c] * (K[j][c] - k_mean[c]) in channel order, each step rounded (the twin's
// fp32 loop; no FMA), 0 past Lk. Runs after quant_q_kernel (q_mean) and k_mean_kernel.
template <typename T>
__global__ void q_bias_kernel(SageQuantArgs a) {
  using Tr = SageTraitsSm8x;
  const SageDims& d = a.dims;
  const int64_t bh = blockIdx.y, b = bh / d.heads_q, h = bh % d.heads_q;
  const int64_t bkv = b * d.heads_kv + h / (d.heads_q / d.heads_kv);
  const int D = static_cast<int>(d.head_dim);
  const int64_t block0 = static_cast<int64_t>(blockIdx.x) * Tr::kWarpQ;
  __shared__ float q_mean_s[128], k_mean_s[128];
  for (int c = threadIdx.x; c < D; c += blockDim.x) {
    q_mean_s[c] = a.q_mean[q_mean_index(bh, d.len_q_pad, block0, D, c)];
    k_mean_s[c] = a.k_mean[bkv * D + c];
  }
  __syncthreads();
  const T* k = static_cast<const T*>(a.k) + (bkv / d.heads_kv) * a.sk.b + (bkv % d.heads_kv) * a.sk.h;
  float* out = a.q_bias + q_bias_index(bh, d.len_q_pad, d.len_k_pad, block0, 0);
  for (int64_t j = threadIdx.x; j < d.len_k_pad; j += blockDim.x) {
    float s = 0.f;
    if (j < d.len_k)
      for (int c = 0; c < D; ++c)
        s = __fadd_rn(s, __fmul_rn(q_mean_s[c], __fsub_rn(to_f32(k[j * a.sk.l + c]), k_mean_s[c])));
    out[j] = s;
  }
}

// grid (Lk_pad / 64, B * Hkv), block 128: one 64-token tile of V through shared memory into V^T [D, Lk_pad]. FP8:
// per-channel scale (from kv_stats_final_kernel's amax), e4m3 codes in the token order the P fragment implies
// (v_fp8_position_token, a permutation inside every 16 tokens, so inside the tile); 16-bit: a transposed copy.
// Why a tile: V is [token][channel] in memory and V^T [channel][token]; going through shared memory makes both
// the reads (consecutive channels) and the writes (consecutive positions of one channel) coalesced.
constexpr int kVTileTokens = 64;
template <typename T>
__global__ void quant_v_kernel(SageQuantArgs a) {
  const SageDims& d = a.dims;
  const int64_t bh = blockIdx.y, b = bh / d.heads_kv, h = bh % d.heads_kv;
  const int D = static_cast<int>(d.head_dim);
  const int64_t tile0 = static_cast<int64_t>(blockIdx.x) * kVTileTokens;
  __shared__ float tile[kVTileTokens][128 + 1];  // D <= 128; +1 column: the transposed reads hit 32 banks
  __shared__ float inv_scale[128];
  const T* v = static_cast<const T*>(a.v) + b * a.sv.b + h * a.sv.h;
  for (int i = threadIdx.x; i < kVTileTokens * D; i += blockDim.x) {
    const int tok = i / D, c = i % D;
    const int64_t j = tile0 + tok;
    tile[tok][c] = j < d.len_k ? to_f32(v[j * a.sv.l + c]) : 0.f;
  }
  if (a.pv_fp8)
    for (int c = threadIdx.x; c < D; c += blockDim.x) {
      const IntQuantParams qp = fp8_channel_params(a.v_amax[bh * D + c]);
      inv_scale[c] = qp.inv_scale;
      if (blockIdx.x == 0) a.v_scale[bh * D + c] = qp.scale;
    }
  __syncthreads();
  for (int i = threadIdx.x; i < D * kVTileTokens; i += blockDim.x) {
    const int c = i / kVTileTokens, p = i % kVTileTokens;
    if (a.pv_fp8) {
      const int tok = static_cast<int>(v_fp8_position_token(tile0 + p) - tile0);
      uint8_t* out = static_cast<uint8_t*>(a.v_t) + v_t_offset(bh, D, d.len_k_pad, c, tile0 + p, 1);
      *out = tile0 + tok < d.len_k ? float_to_e4m3(tile[tok][c] * inv_scale[c]) : 0;
    } else {
      T* out = static_cast<T*>(a.v_t) + v_t_offset(bh, D, d.len_k_pad, c, tile0 + p, 1);
      *out = static_cast<T>(tile[p][c]);  // exact: the value came from T (0 past Lk)
    }
  }
}

template <typename T>
cudaError_t launch_all(const SageQuantArgs& a, cudaStream_t stream) {
  using Tr = SageTraitsSm8x;
  const SageDims& d = a.dims;
  const int D = static_cast<int>(d.head_dim);
  if (a.smooth_k || a.pv_fp8) {
    kv_stats_partial_kernel<T><<<dim3(kv_stats_chunks(d.len_k), d.batch * d.heads_kv), D, 0, stream>>>(a);
    kv_stats_final_kernel<<<dim3(d.batch * d.heads_kv), D, 0, stream>>>(a);
  } else {
    const cudaError_t e = cudaMemsetAsync(a.k_mean, 0, sizeof(float) * d.batch * d.heads_kv * D, stream);
    if (e != cudaSuccess) return e;
  }
  quant_k_kernel<T><<<dim3(d.len_k_pad / Tr::kCtaK, d.batch * d.heads_kv), 128, 0, stream>>>(a);
  quant_q_kernel<T><<<dim3(d.len_q_pad / Tr::kWarpQ, d.batch * d.heads_q), 256, 0, stream>>>(a);
  if (a.smooth_q) q_bias_kernel<T><<<dim3(d.len_q_pad / Tr::kWarpQ, d.batch * d.heads_q), 128, 0, stream>>>(a);
  quant_v_kernel<T><<<dim3(d.len_k_pad / kVTileTokens, d.batch * d.heads_kv), 128, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t sage_quantize_sm8x(const SageQuantArgs& a, cudaStream_t stream) {
  return a.dtype == DType::kBFloat16 ? launch_all<__nv_bfloat16>(a, stream) : launch_all<__half>(a, stream);
}

}  // namespace tersor::attention
