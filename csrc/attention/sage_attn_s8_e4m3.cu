// mma.sync quantized attention, one instruction set per translation unit: INT8 Q.K^T (mma.m16n8k32.s8) + FP8 P.V (mma.m16n8k32.e4m3, sm_89+): sm_89, sm_90a
// (CMakeLists.txt compiles it for exactly these; sage_route.h routes to it only there).
#include "attention/sage_attn_kernel.cuh"

namespace tersor::attention {

cudaError_t sage_attention_sm8x_s8_e4m3(const SageAttnArgs& a, cudaStream_t stream) {
  if (a.qk_bits != 8 || a.pv_fp8 != true) return cudaErrorInvalidValue;
  return sm8x_detail::dispatch<8, true>(a, stream);
}

}  // namespace tersor::attention
