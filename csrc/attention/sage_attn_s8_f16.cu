// mma.sync quantized attention, one instruction set per translation unit: INT8 Q.K^T (mma.m16n8k32.s8) + P.V in the inputs' 16-bit type (mma.m16n8k16): sm_80, sm_89, sm_90a
// (CMakeLists.txt compiles it for exactly these; sage_route.h routes to it only there).
#include "attention/sage_attn_kernel.cuh"

namespace tersor::attention {

cudaError_t sage_attention_sm8x_s8_f16(const SageAttnArgs& a, cudaStream_t stream) {
  if (a.qk_bits != 8 || a.pv_fp8 != false) return cudaErrorInvalidValue;
  return sm8x_detail::dispatch<8, false>(a, stream);
}

}  // namespace tersor::attention
