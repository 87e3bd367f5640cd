// mma.sync quantized attention, one instruction set per translation unit: INT4 Q.K^T (mma.m16n8k64.s4, no INT4 tensor cores from sm_90 on) + 16-bit P.V: sm_80, sm_89
// (CMakeLists.txt compiles it for exactly these; sage_route.h routes to it only there).
#include "attention/sage_attn_kernel.cuh"

namespace tersor::attention {

cudaError_t sage_attention_sm8x_s4_f16(const SageAttnArgs& a, cudaStream_t stream) {
  if (a.qk_bits != 4 || a.pv_fp8 != false) return cudaErrorInvalidValue;
  return sm8x_detail::dispatch<4, false>(a, stream);
}

}  // namespace tersor::attention
