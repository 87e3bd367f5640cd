// Decode over the quantized paged KV cache, P~ V by mma.m16n8k32.e4m3 with two-level fp32 accumulation: sm_89
// only (Ada's native FP8 mma.sync; sm_80 has none, sm_90a runs the fp16 variant, see decode_cuda_f16.cu). Plan
// and merge kernels come from decode_cuda_f16.cu. Kernel body: decode_kernel.cuh. CUDA path compiled, not run.
#include "attention/decode_kernel.cuh"

namespace tersor::attention {

cudaError_t decode_paged_cuda_launch_e4m3(const DecodeArgs& a, cudaStream_t stream) {
  cudaError_t e = decode_plan_launch(a, stream);
  if (e == cudaSuccess) e = decode_detail::dispatch_split<true>(a, stream);
  if (e == cudaSuccess) e = decode_merge_launch(a, stream);
  return e;
}

}  // namespace tersor::attention
