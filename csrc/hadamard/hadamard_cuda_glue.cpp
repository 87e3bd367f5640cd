// CUDA implementation of hadamard_transform (torch glue; kernels in hadamard_*_cuda*.cu).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "hadamard/hadamard_cuda.h"
#include "hadamard/hadamard_glue.h"

namespace tersor::hadamard {
namespace {

at::Tensor hadamard_transform_cuda(const at::Tensor& x, std::optional<double> scale, bool transpose) {
  TORCH_CHECK(x.is_cuda(), "hadamard_transform (CUDA kernel): expected a CUDA tensor, got ", x.device());
  const HadamardCall c = check_hadamard_call(x, scale, "hadamard_transform");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor xc = x.contiguous();
  // Kernels use up to 16-byte vector accesses; a view with an odd storage offset gets a fresh copy.
  if (!is_aligned(xc.const_data_ptr(), 16)) xc = xc.clone();
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (c.rows == 0) return y;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (c.size.k == 1) {
    C10_CUDA_CHECK(launch_fwht_pow2(xc.const_data_ptr(), y.mutable_data_ptr(), c.dtype, /*y_float32=*/false,
                                    c.rows, c.size.log_n, c.scale, stream));
  } else {
    // Sub-row transforms into an fp32 scratch (no intermediate rounding), then the K x K mix.
    at::Tensor scratch = at::empty({c.rows, c.n}, x.options().dtype(at::kFloat));
    C10_CUDA_CHECK(launch_fwht_pow2(xc.const_data_ptr(), scratch.mutable_data_ptr(), c.dtype, /*y_float32=*/true,
                                    c.rows * c.size.k, c.size.log_n, 1.f, stream));
    C10_CUDA_CHECK(launch_kmix(scratch.const_data_ptr<float>(), y.mutable_data_ptr(), c.dtype, c.rows, c.size.k,
                               c.size.log_n, c.scale, transpose, stream));
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(tersor, CUDA, m) { m.impl("hadamard_transform", &hadamard_transform_cuda); }

}  // namespace tersor::hadamard
