// BSR kernels for bfloat16 (kernel template: bsr_cuda_kernel.cuh); its own TU so the dtypes compile in parallel.
#include "sparse/bsr_cuda_kernel.cuh"

namespace tersor::sparse {

cudaError_t launch_bsr_linear_bf16(const BsrKernelArgs& a, cudaStream_t stream) {
  return launch_bsr_linear_t<__nv_bfloat16>(a, stream);
}

}  // namespace tersor::sparse
