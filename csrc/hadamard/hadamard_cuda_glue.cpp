// CUDA implementation of hadamard_transform (torch glue; kernels in hadamard_*_cuda*.cu).
#include "common/cuda_glue.h"
#include "hadamard/hadamard_cuda.h"
#include "hadamard/hadamard_glue.h"

namespace tersor::hadamard {
namespace {

Tensor hadamard_transform_cuda(const Tensor& x, std::optional<double> scale, bool transpose) {
  TERSOR_CHECK(x.is_cuda(), "hadamard_transform (CUDA kernel): expected a CUDA tensor, got ", device_str(x));
  const HadamardCall c = check_hadamard_call(x, scale, "hadamard_transform");
  const CudaDeviceGuard guard(x);
  Tensor xc = as_contiguous(x);
  // Kernels use up to 16-byte vector accesses; a view with an odd storage offset gets a fresh copy.
  if (!is_aligned(xc.const_data_ptr(), 16)) xc = torch::stable::clone(xc);
  Tensor y = empty(x.sizes(), x.scalar_type(), x.device());
  if (c.rows == 0) return y;
  const int64_t max_rows = cuda_max_rows(c.size.k, c.size.log_n, dtype_bytes(c.dtype));
  TERSOR_CHECK_VALUE(c.rows <= max_rows, "hadamard_transform: x has ", c.rows, " rows of n=", c.n,
                     "; the CUDA kernels take at most ", max_rows, " rows of this size and dtype per call ",
                     "(CUDA's grid limit of 2^31 - 1 blocks); split x along its leading dimensions");
  const cudaStream_t stream = current_cuda_stream(x.get_device_index());
  if (c.size.k == 1) {
    TERSOR_CUDA_CHECK(launch_fwht_pow2(xc.const_data_ptr(), y.mutable_data_ptr(), c.dtype, /*y_float32=*/false,
                                       c.rows, c.size.log_n, c.scale, stream));
  } else {
    // Sub-row transforms into an fp32 scratch (no intermediate rounding), then the K x K mix.
    Tensor scratch = empty({c.rows, c.n}, ScalarType::Float, x.device());
    TERSOR_CUDA_CHECK(launch_fwht_pow2(xc.const_data_ptr(), scratch.mutable_data_ptr(), c.dtype,
                                       /*y_float32=*/true, c.rows * c.size.k, c.size.log_n, 1.f, stream));
    TERSOR_CUDA_CHECK(launch_kmix(scratch.const_data_ptr<float>(), y.mutable_data_ptr(), c.dtype, c.rows, c.size.k,
                                  c.size.log_n, c.scale, transpose, stream));
  }
  return y;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(tersor, CUDA, m) { m.impl("hadamard_transform", TORCH_BOX(&hadamard_transform_cuda)); }

}  // namespace tersor::hadamard
