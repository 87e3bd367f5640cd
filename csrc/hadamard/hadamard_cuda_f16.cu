// Power-of-two Hadamard kernels for __half input (one translation unit per dtype, built in parallel).
#include "hadamard/hadamard_cuda.h"
#include "hadamard/hadamard_pow2_kernel.cuh"

namespace tersor::hadamard::detail {

cudaError_t fwht_pow2_f16(const void* x, void* y, bool y_float32, int64_t rows, int log_n, float scale,
                         cudaStream_t stream) {
  const auto* xt = static_cast<const __half*>(x);
  if (y_float32) return launch_fwht_pow2_typed(xt, static_cast<float*>(y), rows, log_n, scale, stream);
  return launch_fwht_pow2_typed(xt, static_cast<__half*>(y), rows, log_n, scale, stream);
}

}  // namespace tersor::hadamard::detail
