// The sm80/sm89 quantized attention kernel, shared by the translation units that instantiate it, one per
// instruction set (sage_attn_{s8,s4}_{f16,e4m3}.cu), each compiled only for the architectures that have
// its instructions (FP8 mma: sm_89, sm_90a; INT4 mma: sm_80, sm_89), so the instantiations compile in
// parallel and no cubin carries code its architecture cannot run (a static_assert in the kernel enforces it).
// Quantized attention forward, sm80/sm89 (mma.sync + cp.async). One CTA = 128 query rows of one (batch,
// head), 4 warps x 32 rows (D = 64) or 8 warps x 16 rows (D = 128, sage_cuda_traits.h); keys in 64-token tiles, double-buffered in shared memory. Per tile:
//   S = INT8 Q K^T (m16n8k32 s8) or INT4 (m16n8k64 s4), exact s32, * (q_scale * k_scale) -- one scale pair per
//       lane (fragment groups) -- + q_mean . K'_j with Q smoothing (SMOOTH_Q, the prologue's q_bias)
//   online softmax in base 2 (ex2.approx); P~ = e4m3(2^(s - m + log2 448)) or P rounded to the 16-bit type
//   O = O * alpha + P~ V~: FP8 m16n8k32 with a zero accumulator per 32 tokens, added into fp32 O (two-level),
//   or the 16-bit m16n8k16 accumulating in fp32.
// Epilogue: O * v_scale / l, LSE = ln2 (m - offset + log2 l) + scale q.k_mean. Numerics contract and the CPU
// twin: sage_cpu.cpp, docs/research/sage_attention.md.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "attention/sage_cuda.h"
#include "attention/sage_cuda_layout.h"
#include "attention/sage_cuda_traits.h"
#include "attention/sage_format.h"
#include "common/mma.cuh"
#include "common/mma_int8_fp8.cuh"
#include "common/smem_load.cuh"

namespace tersor::attention {
namespace sm8x_detail {

__device__ __forceinline__ uint32_t lds32(const uint8_t* p) { return *reinterpret_cast<const uint32_t*>(p); }

template <typename T16>
struct Pack16;
template <>
struct Pack16<__half> {
  // lo -> bits 0..15 (the lower k / column index of the fragment pair)
  static __device__ __forceinline__ uint32_t pack(float lo, float hi, float& rlo, float& rhi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    rlo = __low2float(h);
    rhi = __high2float(h);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  static __device__ __forceinline__ void mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    mma_m16n8k16_f16_f32(c, a, b0, b1);
  }
};
template <>
struct Pack16<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi, float& rlo, float& rhi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    rlo = __low2float(h);
    rhi = __high2float(h);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  static __device__ __forceinline__ void mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    mma_m16n8k16_bf16_f32(c, a, b0, b1);
  }
};

template <int D, bool FP8, int BITS, bool SMOOTH_Q, typename T16>
__device__ __forceinline__ void sage_attn_body(const SageAttnArgs& a) {
  using Tr = SageAttnSm8xKernelTraits<D, FP8, BITS>;
  constexpr int kRowBytes = Tr::kQKRowDataBytes;  // a packed Q / K row in global memory
  extern __shared__ __align__(16) uint8_t smem[];
  uint8_t* q_s = smem;
  uint8_t* k_s = smem + Tr::kQBytes;
  uint8_t* v_s = k_s + Tr::kStages * Tr::kKBytes;

  const SageDims& d = a.dims;
  const int64_t bh = blockIdx.y, b = bh / d.heads_q, h = bh % d.heads_q;
  const int64_t bkv = b * d.heads_kv + h / (d.heads_q / d.heads_kv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * Tr::kCtaQ;
  const int64_t last_row = (r0 + Tr::kCtaQ - 1 < d.len_q - 1) ? r0 + Tr::kCtaQ - 1 : d.len_q - 1;
  // The key tiles any row of this CTA sees (causal, window): [span.first, n_tiles).
  const TileSpan span = visible_tiles(a.mask, r0, last_row, d.len_q, d.len_k, Tr::kCtaK);
  const int n_tiles = span.end;
  // Block mask row of this CTA (kCtaQ == kSparseBlockQ); the CTA walks only the live tiles.
  const uint8_t* mask_row =
      a.block_mask == nullptr
          ? nullptr
          : a.block_mask + block_mask_row_offset(b, h, blockIdx.x, a.mask_heads, a.mask_q_blocks, a.mask_k_blocks);

  // int64 global offsets: sage_cuda_layout.h
  const int8_t* q_g = a.q_int + qk_row_offset(bh, d.len_q_pad, r0, kRowBytes);
  const int8_t* k_g = a.k_int + qk_row_offset(bkv, d.len_k_pad, 0, kRowBytes);
  const uint8_t* v_g = static_cast<const uint8_t*>(a.v_t) + v_t_offset(bkv, D, d.len_k_pad, 0, 0, Tr::kVElemBytes);

  constexpr int kRowChunks = kRowBytes / 16;
  for (int i = threadIdx.x; i < Tr::kCtaQ * kRowChunks; i += Tr::kThreads) {
    const int row = chunk_row(i, kRowChunks), cb = chunk_col_byte(i, kRowChunks);
    cp_async_16(q_s + row * Tr::kQKRowBytes + cb, q_g + row * kRowBytes + cb);
  }
  auto load_kv = [&](int tile, int stage) {
    uint8_t* ks = k_s + stage * Tr::kKBytes;
    const int8_t* ksrc = k_g + qk_row_offset(0, 0, static_cast<int64_t>(tile) * Tr::kCtaK, kRowBytes);
    for (int i = threadIdx.x; i < Tr::kCtaK * kRowChunks; i += Tr::kThreads) {
      const int row = chunk_row(i, kRowChunks), cb = chunk_col_byte(i, kRowChunks);
      cp_async_16(ks + row * Tr::kQKRowBytes + cb, ksrc + row * kRowBytes + cb);
    }
    uint8_t* vs = v_s + stage * Tr::kVBytes;
    constexpr int kVChunks = Tr::kCtaK * Tr::kVElemBytes / 16;
    for (int i = threadIdx.x; i < D * kVChunks; i += Tr::kThreads) {
      const int c = chunk_row(i, kVChunks), cb = chunk_col_byte(i, kVChunks);
      cp_async_16(vs + c * Tr::kVRowBytes + cb,
                  v_g + v_t_offset(0, D, d.len_k_pad, c, static_cast<int64_t>(tile) * Tr::kCtaK, Tr::kVElemBytes) + cb);
    }
  };
  int tile = next_live_tile(mask_row, span.first, n_tiles, Tr::kCtaK);
  if (tile < n_tiles) load_kv(tile, 0);
  cp_async_commit();

  const int64_t row_base = r0 + warp * Tr::kWarpRows;
  const float q_sc = a.q_scale[q_scale_index(bh, d.len_q_pad, row_base, g)];
  const float* k_sc = a.k_scale + k_scale_index(bkv, d.len_k_pad, 0, 0);
  // Q smoothing: the warp's 32 rows are one smoothing block, so all its scores of key j get bias[j].
  const float* q_bias = SMOOTH_Q ? a.q_bias + q_bias_index(bh, d.len_q_pad, d.len_k_pad, row_base, 0) : nullptr;
  constexpr float kPOff = FP8 ? kFp8POffset : 0.f;
  // Key padding mask row of this batch entry (nullptr: none): a padded key's score is -inf.
  const uint8_t* key_pad = a.key_padding == nullptr ? nullptr : a.key_padding + b * d.len_k;
  // Keys visible to this lane's 4 rows (row_base + 16 mt + 8 hh + g): [key_lo, key_hi) (causal, window).
  int key_lo[Tr::kMTiles][2], key_hi[Tr::kMTiles][2];
#pragma unroll
  for (int mt = 0; mt < Tr::kMTiles; ++mt)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const KeySpan ks = visible_keys(a.mask, row_base + mt * 16 + frag_c_row(g, 2 * hh), d.len_q, d.len_k);
      key_lo[mt][hh] = static_cast<int>(ks.lo);
      key_hi[mt][hh] = static_cast<int>(ks.hi);
    }

  float o[Tr::kMTiles][Tr::kDTiles][4];
#pragma unroll
  for (int mt = 0; mt < Tr::kMTiles; ++mt)
#pragma unroll
    for (int dn = 0; dn < Tr::kDTiles; ++dn)
#pragma unroll
      for (int i = 0; i < 4; ++i) o[mt][dn][i] = 0.f;
  float m[Tr::kMTiles][2], l[Tr::kMTiles][2];
#pragma unroll
  for (int mt = 0; mt < Tr::kMTiles; ++mt)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) m[mt][hh] = -INFINITY, l[mt][hh] = 0.f;

  for (int it = 0; tile < n_tiles; ++it) {
    const int stage = it & 1;
    const int next = next_live_tile(mask_row, tile + 1, n_tiles, Tr::kCtaK);
    if (next < n_tiles) load_kv(next, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    // ---- S = Q K^T ----
    const uint8_t* ks = k_s + stage * Tr::kKBytes;
    float s[Tr::kMTiles][8][4];
    {
      int32_t acc[Tr::kMTiles][8][4];
#pragma unroll
      for (int mt = 0; mt < Tr::kMTiles; ++mt)
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0;
      // Not unrolled: unrolled, ptxas hoists every k-step's Q fragments and spills at D = 128.
#pragma unroll 1
      for (int kk = 0; kk < Tr::kQKSteps; ++kk) {
        uint32_t af[Tr::kMTiles][4];
#pragma unroll
        for (int mt = 0; mt < Tr::kMTiles; ++mt) {
          const uint8_t* qa = q_s + q_frag_offset<Tr>(warp, mt, g, t, kk, 0);
#pragma unroll
          for (int r = 0; r < 4; ++r) af[mt][r] = lds32(qa + frag_a_delta<Tr>(r));
        }
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          const uint8_t* kb = ks + k_frag_offset<Tr>(nt, g, t, kk, 0);
          const uint32_t b0 = lds32(kb), b1 = lds32(kb + frag_b_delta(1));
#pragma unroll
          for (int mt = 0; mt < Tr::kMTiles; ++mt) {
            if constexpr (BITS == 4)
              mma_m16n8k64_s4_s32(acc[mt][nt], af[mt], b0, b1);
            else
              mma_m16n8k32_s8_s32(acc[mt][nt], af[mt], b0, b1);
          }
        }
      }
      const float dq = q_sc * k_sc[k_scale_in_slice(tile, t)];
      const int tile0 = tile * Tr::kCtaK;
#pragma unroll
      for (int mt = 0; mt < Tr::kMTiles; ++mt)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          // key nt*8 + e of this lane is visible iff lo_lim <= nt*8 + e < lim
          const int lim = key_hi[mt][hh] - tile0 - frag_c_col(t, 0), lo_lim = key_lo[mt][hh] - tile0 - frag_c_col(t, 0);
#pragma unroll
          for (int nt = 0; nt < 8; ++nt) {
            float2 bias = make_float2(0.f, 0.f);
            // Columns 2t, 2t + 1 of n-tile nt: one aligned 8-byte load (the same for both row classes).
            if constexpr (SMOOTH_Q) bias = __ldg(reinterpret_cast<const float2*>(q_bias + tile0 + nt * 8 + frag_c_col(t, 0)));
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              float sv = static_cast<float>(acc[mt][nt][2 * hh + e]) * dq;
              // The twin rounds the product, then adds the bias: no FMA contraction here.
              if constexpr (SMOOTH_Q) sv = __fadd_rn(__fmul_rn(static_cast<float>(acc[mt][nt][2 * hh + e]), dq), e ? bias.y : bias.x);
              // (the padding byte is read only for a key inside [lo, hi), so never past Lk)
              const bool vis = nt * 8 + e < lim && nt * 8 + e >= lo_lim &&
                               (key_pad == nullptr || __ldg(key_pad + tile0 + frag_c_col(t, 0) + nt * 8 + e) != 0);
              s[mt][nt][2 * hh + e] = vis ? sv : -INFINITY;
            }
          }
        }
    }

    // ---- online softmax (rows g and g + 8 of each m-tile; a row lives in the 4 lanes of a quad) ----
#pragma unroll
    for (int mt = 0; mt < Tr::kMTiles; ++mt)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        float mx = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * hh], s[mt][nt][2 * hh + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m[mt][hh], mx);
        const bool none = m_new == -INFINITY;  // nothing visible yet: keep everything at 0
        const float alpha = none ? 1.f : ex2_approx(m[mt][hh] - m_new);
        const float m_shift = none ? 0.f : m_new - kPOff;
        m[mt][hh] = m_new;
        l[mt][hh] *= alpha;
#pragma unroll
        for (int dn = 0; dn < Tr::kDTiles; ++dn) o[mt][dn][2 * hh] *= alpha, o[mt][dn][2 * hh + 1] *= alpha;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          s[mt][nt][2 * hh] = ex2_approx(s[mt][nt][2 * hh] - m_shift);
          s[mt][nt][2 * hh + 1] = ex2_approx(s[mt][nt][2 * hh + 1] - m_shift);
        }
      }

    // ---- O += P V ----
    // P is packed for the whole tile first, so the 64 fp32 scores die before the V loop (register pressure).
    const uint8_t* vs = v_s + stage * Tr::kVBytes;
    if constexpr (FP8) {
      // Compiled for sm_89 / sm_90a only (sage_attn_kernel's static_assert); the guard hides the FP8 PTX
      // wrappers (common/mma_int8_fp8.cuh) from nvcc's host pass.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
      uint32_t pa[Tr::kMTiles][2][4];  // [m-tile][32-token k-step][a0..a3]: a0 row g, a1 row g + 8, a2/a3 the same +16 tokens
#pragma unroll
      for (int mt = 0; mt < Tr::kMTiles; ++mt)
#pragma unroll
        for (int kk = 0; kk < 2; ++kk)
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            const int nt = p8_frag_ntile(kk, r), e = p_frag_elem(r);
            const uint16_t x0 = cvt_e4m3x2(s[mt][nt][e], s[mt][nt][e + 1]);
            const uint16_t x1 = cvt_e4m3x2(s[mt][nt + 1][e], s[mt][nt + 1][e + 1]);
            pa[mt][kk][r] = static_cast<uint32_t>(x0) | (static_cast<uint32_t>(x1) << 16);
            const uint32_t h0 = cvt_f16x2_from_e4m3x2(x0), h1 = cvt_f16x2_from_e4m3x2(x1);
            const __half2 f0 = *reinterpret_cast<const __half2*>(&h0), f1 = *reinterpret_cast<const __half2*>(&h1);
            l[mt][r & 1] += (__low2float(f0) + __high2float(f0)) + (__low2float(f1) + __high2float(f1));
          }
#pragma unroll
      for (int kk = 0; kk < 2; ++kk)
#pragma unroll
        for (int dn = 0; dn < Tr::kDTiles; ++dn) {
          const uint8_t* vb = vs + v_frag_offset<Tr>(dn, g, t, kk, 0);
          const uint32_t b0 = lds32(vb), b1 = lds32(vb + frag_b_delta(1));
#pragma unroll
          for (int mt = 0; mt < Tr::kMTiles; ++mt) mma_m16n8k32_e4m3_add_f32(o[mt][dn], pa[mt][kk], b0, b1);
        }
#endif
    } else {
      uint32_t pa[Tr::kMTiles][4][4];  // [m-tile][16-token k-step (n-tiles 2kk, 2kk + 1)][a0..a3]
#pragma unroll
      for (int mt = 0; mt < Tr::kMTiles; ++mt)
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            const int nt = p16_frag_ntile(kk, r), e = p_frag_elem(r);
            float lo, hi;
            pa[mt][kk][r] = Pack16<T16>::pack(s[mt][nt][e], s[mt][nt][e + 1], lo, hi);
            l[mt][r & 1] += lo + hi;
          }
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
#pragma unroll
        for (int dn = 0; dn < Tr::kDTiles; ++dn) {
          const uint8_t* vb = vs + v_frag_offset<Tr>(dn, g, t, kk, 0);
          const uint32_t b0 = lds32(vb), b1 = lds32(vb + frag_b_delta(1));
#pragma unroll
          for (int mt = 0; mt < Tr::kMTiles; ++mt) Pack16<T16>::mma(o[mt][dn], pa[mt][kk], b0, b1);
        }
    }
    __syncthreads();  // every warp is done with this stage before the next iteration refills it
    tile = next;
  }
  cp_async_wait<0>();

  // ---- epilogue ----
  T16* out = static_cast<T16*>(a.out);
  const float* v_sc = a.v_scale + bkv * D;
#pragma unroll
  for (int mt = 0; mt < Tr::kMTiles; ++mt)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      float lsum = l[mt][hh];
      lsum += __shfl_xor_sync(0xffffffffu, lsum, 1);
      lsum += __shfl_xor_sync(0xffffffffu, lsum, 2);
      const int64_t row = row_base + mt * 16 + frag_c_row(g, 2 * hh);
      if (row >= d.len_q) continue;
      const bool dead = !(lsum > 0.f);
      const float inv_l = dead ? 0.f : 1.f / lsum;
      T16* orow = out + out_row_offset(bh, d.len_q, row, D);
#pragma unroll
      for (int dn = 0; dn < Tr::kDTiles; ++dn) {
        const int c = dn * 8 + frag_c_col(t, 0);
        float v0 = o[mt][dn][2 * hh], v1 = o[mt][dn][2 * hh + 1];
        if constexpr (FP8) {
          v0 = v0 * v_sc[c] * inv_l;
          v1 = v1 * v_sc[c + 1] * inv_l;
        } else {
          v0 *= inv_l;
          v1 *= inv_l;
        }
        if (dead) v0 = v1 = 0.f;
        float rlo, rhi;
        const uint32_t packed = Pack16<T16>::pack(v0, v1, rlo, rhi);
        *reinterpret_cast<uint32_t*>(orow + c) = packed;
      }
      if (t == 0)
        a.lse[out_row_offset(bh, d.len_q, row, 1)] =
            dead ? -INFINITY : (m[mt][hh] - kPOff + log2f(lsum)) * 0.6931471805599453f + a.lse_corr[bh * d.len_q + row];
    }
}

template <int D, bool FP8, int BITS, bool SMOOTH_Q, typename T16>
__global__ void __launch_bounds__(SageAttnSm8xKernelTraits<D, FP8, BITS>::kThreads) sage_attn_kernel(const SageAttnArgs a) {
#if defined(__CUDA_ARCH__)
  // Each instantiation is compiled only where its instructions exist (CMakeLists.txt, sage_route.h): FP8 mma
  // from sm_89, INT4 mma on sm_80..sm_89 (none from sm_90 on).
  static_assert(!FP8 || __CUDA_ARCH__ >= 890, "FP8 P.V (mma e4m3) needs sm_89+: compile this TU for 89 / 90a only");
  static_assert(BITS != 4 || __CUDA_ARCH__ < 900, "INT4 Q.K^T (mma s4) does not exist from sm_90 on: 80 / 89 only");
#endif
  sage_attn_body<D, FP8, BITS, SMOOTH_Q, T16>(a);
}

template <int D, bool FP8, int BITS, bool SMOOTH_Q, typename T16>
cudaError_t launch(const SageAttnArgs& a, cudaStream_t stream) {
  using Tr = SageAttnSm8xKernelTraits<D, FP8, BITS>;
  auto kernel = sage_attn_kernel<D, FP8, BITS, SMOOTH_Q, T16>;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes);
  if (e != cudaSuccess) return e;
  const dim3 grid(static_cast<unsigned>(a.dims.len_q_pad / Tr::kCtaQ), static_cast<unsigned>(a.dims.batch * a.dims.heads_q));
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(a);
  return cudaGetLastError();
}

// Launch for one Q.K^T width and P.V type: every head dim, 16-bit dtype and Q-smoothing choice (each
// instantiating translation unit calls it for its own BITS / FP8 only).
template <int BITS, bool FP8, typename T16>
cudaError_t dispatch_dtype(const SageAttnArgs& a, cudaStream_t stream) {
  const bool sq = a.smooth_q;
  if (a.dims.head_dim == 64) return sq ? launch<64, FP8, BITS, true, T16>(a, stream) : launch<64, FP8, BITS, false, T16>(a, stream);
  if (a.dims.head_dim == 128) return sq ? launch<128, FP8, BITS, true, T16>(a, stream) : launch<128, FP8, BITS, false, T16>(a, stream);
  return cudaErrorInvalidValue;
}

template <int BITS, bool FP8>
cudaError_t dispatch(const SageAttnArgs& a, cudaStream_t stream) {
  return a.dtype == DType::kBFloat16 ? dispatch_dtype<BITS, FP8, __nv_bfloat16>(a, stream)
                                     : dispatch_dtype<BITS, FP8, __half>(a, stream);
}

}  // namespace sm8x_detail
}  // namespace tersor::attention
