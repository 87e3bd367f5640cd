// sm80/sm89 quantized attention: the INT8 Q K^T instantiations of sage_attn_kernel.cuh (with and without Q
// smoothing) and the entry point, which hands INT4 to sage_attn_cuda_int4.cu (a separate translation unit:
// the instantiations compile in parallel).
#include "attention/sage_attn_kernel.cuh"

namespace tersor::attention {
namespace sm8x_detail {

template <>
cudaError_t dispatch_bits<8>(const SageAttnArgs& a, cudaStream_t stream) {
  return a.dtype == DType::kBFloat16 ? dispatch_dtype<8, __nv_bfloat16>(a, stream) : dispatch_dtype<8, __half>(a, stream);
}

}  // namespace sm8x_detail

cudaError_t sage_attention_sm8x(const SageAttnArgs& a, cudaStream_t stream) {
  if (a.qk_bits == 4) return sm8x_detail::dispatch_bits<4>(a, stream);
  if (a.qk_bits == 8) return sm8x_detail::dispatch_bits<8>(a, stream);
  return cudaErrorInvalidValue;
}

}  // namespace tersor::attention
