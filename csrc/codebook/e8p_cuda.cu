// CUDA kernels of the E8P12 (QuIP#) ops: the fused decode GEMV (batch 1..8, tensor cores) and decode.
// Layout and fragment mapping: e8p_format.h (replayed on the CPU by e8p_cuda_emulate.cpp).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "codebook/codebook_cuda.h"
#include "codebook/e81b_table.h"
#include "codebook/e8p_format.h"
#include "common/cuda_elem.cuh"
#include "common/mma.cuh"

namespace tersor::codebook {
namespace {

// The tables live in constant memory (initialised at compile time from the constexpr builders) and are
// copied to shared memory by each block: lanes index them divergently, which constant memory would
// serialise.
__constant__ E8PTables c_e8p = kE8PTables;
__constant__ E81BTable c_e81b = kE81BTable;

using GemvT = E8PGemvTraits;

struct GemvParams {
  E8PKernelArgs a;
  const __half* x;
  int batch;
  float* z;
};

// The four k16 MMAs of one decoded word (64 columns of the 16-row block) into `acc`.
__device__ __forceinline__ void mma_e8p_word(float acc[4], const E8PHalfWord& h, const uint32_t xa_w[4],
                                             const uint32_t xb_w[4]) {
#pragma unroll
  for (int t = 0; t < 4; ++t) {
    uint32_t a[4], bias[4];
    e8p_a_frag(h, t, a, bias);
#pragma unroll
    for (int r = 0; r < 4; ++r) a[r] = sub_f16x2(a[r], bias[r]);
    mma_m16n8k16_f16_f32(acc, a, xa_w[t], xb_w[t]);
  }
}

template <int kBits>
__global__ void __launch_bounds__(GemvT::kThreads) e8p_gemv_kernel(const GemvParams p) {
  __shared__ uint32_t s_abs[256];
  __shared__ uint32_t s_e81b[kBits == 3 ? 256 : 1][4];
  __shared__ float s_part[GemvT::kWarps][16][8];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, q = lane & 3;
  for (int i = tid; i < 256; i += GemvT::kThreads) s_abs[i] = c_e8p.packed_abs[i];
  if constexpr (kBits == 3)
    for (int i = tid; i < 1024; i += GemvT::kThreads) s_e81b[i >> 2][i & 3] = c_e81b.half2[i >> 2][i & 3];
  __syncthreads();

  const int64_t n = p.a.n, I = blockIdx.x;
  const uint8_t* qbytes = reinterpret_cast<const uint8_t*>(p.a.qidxs);
  float acc1[4] = {0.f, 0.f, 0.f, 0.f}, acc2[4] = {0.f, 0.f, 0.f, 0.f};
  E8PWordCursor cur{16 * I, 0, n / 32};
  cur.advance(32 * warp + lane);
  const bool has_x = g < p.batch;  // lanes of group g carry row g of x in the MMA's N dimension
  for (int64_t J = warp; J < n / 64; J += GemvT::kWarps, cur.advance(32 * GemvT::kWarps)) {
    const uint64_t w1 = ldg_nc_u64(p.a.qidxs + cur.offset(p.a.row_words, 0));
    uint64_t w2 = 0;
    uint32_t r0_codes = 0, r1_codes = 0;
    if constexpr (kBits == 4) w2 = ldg_nc_u64(p.a.qidxs + cur.offset(p.a.row_words, 1));
    if constexpr (kBits == 3) {
      const int64_t R0 = 16 * I + 2 * g, code_col = e8p_lane_x_col(J, q) / 8;
      // Two adjacent E81B codes per row (2-byte aligned: code_col is even).
      r0_codes = *reinterpret_cast<const uint16_t*>(qbytes + e81b_byte_index(R0, code_col, n));
      r1_codes = *reinterpret_cast<const uint16_t*>(qbytes + e81b_byte_index(R0 + 1, code_col, n));
    }
    uint4 xa = make_uint4(0, 0, 0, 0), xb = make_uint4(0, 0, 0, 0);
    if (has_x) {
      const uint4* xr = reinterpret_cast<const uint4*>(p.x + g * n + e8p_lane_x_col(J, q));
      xa = __ldg(xr);
      xb = __ldg(xr + 1);
    }
    const uint32_t xa_w[4] = {xa.x, xa.y, xa.z, xa.w}, xb_w[4] = {xb.x, xb.y, xb.z, xb.w};
    mma_e8p_word(acc1, e8p_word_to_halves(w1, s_abs), xa_w, xb_w);
    if constexpr (kBits == 4) mma_e8p_word(acc2, e8p_word_to_halves(w2, s_abs), xa_w, xb_w);
    if constexpr (kBits == 3) {
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        uint32_t a[4];
        e81b_a_frag(s_e81b, r0_codes, r1_codes, t, a);
        mma_m16n8k16_f16_f32(acc2, a, xa_w[t], xb_w[t]);
      }
    }
  }
  // C fragment: c0, c1 = (row g, n 2q / 2q+1), c2, c3 = (row g+8, ...).
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float v = kBits > 2 ? acc1[i] + acc2[i] / p.a.resid_scale : acc1[i];
    s_part[warp][g + 8 * (i >> 1)][2 * q + (i & 1)] = v;
  }
  __syncthreads();
  for (int idx = tid; idx < 16 * p.batch; idx += GemvT::kThreads) {
    const int r = idx & 15, b = idx >> 4;
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < GemvT::kWarps; ++w) s += s_part[w][r][b];  // warp order: deterministic
    p.z[b * p.a.m + e8p_c_row(I, r)] = s;
  }
}

// ---- decode: one packed word (4 codes) per thread, grid-stride ----
template <typename OutT, int kBits>
__global__ void __launch_bounds__(E8PDecodeTraits::kThreads) e8p_decode_kernel(const E8PKernelArgs a, OutT* out) {
  __shared__ float s_abs[256][8];
  __shared__ float s_e81b[kBits == 3 ? 256 : 1][8];
  for (int i = threadIdx.x; i < 2048; i += blockDim.x) s_abs[i >> 3][i & 7] = c_e8p.signed_abs[i >> 3][i & 7];
  if constexpr (kBits == 3)
    for (int i = threadIdx.x; i < 2048; i += blockDim.x) s_e81b[i >> 3][i & 7] = c_e81b.value[i >> 3][i & 7];
  __syncthreads();
  const int64_t n = a.n, words = a.m * (n / 32);
  const uint8_t* qbytes = reinterpret_cast<const uint8_t*>(a.qidxs);
  for (int64_t f = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; f < words; f += int64_t{gridDim.x} * blockDim.x) {
    const int64_t I = f / (n / 2), t = f % (n / 2);
    const int64_t J = t / 32;
    const int lane = static_cast<int>(t % 32);
    E8PWordCursor cur{16 * I, 0, n / 32};
    cur.advance(t);
    const uint64_t w1 = ldg_nc_u64(a.qidxs + cur.offset(a.row_words, 0));
    const uint64_t w2 = kBits == 4 ? ldg_nc_u64(a.qidxs + cur.offset(a.row_words, 1)) : 0;
#pragma unroll
    for (int slot = 0; slot < 4; ++slot) {
      const E8PSlotPos pos = e8p_slot_pos(I, J, lane, slot);
      float v[8];
      e8p_decode_code(e8p_slot_code(w1, slot), s_abs, v);
      if constexpr (kBits == 4) {
        float v2[8];
        e8p_decode_code(e8p_slot_code(w2, slot), s_abs, v2);
#pragma unroll
        for (int k = 0; k < 8; ++k) v[k] = v[k] + v2[k] / a.resid_scale;
      } else if constexpr (kBits == 3) {
        const uint8_t code = qbytes[e81b_byte_index(pos.row, pos.col / 8, n)];
#pragma unroll
        for (int k = 0; k < 8; ++k) v[k] = v[k] + s_e81b[code][k] / a.resid_scale;
      }
      store8_from_float(out + e8p_elem_offset(pos.row, pos.col, n), v);
    }
  }
}

template <typename OutT>
cudaError_t decode_for(const E8PKernelArgs& a, OutT* out, cudaStream_t stream) {
  const int64_t words = a.m * (a.n / 32);
  int dev = 0, sms = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  const int64_t want = (words + E8PDecodeTraits::kThreads - 1) / E8PDecodeTraits::kThreads;
  const int blocks = static_cast<int>(want < int64_t{sms} * 8 ? want : int64_t{sms} * 8);
  switch (a.bits) {
    case 2: e8p_decode_kernel<OutT, 2><<<blocks, E8PDecodeTraits::kThreads, 0, stream>>>(a, out); break;
    case 3: e8p_decode_kernel<OutT, 3><<<blocks, E8PDecodeTraits::kThreads, 0, stream>>>(a, out); break;
    default: e8p_decode_kernel<OutT, 4><<<blocks, E8PDecodeTraits::kThreads, 0, stream>>>(a, out); break;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_e8p_gemv(const E8PKernelArgs& a, const void* x_f16, int batch, float* z, cudaStream_t stream) {
  const GemvParams p{a, static_cast<const __half*>(x_f16), batch, z};
  const dim3 grid(static_cast<unsigned>(a.m / 16));
  switch (a.bits) {
    case 2: e8p_gemv_kernel<2><<<grid, GemvT::kThreads, 0, stream>>>(p); break;
    case 3: e8p_gemv_kernel<3><<<grid, GemvT::kThreads, 0, stream>>>(p); break;
    default: e8p_gemv_kernel<4><<<grid, GemvT::kThreads, 0, stream>>>(p); break;
  }
  return cudaGetLastError();
}

cudaError_t launch_e8p_decode(const E8PKernelArgs& a, void* out, DType out_dtype, cudaStream_t stream) {
  switch (out_dtype) {
    case DType::kFloat32: return decode_for(a, static_cast<float*>(out), stream);
    case DType::kFloat16: return decode_for(a, static_cast<__half*>(out), stream);
    default: return decode_for(a, static_cast<__nv_bfloat16*>(out), stream);
  }
}

}  // namespace tersor::codebook
