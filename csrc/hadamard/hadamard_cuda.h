// Launchers of the Hadamard CUDA kernels. Plain C++ + CUDA runtime types: no torch headers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/dtype.h"

namespace tersor::hadamard {

// y[r] = scale * H_{2^log_n} x[r] for `rows` contiguous rows. x is of type x_type; y is of type
// x_type, or float32 when y_float32 (the first stage of the K * 2^k transform). Both pointers must be
// aligned to min(16, (2^log_n) * element size) bytes. Returns the launch error, if any.
namespace detail {
cudaError_t fwht_pow2_f32(const void* x, void* y, bool y_float32, int64_t rows, int log_n, float scale,
                          cudaStream_t stream);
cudaError_t fwht_pow2_f16(const void* x, void* y, bool y_float32, int64_t rows, int log_n, float scale,
                          cudaStream_t stream);
cudaError_t fwht_pow2_bf16(const void* x, void* y, bool y_float32, int64_t rows, int log_n, float scale,
                           cudaStream_t stream);
}  // namespace detail

inline cudaError_t launch_fwht_pow2(const void* x, void* y, DType x_type, bool y_float32, int64_t rows,
                                    int log_n, float scale, cudaStream_t stream) {
  switch (x_type) {
    case DType::kFloat32: return detail::fwht_pow2_f32(x, y, y_float32, rows, log_n, scale, stream);
    case DType::kFloat16: return detail::fwht_pow2_f16(x, y, y_float32, rows, log_n, scale, stream);
    case DType::kBFloat16: return detail::fwht_pow2_bf16(x, y, y_float32, rows, log_n, scale, stream);
  }
  return cudaErrorInvalidValue;
}

// Second stage of the K * 2^log_n transform: for every row, viewing t[r] as a K x 2^log_n matrix T,
// y[r] = scale * H_K T (or H_K^T T when transpose). t is float32, y is of type y_type.
cudaError_t launch_kmix(const float* t, void* y, DType y_type, int64_t rows, int k, int log_n,
                        float scale, bool transpose, cudaStream_t stream);

}  // namespace tersor::hadamard
