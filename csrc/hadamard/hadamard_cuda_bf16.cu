// Power-of-two Hadamard kernels for __nv_bfloat16 input (one translation unit per dtype, built in parallel).
#include "hadamard/hadamard_cuda.h"
#include "hadamard/hadamard_pow2_kernel.cuh"

namespace tersor::hadamard::detail {

cudaError_t fwht_pow2_bf16(const void* x, void* y, bool y_float32, int64_t rows, int log_n, float scale,
                         cudaStream_t stream) {
  const auto* xt = static_cast<const __nv_bfloat16*>(x);
  if (y_float32) return launch_fwht_pow2_typed(xt, static_cast<float*>(y), rows, log_n, scale, stream);
  return launch_fwht_pow2_typed(xt, static_cast<__nv_bfloat16*>(y), rows, log_n, scale, stream);
}

}  // namespace tersor::hadamard::detail
