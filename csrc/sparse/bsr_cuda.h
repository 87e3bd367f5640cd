// Launcher of the BSR tensor-core kernel. Plain C++ + CUDA runtime types (no torch headers).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/dtype.h"
#include "sparse/bsr_cuda_traits.h"

namespace tersor::sparse {

struct BsrKernelArgs {
  const void* x = nullptr;         // device, [tokens, in_features] 16-bit, contiguous, 16-byte aligned
  const void* values = nullptr;    // device, [nnzb, bs, bs] 16-bit, contiguous, 16-byte aligned
  const int32_t* col = nullptr;    // device, [nnzb]
  const int32_t* schedule = nullptr;  // device, BSR v1 schedule (validated when the weight was built/loaded)
  const void* bias = nullptr;      // device, [out_features] of x's dtype, or nullptr
  void* y = nullptr;               // device, [tokens, out_features]
  float* partial = nullptr;        // device scratch, bsr_scratch_floats(...) floats (split mode only)
  int64_t tokens = 0, in_features = 0, out_features = 0, mb = 0, n_split = 0;
  int bs = 64;
};

// fp32 scratch the launch needs: 0 for the whole-row items, and for split items when no row was split
// (S == Mb, since a split row has >= 2 items); an upper bound (S slots) otherwise.
inline int64_t bsr_scratch_floats(int64_t bs, int64_t mb, int64_t n_split, int64_t tokens) {
  return bsr_use_split(tokens) && n_split > mb ? n_split * tokens * bs : 0;
}

// y = x @ W^T (+ bias), fp32 accumulation, one rounding; dtype kFloat16 or kBFloat16; tokens >= 1.
cudaError_t launch_bsr_linear(const BsrKernelArgs& a, DType dtype, cudaStream_t stream);

}  // namespace tersor::sparse
