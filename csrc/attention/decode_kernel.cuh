// The CUDA decode kernels over the quantized paged KV cache (issue 15), shared by decode_cuda_f16.cu (P~ V by
// fp16 mma on the exact fp16 images of the e4m3 codes: sm_80, sm_89, sm_90a) and decode_cuda_e4m3.cu (P~ V by
// e4m3 mma: sm_89). Layout, tiles and planner: decode_cuda_layout.h; numerics contract: the CPU twin,
// paged_cpu.cpp; design: docs/research/paged_decode.md. CUDA path compiled, not run.
//
// Three launches on one stream:
//   decode_plan_kernel   1 CTA: total key tiles of the call (seqlens are on the device: no host sync), the
//                        split quota decode_split_quota(total, workers) into the workspace;
//   decode_split_kernel  one CTA per (chunk s, (b, h), row block): its chunk's tiles in order, one online
//                        softmax (the twin's per-chunk walk), unnormalized acc and (m, l) to the workspace;
//   decode_merge_kernel  one CTA per (row, (b, h)): the chunks in order, the twin's LSE combine, out and LSE.
// Per tile of the split kernel (4 warps, 16 rows):
//   S = q_scale(row) * k_scale(key) * (INT8 Q . INT8 K, exact s32) + q . k_mean(page)   (warp w: keys 16w..)
//   tile row max across warps (shared), alpha, P~ = e4m3(2^(S - m + log2 448)) to shared, l += sum P~
//   pv = P~ V (warp w: channels w D/4 ..), a fresh fp32 buffer; acc = acc * alpha + pv * v_scale(page)
#pragma once

#include <cuda_fp16.h>

#include <cmath>

#include "attention/decode_cuda.h"
#include "attention/decode_cuda_layout.h"
#include "attention/paged_format.h"
#include "attention/sage_format.h"
#include "common/mma.cuh"
#include "common/mma_int8_fp8.cuh"
#include "common/smem_load.cuh"

namespace tersor::attention {
namespace decode_detail {

__device__ __forceinline__ uint32_t lds32(const uint8_t* p) { return *reinterpret_cast<const uint32_t*>(p); }

// Two e4m3 codes (lo in bits 0..7) -> f16x2, exactly. sm_89+: the hardware cvt; sm_80: the bit map of
// decode_e4m3_to_f16_prescaled_bits times 2^8 (exact in fp16).
__device__ __forceinline__ uint32_t e4m3x2_to_f16x2(uint16_t x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  return cvt_f16x2_from_e4m3x2(x);
#else
  const uint32_t bits = static_cast<uint32_t>(decode_e4m3_to_f16_prescaled_bits(static_cast<uint8_t>(x & 0xffu))) |
                        (static_cast<uint32_t>(decode_e4m3_to_f16_prescaled_bits(static_cast<uint8_t>(x >> 8))) << 16);
  __half2 h = *reinterpret_cast<const __half2*>(&bits);
  h = __hmul2(h, __float2half2_rn(256.f));
  return *reinterpret_cast<const uint32_t*>(&h);
#endif
}

// P~ of two scores' exponentials: their e4m3 codes (lo in bits 0..7, RNE, satfinite), the f16x2 image and
// the rounded values (what l sums). sm_80 rounds with float_to_e4m3, the CPU model of the sm_89 cvt.
__device__ __forceinline__ uint16_t p_e4m3x2(float lo, float hi, uint32_t& h16, float& rlo, float& rhi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  const uint16_t x = cvt_e4m3x2(lo, hi);
#else
  const uint16_t x = static_cast<uint16_t>(float_to_e4m3(lo) | (static_cast<uint32_t>(float_to_e4m3(hi)) << 8));
#endif
  h16 = e4m3x2_to_f16x2(x);
  const __half2 f = *reinterpret_cast<const __half2*>(&h16);
  rlo = __low2float(f);
  rhi = __high2float(f);
  return x;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = __fadd_rn(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

template <int D, bool FP8>
__device__ __forceinline__ void decode_split_body(const DecodeArgs& a) {
  using Tr = DecodeTraits<D, FP8>;
  extern __shared__ __align__(16) uint8_t smem[];
  uint8_t* q_s = smem;
  float* qs_s = reinterpret_cast<float*>(smem + Tr::kQBytes);
  uint8_t* k_s = smem + Tr::kQBytes + Tr::kQsBytes;
  uint8_t* v_s = k_s + Tr::kStages * Tr::kKBytes;
  uint8_t* p_s = v_s + Tr::kStages * Tr::kVBytes;
  float* red_max = reinterpret_cast<float*>(p_s + Tr::kPBytes);  // [warp][row]
  float* red_sum = red_max + Tr::kWarps * Tr::kRows;
  float* qsc_s = red_sum + Tr::kWarps * Tr::kRows;  // [row] Q scale
  float* bias_s = qsc_s + Tr::kRows;                // [row] q . k_mean(page of the tile)

  const int64_t split = blockIdx.x, bh = blockIdx.y, rb = blockIdx.z;
  const int64_t b = bh / a.heads_kv, h = bh % a.heads_kv, group = a.heads_q / a.heads_kv;
  const int64_t S = a.page_size;
  const int64_t n = a.seqlens[b];
  const KeyRange span = decode_span(a.len_q, n, a.window_left, a.window_right);
  const DecodeTiles mine = decode_chunk_tiles(decode_tiles(span.lo, span.hi, S, Tr::kTile), *a.ws_quota, split);
  if (mine.count <= 0) return;  // uniform over the CTA: this (b, h) has fewer chunks
  const PagedLayout L{a.num_pages, a.heads_kv, S, D};
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;

  // ---- Q: fp32 * scale * log2 e (the twin's qs), then per-row INT8 (amax / 127) ----
  for (int e = threadIdx.x; e < Tr::kRows * D; e += Tr::kThreads) {
    const int i = e / D, d = e % D;
    const int64_t r = rb * Tr::kRows + i;
    float v = 0.f;
    if (r < a.rows)
      v = __fmul_rn(a.q[decode_q_offset(b, decode_row_token(r, group), decode_row_head(r, h, group), a.len_q,
                                        a.heads_q, D) + d],
                    a.qk_mul);
    qs_s[i * D + d] = v;
  }
  __syncthreads();
#pragma unroll 1
  for (int ii = 0; ii < Tr::kRows / Tr::kWarps; ++ii) {
    const int i = warp * (Tr::kRows / Tr::kWarps) + ii;
    float amax = 0.f;
    for (int d = lane; d < D; d += 32) amax = fmaxf(amax, fabsf(qs_s[i * D + d]));
    amax = warp_max(amax);
    const IntQuantParams p = int_quant_params(amax, 8);
    for (int d = lane; d < D; d += 32)
      q_s[i * Tr::kQRowBytes + d] = static_cast<uint8_t>(static_cast<int8_t>(quantize_int(qs_s[i * D + d], p.inv_scale, 8)));
    if (lane == 0) qsc_s[i] = p.scale;
  }

  // Keys each of this lane's rows (g, g + 8) sees.
  int64_t vis_lo[2], vis_hi[2];
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int64_t r = rb * Tr::kRows + g + 8 * hh;
    const KeyRange v = r < a.rows ? decode_visible_keys(decode_row_token(r, group), a.len_q, n, a.window_left,
                                                        a.window_right)
                                  : KeyRange{0, 0};
    vis_lo[hh] = v.lo;
    vis_hi[hh] = v.hi;
  }

  // One tile's K and V codes: nt <= 64 consecutive slots of one page, token-major; rows past nt zero-filled
  // (V must be finite there: 0 * NaN would poison the MMA).
  auto load_tile = [&](int64_t gt, int stage) {
    const DecodeTileSlots ts = decode_tile_slots(a, b, gt, span, Tr::kTile);
    const int nt = ts.nt;
    const int64_t off = paged_token_offset(L, ts.page, h, ts.slot0);
    uint8_t* ks = k_s + stage * Tr::kKBytes;
    uint8_t* vs = v_s + stage * Tr::kVBytes;
    constexpr int kChunks = D / 16;
    for (int i = threadIdx.x; i < Tr::kTile * kChunks; i += Tr::kThreads) {
      const int row = chunk_row(i, kChunks), cb = chunk_col_byte(i, kChunks);
      const int src_row = row < nt ? row : 0, bytes = row < nt ? 16 : 0;
      cp_async_16(ks + row * Tr::kKRowBytes + cb, a.k_codes + off + src_row * D + cb, bytes);
      cp_async_16(vs + row * Tr::kVRowBytes + cb, a.v_codes + off + src_row * D + cb, bytes);
    }
  };

  float acc[Tr::kDn][4];
#pragma unroll
  for (int dn = 0; dn < Tr::kDn; ++dn)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[dn][i] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

  load_tile(mine.first, 0);
  cp_async_commit();
#pragma unroll 1
  for (int64_t it = 0; it < mine.count; ++it) {
    const int64_t gt = mine.first + it;
    const int stage = static_cast<int>(it & 1);
    if (it + 1 < mine.count) load_tile(gt + 1, stage ^ 1);
    cp_async_commit();

    const DecodeTileSlots ts = decode_tile_slots(a, b, gt, span, Tr::kTile);
    const KeyRange kr = ts.keys;
    const int64_t page = ts.page, slot0 = ts.slot0;
    const int nt = ts.nt;
    const float* kmean = a.page_meta + paged_meta_offset(L, page, h, 0);
    const float* vscale = kmean + D;
    // This lane's K scales (its 4 keys) and V scales (its 2 * kDn channels), issued before the bias loop and
    // the barrier so their L2 latency overlaps them instead of stalling the score and acc updates.
    float ksc_pre[2][2], vsc_pre[Tr::kDn][2];
#pragma unroll
    for (int nt2 = 0; nt2 < 2; ++nt2)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int key = decode_qk_key(warp, nt2, t, e);
        ksc_pre[nt2][e] = key < nt ? __ldg(a.k_scale + paged_scale_offset(L, page, h, slot0 + key)) : 0.f;
      }
#pragma unroll
    for (int dn = 0; dn < Tr::kDn; ++dn)
#pragma unroll
      for (int e = 0; e < 2; ++e) vsc_pre[dn][e] = __ldg(vscale + decode_pv_out_channel(warp, dn, t, e, Tr::kWarpCh));
    // q . k_mean(page) of rows 4w .. 4w + 3 (fp32; lanes own channels lane, lane + 32, ..: a reordered sum)
#pragma unroll 1
    for (int ii = 0; ii < Tr::kRows / Tr::kWarps; ++ii) {
      const int i = warp * (Tr::kRows / Tr::kWarps) + ii;
      float s = 0.f;
      for (int d = lane; d < D; d += 32) s = __fadd_rn(s, __fmul_rn(qs_s[i * D + d], __ldg(kmean + d)));
      s = warp_sum(s);
      if (lane == 0) bias_s[i] = s;
    }
    cp_async_wait<1>();
    __syncthreads();  // [A] the tile's codes, bias and (first tile) Q codes are in shared memory

    // ---- S = Q K^T for this warp's 16 keys ----
    const uint8_t* ks = k_s + stage * Tr::kKBytes;
    int32_t sacc[2][4];
#pragma unroll
    for (int nt2 = 0; nt2 < 2; ++nt2)
#pragma unroll
      for (int i = 0; i < 4; ++i) sacc[nt2][i] = 0;
#pragma unroll
    for (int kk = 0; kk < Tr::kQKSteps; ++kk) {
      uint32_t af[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) af[r] = lds32(q_s + decode_q_frag_offset<Tr>(g, t, kk, r));
#pragma unroll
      for (int nt2 = 0; nt2 < 2; ++nt2) {
        const uint32_t b0 = lds32(ks + decode_k_frag_offset<Tr>(warp, nt2, g, t, kk, 0));
        const uint32_t b1 = lds32(ks + decode_k_frag_offset<Tr>(warp, nt2, g, t, kk, 1));
        mma_m16n8k32_s8_s32(sacc[nt2], af, b0, b1);
      }
    }
    float sc[2][4];
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int row = frag_c_row(g, 2 * hh);
      const float qsc = qsc_s[row], bias = bias_s[row];
#pragma unroll
      for (int nt2 = 0; nt2 < 2; ++nt2)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int key = decode_qk_key(warp, nt2, t, e);
          const int64_t j = kr.lo + key;
          const bool vis = key < nt && j >= vis_lo[hh] && j < vis_hi[hh];
          const float ksc = vis ? ksc_pre[nt2][e] : 0.f;
          // The twin's order: dot * (q_scale * k_scale) + bias, each rounded (no FMA contraction).
          const float sv = __fadd_rn(__fmul_rn(static_cast<float>(sacc[nt2][2 * hh + e]), __fmul_rn(qsc, ksc)), bias);
          sc[nt2][2 * hh + e] = vis ? sv : -INFINITY;
        }
      float mx = fmaxf(fmaxf(sc[0][2 * hh], sc[0][2 * hh + 1]), fmaxf(sc[1][2 * hh], sc[1][2 * hh + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      if (t == 0) red_max[warp * Tr::kRows + row] = mx;
    }
    __syncthreads();  // [B] every warp's row maxima

    // ---- online softmax: the tile's row max over the 4 warps, P~ of this warp's keys ----
    float alpha[2], m_new[2], psum[2];
    bool any[2];
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int row = frag_c_row(g, 2 * hh);
      float tm = red_max[row];
#pragma unroll
      for (int w = 1; w < Tr::kWarps; ++w) tm = fmaxf(tm, red_max[w * Tr::kRows + row]);
      any[hh] = tm != -INFINITY;  // the row sees a key of this tile (else the twin leaves it untouched)
      m_new[hh] = any[hh] ? fmaxf(m[hh], tm) : m[hh];
      alpha[hh] = !any[hh] || m_new[hh] == m[hh] ? 1.f : ex2_approx(m[hh] - m_new[hh]);
      const float m_shift = any[hh] ? m_new[hh] - kFp8POffset : 0.f;
      psum[hh] = 0.f;
#pragma unroll
      for (int nt2 = 0; nt2 < 2; ++nt2) {
        uint32_t h16;
        float r0, r1;
        const uint16_t x = p_e4m3x2(ex2_approx(sc[nt2][2 * hh] - m_shift), ex2_approx(sc[nt2][2 * hh + 1] - m_shift),
                                    h16, r0, r1);
        psum[hh] += r0 + r1;  // e4m3 values: multiples of 2^-9 below 2^15 in total, so every partial sum is exact
        uint8_t* dst = p_s + decode_p_offset<Tr>(row, decode_qk_key(warp, nt2, t, 0));
        if constexpr (FP8)
          *reinterpret_cast<uint16_t*>(dst) = x;
        else
          *reinterpret_cast<uint32_t*>(dst) = h16;
      }
      psum[hh] += __shfl_xor_sync(0xffffffffu, psum[hh], 1);
      psum[hh] += __shfl_xor_sync(0xffffffffu, psum[hh], 2);
      if (t == 0) red_sum[warp * Tr::kRows + row] = psum[hh];
    }
    __syncthreads();  // [C] P~ and the row-sum partials
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      if (!any[hh]) continue;
      const int row = frag_c_row(g, 2 * hh);
      float ts = 0.f;
#pragma unroll
      for (int w = 0; w < Tr::kWarps; ++w) ts += red_sum[w * Tr::kRows + row];
      l[hh] = __fadd_rn(__fmul_rn(l[hh], alpha[hh]), ts);
      m[hh] = m_new[hh];
    }

    // ---- pv = P~ V (this warp's channels, all 64 keys; a fresh fp32 buffer per tile) ----
    const uint8_t* vs = v_s + stage * Tr::kVBytes;
    float pv[Tr::kDn][4];
#pragma unroll
    for (int dn = 0; dn < Tr::kDn; ++dn)
#pragma unroll
      for (int i = 0; i < 4; ++i) pv[dn][i] = 0.f;
#pragma unroll
    for (int kk = 0; kk < Tr::kPVSteps; ++kk) {
      uint32_t pa[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) pa[r] = lds32(p_s + decode_p_frag_offset<Tr>(g, t, kk, r));
#pragma unroll
      for (int dn = 0; dn < Tr::kDn; ++dn) {
        const int ch = decode_pv_channel(warp, dn, g, Tr::kWarpCh);
        uint32_t bf[2];
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          if constexpr (FP8) {
            uint32_t w32 = 0;
#pragma unroll
            for (int i = 0; i < 4; ++i)
              w32 |= static_cast<uint32_t>(vs[decode_v_offset<Tr>(decode_pv_key<Tr>(kk, t, j, i), ch)]) << (8 * i);
            bf[j] = w32;
          } else {
            const uint16_t x = static_cast<uint16_t>(vs[decode_v_offset<Tr>(decode_pv_key<Tr>(kk, t, j, 0), ch)] |
                                                     (vs[decode_v_offset<Tr>(decode_pv_key<Tr>(kk, t, j, 1), ch)] << 8));
            bf[j] = e4m3x2_to_f16x2(x);
          }
        }
        if constexpr (FP8) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
          // Two-level accumulation: each 32-key product starts from 0 and is added into pv in fp32.
          mma_m16n8k32_e4m3_add_f32(pv[dn], pa, bf[0], bf[1]);
#endif
        } else {
          mma_m16n8k16_f16_f32(pv[dn], pa, bf[0], bf[1]);
        }
      }
    }
    // acc = acc * alpha + pv * v_scale(page, channel): the twin's three roundings, in its order.
#pragma unroll
    for (int dn = 0; dn < Tr::kDn; ++dn)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        acc[dn][i] = __fadd_rn(__fmul_rn(acc[dn][i], alpha[i >> 1]), __fmul_rn(pv[dn][i], vsc_pre[dn][i & 1]));
      }
    __syncthreads();  // [D] P~, the partials and this stage are free for the next tile
  }
  cp_async_wait<0>();

  // ---- the chunk's partial: unnormalized acc, m (base 2, P~ offset not removed) and l ----
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int64_t r = rb * Tr::kRows + g + 8 * hh;
    if (r >= a.rows) continue;
    const int64_t prow = decode_partial_row(b, h, split, r, a.heads_kv, a.max_splits, a.rows);
#pragma unroll
    for (int dn = 0; dn < Tr::kDn; ++dn) {
      const int c = decode_pv_out_channel(warp, dn, t, 2 * hh, Tr::kWarpCh);
      *reinterpret_cast<float2*>(a.ws_acc + prow * D + c) = make_float2(acc[dn][2 * hh], acc[dn][2 * hh + 1]);
    }
    if (warp == 0 && t == 0) *reinterpret_cast<float2*>(a.ws_ml + prow * 2) = make_float2(m[hh], l[hh]);
  }
}

template <int D, bool FP8>
__global__ void __launch_bounds__(DecodeTraits<D, FP8>::kThreads) decode_split_kernel(const DecodeArgs a) {
#if defined(__CUDA_ARCH__)
  static_assert(!FP8 || __CUDA_ARCH__ >= 890, "e4m3 P~ V needs sm_89+: compile decode_cuda_e4m3.cu for 89 only");
#endif
  decode_split_body<D, FP8>(a);
}

template <int D, bool FP8>
cudaError_t launch_split(const DecodeArgs& a, cudaStream_t stream) {
  using Tr = DecodeTraits<D, FP8>;
  auto kernel = decode_split_kernel<D, FP8>;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes);
  if (e != cudaSuccess) return e;
  const dim3 grid(static_cast<unsigned>(a.max_splits), static_cast<unsigned>(a.batch * a.heads_kv),
                  static_cast<unsigned>(a.row_blocks));
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(a);
  return cudaGetLastError();
}

template <bool FP8>
cudaError_t dispatch_split(const DecodeArgs& a, cudaStream_t stream) {
  if (a.head_dim == 64) return launch_split<64, FP8>(a, stream);
  if (a.head_dim == 128) return launch_split<128, FP8>(a, stream);
  if (a.head_dim == 256) return launch_split<256, FP8>(a, stream);
  return cudaErrorInvalidValue;
}

}  // namespace decode_detail

// Plan and merge (decode_cuda_f16.cu): shared by both P~ V variants.
cudaError_t decode_plan_launch(const DecodeArgs& a, cudaStream_t stream);
cudaError_t decode_merge_launch(const DecodeArgs& a, cudaStream_t stream);

}  // namespace tersor::attention
