// sm80/sm89 quantized attention: the INT4 Q K^T (mma.m16n8k64.s4) instantiations of sage_attn_kernel.cuh,
// with and without Q smoothing. On sm90a they are trap stubs (no INT4 tensor cores; the glue keeps INT4 off
// cc 9.0).
#include "attention/sage_attn_kernel.cuh"

namespace tersor::attention::sm8x_detail {

template <>
cudaError_t dispatch_bits<4>(const SageAttnArgs& a, cudaStream_t stream) {
  return a.dtype == DType::kBFloat16 ? dispatch_dtype<4, __nv_bfloat16>(a, stream) : dispatch_dtype<4, __half>(a, stream);
}

}  // namespace tersor::attention::sm8x_detail
