// Launchers of the codebook family's CUDA kernels. Plain C++ + CUDA runtime types (no torch headers),
// so the glue and the kernels compile independently.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "codebook/codebook_cuda_traits.h"
#include "common/dtype.h"

namespace tersor::codebook {

struct E8PKernelArgs {
  const int64_t* qidxs = nullptr;  // device, contiguous [m, row_words]
  int64_t m = 0, n = 0, row_words = 0;
  int bits = 2;
  float resid_scale = 1.f;
};

// z [batch, m] (fp32) = x [batch, n] (fp16, 16-byte aligned rows) @ W^^T, batch in 1..kMaxBatch.
cudaError_t launch_e8p_gemv(const E8PKernelArgs& a, const void* x_f16, int batch, float* z, cudaStream_t stream);
// W^ [m, n] in `out_dtype`, bit-identical to the CPU op.
cudaError_t launch_e8p_decode(const E8PKernelArgs& a, void* out, DType out_dtype, cudaStream_t stream);

struct AQLMKernelArgs {
  const void* codes = nullptr;      // device, contiguous [out, groups, C], int8 or int16
  bool codes_int16 = false;
  const float* codebooks = nullptr; // device, fp32 [C, 2^nbits, 8]
  const float* scales = nullptr;    // device, fp32 [out]
  int64_t out = 0, groups = 0;
  int num_codebooks = 1, nbits = 8;
  uint32_t index_mask = 0xff;
};

// W [out, groups * 8] in `out_dtype`, bit-identical to the CPU op.
cudaError_t launch_aqlm_decode(const AQLMKernelArgs& a, void* out, DType out_dtype, cudaStream_t stream);
// y [batch, out] (x's dtype) = x [batch, in] @ W^T + bias (fp32 bias or nullptr), batch in 1..kMaxBatch.
cudaError_t launch_aqlm_gemv(const AQLMKernelArgs& a, const void* x, DType x_dtype, int batch, const float* bias,
                             void* y, cudaStream_t stream);

}  // namespace tersor::codebook
