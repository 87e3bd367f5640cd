// Launchers of the quantized attention CUDA kernels (no torch headers). Numerics: sage_format.h and
// docs/research/sage_attention.md. Each launcher is defined in its own translation unit, compiled only for
// the architectures whose instructions it uses (sage_route.h lists them); the glue calls one only where the
// build defines TERSOR_SAGE_<GROUP>_ARCHS.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "attention/sage_format.h"
#include "common/dtype.h"

namespace tersor::attention {

// Sizes shared by the quantization and attention kernels. Q/K/V are [B, H, L, D] with arbitrary strides
// in elements (the last dimension contiguous).
struct SageDims {
  int64_t batch, heads_q, heads_kv, len_q, len_k, head_dim;
  int64_t len_q_pad;  // multiple of 128 (CTA_Q)
  int64_t len_k_pad;  // multiple of 64 (CTA_K)
};

struct SageStrides {
  int64_t b, h, l;  // in elements; stride of d is 1
};

// Prologue: K mean (if smooth_k), INT8 Q / K with their fragment-group scales, V for P.V, LSE corrections.
struct SageQuantArgs {
  SageDims dims;
  DType dtype;  // kFloat16 or kBFloat16
  const void *q, *k, *v;
  SageStrides sq, sk, sv;
  float qk_mul;       // float(scale) * float(log2 e)
  float scale;        // softmax scale (for the LSE correction)
  bool smooth_k;
  bool pv_fp8;
  int qk_bits;        // 8 or 4 (4: two channels per byte, sage_cuda_layout.h)
  bool smooth_q;      // Q smoothing per 32-row block (q_mean, q_bias)
  // outputs (device scratch, see sage_cuda_glue.cpp for the shapes)
  float* k_mean;      // [B, Hkv, D]
  int8_t* q_int;      // [B, Hq, Lq_pad, D * qk_bits / 8]
  float* q_scale;     // [B, Hq, Lq_pad / 32 * 8]
  float* lse_corr;    // [B, Hq, Lq]: scale * q . k_mean
  int8_t* k_int;      // [B, Hkv, Lk_pad, D * qk_bits / 8]
  float* k_scale;     // [B, Hkv, Lk_pad / 64 * 4]
  void* v_t;          // [B, Hkv, D, Lk_pad]: e4m3 (token-permuted) or the 16-bit dtype (natural order)
  float* v_scale;     // [B, Hkv, D] (fp8 only)
  float* q_mean;      // [B, Hq, Lq_pad / 32, D] (smooth_q only)
  float* q_bias;      // [B, Hq, Lq_pad / 32, Lk_pad]: q_mean . (K - k_mean)_j in fp32 (smooth_q only)
  // statistics scratch (sage_format.h kKvStatsChunk): per chunk of tokens, K's fp64 channel sums and V's channel
  // amax; then V's channel amax over all tokens
  double* k_sum_part;  // [B, Hkv, chunks, D]
  float* v_amax_part;  // [B, Hkv, chunks, D] (fp8 only)
  float* v_amax;       // [B, Hkv, D] (fp8 only)
};

struct SageAttnArgs {
  SageDims dims;
  DType dtype;
  KeyMask mask;  // causal and sliding window (sage_format.h visible_keys)
  bool pv_fp8;
  int qk_bits;
  bool smooth_q;
  const float* q_bias;  // smooth_q only
  const int8_t* q_int;
  const float* q_scale;
  const float* lse_corr;
  const int8_t* k_int;
  const float* k_scale;
  const void* v_t;
  const float* v_scale;
  void* out;   // [B, Hq, Lq, D] contiguous, dtype
  float* lse;  // [B, Hq, Lq]
  // Block mask (sage_format.h, "block sparsity"): contiguous bool [B, mask_heads, mask_q_blocks, mask_k_blocks]
  // or nullptr (dense). Tiles of a masked key block are neither loaded nor multiplied.
  const uint8_t* block_mask;
  int64_t mask_heads, mask_q_blocks, mask_k_blocks;
  // Key padding mask: contiguous bool [B, Lk] (false = padding, its scores -inf) or nullptr (none).
  const uint8_t* key_padding;
};

// Prologue (sage_quant_cuda.cu; sm_80, sm_89, sm_90a).
cudaError_t sage_quantize_sm8x(const SageQuantArgs& a, cudaStream_t stream);
// mma.sync attention (sage_attn_kernel.cuh), one launcher per (Q.K^T width, P.V type); each takes every
// head dim, both 16-bit dtypes, with or without Q smoothing.
cudaError_t sage_attention_sm8x_s8_f16(const SageAttnArgs& a, cudaStream_t stream);   // sm_80, sm_89, sm_90a
cudaError_t sage_attention_sm8x_s8_e4m3(const SageAttnArgs& a, cudaStream_t stream);  // sm_89, sm_90a
cudaError_t sage_attention_sm8x_s4_f16(const SageAttnArgs& a, cudaStream_t stream);   // sm_80, sm_89
cudaError_t sage_attention_sm8x_s4_e4m3(const SageAttnArgs& a, cudaStream_t stream);  // sm_89
// sm90a (sage_attn_sm90.cu): the same prologue outputs (pv_fp8 only, len_q_pad and len_k_pad multiples of
// 128), first rewritten into tile-native K / V^T blocks in k_tiles / v_tiles (scratch of k_int's / v_t's
// size, sage_sm90_layout.h), then the wgmma attention kernel.
cudaError_t sage_attention_sm90(const SageAttnArgs& a, int8_t* k_tiles, uint8_t* v_tiles, cudaStream_t stream);

}  // namespace tersor::attention
