// Prologue kernels of the quantized attention (sm80+): K token mean, INT8 Q and K per fragment group,
// V to e4m3 per channel (token-permuted, transposed) or to a transposed 16-bit copy, LSE corrections.
// Each reproduces the CPU twin's arithmetic (sage_cpu.cpp) with the shared sage_format.h functions; only
// reduction orders differ (the K mean in fp64, so it rounds identically except on ties).
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

// grid (B * Hkv), block D: the exact mean of each channel over the tokens, rounded once.
template <typename T>
__global__ void k_mean_kernel(SageQuantArgs a) {
  const SageDims& d = a.dims;
  const int64_t bh = blockIdx.x, b = bh / d.heads_kv, h = bh % d.heads_kv;
  const int c = threadIdx.x;
  const T* k = static_cast<const T*>(a.k) + b * a.sk.b + h * a.sk.h + c;
  double s = 0;
  if (a.smooth_k)
    for (int64_t j = 0; j < d.len_k; ++j) s += to_f32(k[j * a.sk.l]);
  a.k_mean[bh * d.head_dim + c] = a.smooth_k ? static_cast<float>(s / static_cast<double>(d.len_k)) : 0.f;
}

// grid (Lk_pad / 64, B * Hkv), block 128: warp t owns K group t of the tile (tokens 8i + 2t + {0, 1}).
template <typename T>
__global__ void quant_k_kernel(SageQuantArgs a) {
  using Tr = SageTraitsSm8x;
  const SageDims& d = a.dims;
  const int64_t bh = blockIdx.y, b = bh / d.heads_kv, h = bh % d.heads_kv;
  const int t = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int D = static_cast<int>(d.head_dim);
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
  const IntQuantParams qp = int_quant_params(amax, 8);
  int8_t* out = a.k_int + bh * d.len_k_pad * D;
  for (int idx = lane; idx < 16 * D; idx += 32) {
    const int64_t j = token_of(idx / D);
    const int c = idx % D;
    const int code = j < d.len_k ? quantize_int(to_f32(k[j * a.sk.l + c]) - mean[c], qp.inv_scale, 8) : 0;
    out[j * D + c] = static_cast<int8_t>(code);
  }
  if (lane == 0) a.k_scale[k_scale_index(bh, d.len_k_pad, blockIdx.x, t)] = qp.scale;
}

// grid (Lq_pad / 32, B * Hq), block 256: warp g owns Q group g of the 32-row block (rows g + 8i).
template <typename T>
__global__ void quant_q_kernel(SageQuantArgs a) {
  using Tr = SageTraitsSm8x;
  const SageDims& d = a.dims;
  const int64_t bh = blockIdx.y, b = bh / d.heads_q, h = bh % d.heads_q;
  const int64_t hkv = h / (d.heads_q / d.heads_kv);
  const int g = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int D = static_cast<int>(d.head_dim);
  const int64_t block0 = static_cast<int64_t>(blockIdx.x) * Tr::kWarpQ;
  const T* q = static_cast<const T*>(a.q) + b * a.sq.b + h * a.sq.h;
  const float* mean = a.k_mean + (b * d.heads_kv + hkv) * D;
  float amax = 0.f;
  for (int i = 0; i < 4; ++i) {
    const int64_t r = q_group_row(block0, g, i);
    if (r >= d.len_q) continue;
    float dot = 0.f;
    for (int c = lane; c < D; c += 32) {
      const float x = to_f32(q[r * a.sq.l + c]);
      amax = fmaxf(amax, fabsf(x * a.qk_mul));
      dot += x * mean[c];
    }
    dot = warp_sum(dot);
    if (lane == 0) a.lse_corr[bh * d.len_q + r] = a.smooth_k ? dot * a.scale : 0.f;
  }
  amax = warp_max(amax);
  const IntQuantParams qp = int_quant_params(amax, 8);
  int8_t* out = a.q_int + bh * d.len_q_pad * D;
  for (int i = 0; i < 4; ++i) {
    const int64_t r = q_group_row(block0, g, i);
    for (int c = lane; c < D; c += 32)
      out[r * D + c] = static_cast<int8_t>(r < d.len_q ? quantize_int(to_f32(q[r * a.sq.l + c]) * a.qk_mul, qp.inv_scale, 8) : 0);
  }
  if (lane == 0) a.q_scale[q_scale_index(bh, d.len_q_pad, block0, g)] = qp.scale;
}

// grid (B * Hkv), block D: thread c writes row c of V^T. FP8: per-channel scale, e4m3 codes in the
// token order the P fragment implies (v_fp8_position_token); 16-bit: a plain transposed copy.
template <typename T>
__global__ void quant_v_kernel(SageQuantArgs a) {
  const SageDims& d = a.dims;
  const int64_t bh = blockIdx.x, b = bh / d.heads_kv, h = bh % d.heads_kv;
  const int c = threadIdx.x;
  const int D = static_cast<int>(d.head_dim);
  const T* v = static_cast<const T*>(a.v) + b * a.sv.b + h * a.sv.h + c;
  if (a.pv_fp8) {
    float amax = 0.f;
    for (int64_t j = 0; j < d.len_k; ++j) amax = fmaxf(amax, fabsf(to_f32(v[j * a.sv.l])));
    const IntQuantParams qp = fp8_channel_params(amax);
    a.v_scale[bh * D + c] = qp.scale;
    uint8_t* out = static_cast<uint8_t*>(a.v_t) + (bh * D + c) * d.len_k_pad;
    for (int64_t p = 0; p < d.len_k_pad; ++p) {
      const int64_t j = v_fp8_position_token(p);
      out[p] = j < d.len_k ? float_to_e4m3(to_f32(v[j * a.sv.l]) * qp.inv_scale) : 0;
    }
  } else {
    T* out = static_cast<T*>(a.v_t) + (bh * D + c) * d.len_k_pad;
    for (int64_t p = 0; p < d.len_k_pad; ++p) out[p] = p < d.len_k ? v[p * a.sv.l] : T(0.f);
  }
}

template <typename T>
cudaError_t launch_all(const SageQuantArgs& a, cudaStream_t stream) {
  using Tr = SageTraitsSm8x;
  const SageDims& d = a.dims;
  const int D = static_cast<int>(d.head_dim);
  k_mean_kernel<T><<<dim3(d.batch * d.heads_kv), D, 0, stream>>>(a);
  quant_k_kernel<T><<<dim3(d.len_k_pad / Tr::kCtaK, d.batch * d.heads_kv), 128, 0, stream>>>(a);
  quant_q_kernel<T><<<dim3(d.len_q_pad / Tr::kWarpQ, d.batch * d.heads_q), 256, 0, stream>>>(a);
  quant_v_kernel<T><<<dim3(d.batch * d.heads_kv), D, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t sage_quantize_sm8x(const SageQuantArgs& a, cudaStream_t stream) {
  return a.dtype == DType::kBFloat16 ? launch_all<__nv_bfloat16>(a, stream) : launch_all<__half>(a, stream);
}

}  // namespace tersor::attention
