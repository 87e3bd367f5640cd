// BSR kernels for float16 (kernel template: bsr_cuda_kernel.cuh); the dispatcher over dtypes lives here.
#include "sparse/bsr_cuda_kernel.cuh"

namespace tersor::sparse {

cudaError_t launch_bsr_linear_bf16(const BsrKernelArgs& a, cudaStream_t stream);  // bsr_cuda_bf16.cu

cudaError_t launch_bsr_linear(const BsrKernelArgs& a, DType dtype, cudaStream_t stream) {
  if (a.tokens <= 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat16: return launch_bsr_linear_t<__half>(a, stream);
    case DType::kBFloat16: return launch_bsr_linear_bf16(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace tersor::sparse
