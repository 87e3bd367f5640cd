// Launchers of the CUDA decode kernels (decode_kernel.cuh; no torch headers): a planner kernel (the split
// quota from the sequence lengths, on the device: no host sync), the split-KV kernel (one CTA per (b, h, row
// block, chunk), partial acc / m / l in a fp32 workspace) and the merge (the twin's LSE combine, in chunk
// order). CUDA path compiled, not run.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "attention/decode_cuda_layout.h"  // DecodeArgs

namespace tersor::attention {


// Bytes of dynamic shared memory of the split kernel for head_dim (fp8: the e4m3 P~ V variant).
int64_t decode_smem_bytes(int64_t head_dim, bool fp8);
// fp16-MMA P~ V (every arch, sm_80+): decode_cuda_f16.cu. Plan, split, merge.
cudaError_t decode_paged_cuda_launch_f16(const DecodeArgs& a, cudaStream_t stream);
// e4m3-MMA P~ V (sm_89 only: decode_cuda_e4m3.cu); plan and merge from the f16 unit.
cudaError_t decode_paged_cuda_launch_e4m3(const DecodeArgs& a, cudaStream_t stream);

// Quantize-on-write (paged_append_cuda.cu): the arguments of tersor::paged_kv_append_ with k and v widened to
// fp32 by the glue (as the twin widens them), indices validated by the Python wrapper.
struct PagedAppendArgs {
  int64_t batch, len, heads_kv, head_dim, page_size, num_pages, max_pages;
  const float* k;  // [B, L, Hkv, D] fp32 contiguous
  const float* v;
  const int32_t* block_table;  // [B, max_pages]
  const int32_t* start;        // [B]
  const int32_t* lengths;      // [B]
  int8_t* k_codes;
  float* k_scale;
  uint8_t* v_codes;
  float* page_meta;
  float* stats;  // [B, Hkv, 2, D] scratch: a prompt chunk's k_mean and v_scale
};
cudaError_t paged_append_cuda_launch(const PagedAppendArgs& a, cudaStream_t stream);

}  // namespace tersor::attention
