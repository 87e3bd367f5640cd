// CUDA kernels of the AQLM ops (out_group 1, in_group 8): decode, and the decode GEMV for 1..8 rows of
// x. The per-group arithmetic is aqlm_format.h's, shared with the CPU ops (decode is bit-identical).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "codebook/aqlm_format.h"
#include "codebook/codebook_cuda.h"
#include "common/cuda_elem.cuh"

namespace tersor::codebook {
namespace {

template <typename CodeT, typename OutT>
__global__ void __launch_bounds__(AQLMDecodeTraits::kThreads) aqlm_decode_kernel(const AQLMKernelArgs a, OutT* out) {
  const CodeT* codes = static_cast<const CodeT*>(a.codes);
  const int64_t entries = int64_t{1} << a.nbits, total = a.out * a.groups;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t o = i / a.groups;
    float v[8];
    aqlm_group_values(codes + i * a.num_codebooks, a.num_codebooks, a.index_mask, a.codebooks, entries, v);
    const float s = a.scales[o];
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] = v[k] * s;
    store8_from_float(out + i * 8, v);  // row o, columns 8 (i % groups) ..: a row's groups are contiguous
  }
}

// One warp per output row; lane l takes groups l, l + 32, ... of the row. With kSmem the fp32
// codebooks (2x8: 16 KiB) are staged in shared memory, where the lanes' random entry reads cost a few
// bank conflicts instead of L2 round trips; 1x16's 2 MiB stay in L2 and are read with ld.global.cg
// (AQLM's kernel notes that bypassing L1 for them is much faster: L1 would only thrash).
template <typename CodeT, typename XT, bool kSmem>
__global__ void __launch_bounds__(AQLMGemvTraits::kThreads)
    aqlm_gemv_kernel(const AQLMKernelArgs a, const XT* x, int batch, const float* bias, XT* y) {
  extern __shared__ float s_books[];
  const int64_t entries = int64_t{1} << a.nbits;
  const float* books = a.codebooks;
  if constexpr (kSmem) {
    const int64_t total = a.num_codebooks * entries * 8;
    for (int64_t i = threadIdx.x; i < total; i += blockDim.x) s_books[i] = a.codebooks[i];
    __syncthreads();
    books = s_books;
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t o = blockIdx.x * int64_t{AQLMGemvTraits::kWarps} + warp;
  if (o >= a.out) return;
  const CodeT* codes = static_cast<const CodeT*>(a.codes) + aqlm_code_offset(o, 0, a.groups, a.num_codebooks);
  const int64_t in = a.groups * 8;
  float acc[AQLMGemvTraits::kMaxBatch];
#pragma unroll
  for (int b = 0; b < AQLMGemvTraits::kMaxBatch; ++b) acc[b] = 0.f;
  for (int64_t j = lane; j < a.groups; j += 32) {
    float v[8];
    if constexpr (kSmem) {
      aqlm_group_values(codes + j * a.num_codebooks, a.num_codebooks, a.index_mask, books, entries, v);
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) v[k] = 0.f;
      for (int c = 0; c < a.num_codebooks; ++c) {
        const float4* e = reinterpret_cast<const float4*>(
            books + aqlm_entry_offset(c, entries, aqlm_index(codes[j * a.num_codebooks + c], a.index_mask)));
        const float4 lo = __ldcg(e), hi = __ldcg(e + 1);
        v[0] += lo.x; v[1] += lo.y; v[2] += lo.z; v[3] += lo.w;
        v[4] += hi.x; v[5] += hi.y; v[6] += hi.z; v[7] += hi.w;
      }
    }
#pragma unroll
    for (int b = 0; b < AQLMGemvTraits::kMaxBatch; ++b) {
      if (b >= batch) break;
      float xv[8];
      load8_as_float(x + aqlm_weight_offset(b, j, in), xv);
#pragma unroll
      for (int k = 0; k < 8; ++k) acc[b] = fmaf(v[k], xv[k], acc[b]);
    }
  }
  const float s = a.scales[o];
#pragma unroll
  for (int b = 0; b < AQLMGemvTraits::kMaxBatch; ++b) {
    if (b >= batch) break;
    float r = acc[b];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) r += __shfl_xor_sync(0xffffffffu, r, off);
    if (lane == 0) y[static_cast<int64_t>(b) * a.out + o] = ElemIO<XT>::from_float(r * s + (bias ? bias[o] : 0.f));
  }
}

int sm_count() {
  int dev = 0, sms = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  return sms;
}

template <typename CodeT, typename OutT>
cudaError_t decode_for(const AQLMKernelArgs& a, OutT* out, cudaStream_t stream) {
  const int64_t total = a.out * a.groups;
  const int64_t want = (total + AQLMDecodeTraits::kThreads - 1) / AQLMDecodeTraits::kThreads;
  const int64_t cap = int64_t{sm_count()} * 8;
  aqlm_decode_kernel<CodeT, OutT><<<static_cast<int>(want < cap ? want : cap), AQLMDecodeTraits::kThreads, 0, stream>>>(a, out);
  return cudaGetLastError();
}

template <typename CodeT, typename XT>
cudaError_t gemv_for(const AQLMKernelArgs& a, const XT* x, int batch, const float* bias, XT* y, cudaStream_t stream) {
  const int64_t entries = (int64_t{1} << a.nbits) * a.num_codebooks;
  const dim3 grid(static_cast<unsigned>((a.out + AQLMGemvTraits::kWarps - 1) / AQLMGemvTraits::kWarps));
  if (aqlm_gemv_uses_smem(entries)) {
    const size_t smem = static_cast<size_t>(entries) * 8 * sizeof(float);
    aqlm_gemv_kernel<CodeT, XT, true><<<grid, AQLMGemvTraits::kThreads, smem, stream>>>(a, x, batch, bias, y);
  } else {
    aqlm_gemv_kernel<CodeT, XT, false><<<grid, AQLMGemvTraits::kThreads, 0, stream>>>(a, x, batch, bias, y);
  }
  return cudaGetLastError();
}

template <typename XT>
cudaError_t gemv_x(const AQLMKernelArgs& a, const void* x, int batch, const float* bias, void* y, cudaStream_t s) {
  return a.codes_int16 ? gemv_for<int16_t>(a, static_cast<const XT*>(x), batch, bias, static_cast<XT*>(y), s)
                       : gemv_for<int8_t>(a, static_cast<const XT*>(x), batch, bias, static_cast<XT*>(y), s);
}

template <typename OutT>
cudaError_t decode_out(const AQLMKernelArgs& a, void* out, cudaStream_t s) {
  return a.codes_int16 ? decode_for<int16_t>(a, static_cast<OutT*>(out), s)
                       : decode_for<int8_t>(a, static_cast<OutT*>(out), s);
}

}  // namespace

cudaError_t launch_aqlm_decode(const AQLMKernelArgs& a, void* out, DType out_dtype, cudaStream_t stream) {
  switch (out_dtype) {
    case DType::kFloat32: return decode_out<float>(a, out, stream);
    case DType::kFloat16: return decode_out<__half>(a, out, stream);
    default: return decode_out<__nv_bfloat16>(a, out, stream);
  }
}

cudaError_t launch_aqlm_gemv(const AQLMKernelArgs& a, const void* x, DType x_dtype, int batch, const float* bias,
                             void* y, cudaStream_t stream) {
  switch (x_dtype) {
    case DType::kFloat32: return gemv_x<float>(a, x, batch, bias, y, stream);
    case DType::kFloat16: return gemv_x<__half>(a, x, batch, bias, y, stream);
    default: return gemv_x<__nv_bfloat16>(a, x, batch, bias, y, stream);
  }
}

}  // namespace tersor::codebook
