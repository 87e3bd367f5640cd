// Launcher of the XAttention scoring kernel (xattn_cuda.cu; no torch headers). Algorithm and index rules:
// xattn_format.h, docs/research/xattention.md.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/dtype.h"

namespace tersor::attention {

struct XattnArgs {
  int64_t batch, heads_q, heads_kv, len_q, len_k, head_dim, block, stride, q_blocks, k_blocks;
  int64_t sq_b, sq_h, sq_l, sk_b, sk_h, sk_l;  // element strides of q and k (head dim contiguous)
  DType dtype;                                  // kFloat32, kFloat16 or kBFloat16
  const void *q, *k;
  float scale;
  double threshold;
  bool causal;
  uint8_t* mask;  // [B, Hq, q_blocks, k_blocks] contiguous
  float* mass;    // same shape
};

// Bytes of dynamic shared memory the kernel needs (the caller checks it against the device's opt-in limit).
int64_t xattn_smem_bytes(const XattnArgs& a);
cudaError_t xattention_mask_cuda_launch(const XattnArgs& a, cudaStream_t stream);

// qk = "int8" (xattn_int8_cuda.cu, mma.sync s8: sm_80+): device scratch for the quantized reduced rows, of
// xattn_int8_scratch_sizes' row counts (rows of stride * head_dim bytes, one float scale each). Needs
// (block / stride) % 8 == 0 and (stride * head_dim) % 32 == 0 (cudaErrorInvalidValue otherwise).
struct XattnInt8Scratch {
  int8_t* q_codes;
  float* q_scale;
  int8_t* k_codes;
  float* k_scale;
};
void xattn_int8_scratch_sizes(const XattnArgs& a, int64_t* q_rows, int64_t* k_rows);
int64_t xattn_int8_smem_bytes(const XattnArgs& a);
cudaError_t xattention_mask_int8_cuda_launch(const XattnArgs& a, const XattnInt8Scratch& s, cudaStream_t stream);

}  // namespace tersor::attention
