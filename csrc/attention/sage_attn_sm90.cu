// Quantized attention forward, sm90a (Hopper): INT8 wgmma for Q K^T, FP8 wgmma for P V, bulk-copy (TMA
// engine, cp.async.bulk without a tensor map) loads, warp specialization. Same numerics contract and the
// same prologue outputs as the sm8x kernel (sage_quant_cuda.cu); docs/research/sage_attention.md, "sm90a
// kernel", has the argument why the fragment groups carry over.
//   relayout: the prologue's row-major K and permuted V^T -> tile-native blocks (sage_sm90_layout.h), so
//             one cp.async.bulk per operand and tile lands it in the wgmma canonical layout.
//   attention: CTA = 3 warpgroups. WG 0 (setmaxnreg.dec) has one thread stream K/V tiles of 128 tokens
//             into kStages shared stages (mbarrier full/empty ring). WG 1/2 (setmaxnreg.inc) own 64 query
//             rows each: Q as wgmma A registers (loaded once), per 64-key half: S = wgmma s8 (exact s32) *
//             (q_scale k_scale), mask, online softmax (ex2.approx, as sm8x), P~ e4m3 packed from the
//             accumulator into A registers, O = O alpha + (P~ V~ from zero, wgmma e4m3), then the sm8x epilogue.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "attention/sage_cuda.h"
#include "attention/sage_cuda_layout.h"
#include "attention/sage_format.h"
#include "attention/sage_sm90_layout.h"
#include "attention/sage_sm90_traits.h"
#include "common/mma_int8_fp8.cuh"
#include "common/smem_load.cuh"
#include "common/tma_bulk.cuh"
#include "common/wgmma.cuh"
#include "common/wgmma_int8_fp8.cuh"

// wgmma, setmaxnreg and the bulk copies exist on sm_90a only: CMakeLists.txt compiles this TU for 90a alone.
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "sage_attn_sm90.cu is sm_90a code: compile it for 90a only"
#endif

namespace tersor::attention {
namespace {

// grid (Lk_pad / 128, B * Hkv), block 256: 16-byte chunks of the row-major K rows and V^T rows, each landing
// as 16 contiguous bytes of a tile-native block (a core-matrix row), so loads and stores are both 16 bytes.
template <int D>
__global__ void __launch_bounds__(256) sage_sm90_relayout_kernel(const SageAttnArgs a, int8_t* k_tiles,
                                                                 uint8_t* v_tiles) {
  const int64_t tile = blockIdx.x, bkv = blockIdx.y, len_k_pad = a.dims.len_k_pad;
  const int64_t base = sm90_tile_base(bkv, len_k_pad, tile, D);
  constexpr int kChunks = 128 * D / 16;  // per operand and tile
  const uint8_t* v_src = static_cast<const uint8_t*>(a.v_t);
  for (int i = threadIdx.x; i < kChunks; i += blockDim.x) {
    const int n = sm90_relayout_k_token<D>(i), c = sm90_relayout_k_byte<D>(i);
    const uint4 kv = *reinterpret_cast<const uint4*>(a.k_int + (bkv * len_k_pad + tile * 128 + n) * D + c);
    *reinterpret_cast<uint4*>(k_tiles + base + sm90_k_tile_offset<D>(n, c)) = kv;
    const int ch = sm90_relayout_v_channel(i), p = sm90_relayout_v_position(i);
    const uint4 vv = *reinterpret_cast<const uint4*>(v_src + (bkv * D + ch) * len_k_pad + tile * 128 + p);
    *reinterpret_cast<uint4*>(v_tiles + base + sm90_v_tile_offset(ch, p)) = vv;
  }
}

template <typename T16>
__device__ __forceinline__ uint32_t pack_out(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack_out<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack_out<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

template <int D, typename T16>
__global__ void __launch_bounds__(SageAttnSm90KernelTraits<D>::kThreads, 1)
    sage_attn_sm90_kernel(const SageAttnArgs a, const int8_t* __restrict__ k_tiles,
                          const uint8_t* __restrict__ v_tiles) {
#if defined(__CUDA_ARCH__)  // the FP8 conversions exist for the device pass only (and this TU is sm90a-only)
  using Tr = SageAttnSm90KernelTraits<D>;
  extern __shared__ __align__(128) uint8_t smem[];
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + Tr::kStages * Tr::kStageBytes);
  uint64_t* empty = full + Tr::kStages;

  const SageDims& d = a.dims;
  const int64_t bh = blockIdx.y, b = bh / d.heads_q, h = bh % d.heads_q;
  const int64_t bkv = b * d.heads_kv + h / (d.heads_q / d.heads_kv);
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * Tr::kCtaQ;
  const int64_t last_row = (r0 + Tr::kCtaQ - 1 < d.len_q - 1) ? r0 + Tr::kCtaQ - 1 : d.len_q - 1;
  // The key tiles any row of this CTA sees (causal, window): [span.first, n_tiles).
  const TileSpan span = visible_tiles(a.mask, r0, last_row, d.len_q, d.len_k, Tr::kCtaK);
  const int n_tiles = span.end;
  const int wg = threadIdx.x / 128;
  // Block mask row of this CTA (kCtaQ == kSparseBlockQ, kCtaK == kSparseBlockK): producer and consumers walk
  // the same live tiles, the stage ring advancing per live tile; a masked block is never copied or multiplied.
  const uint8_t* mask_row =
      a.block_mask == nullptr
          ? nullptr
          : a.block_mask + block_mask_row_offset(b, h, blockIdx.x, a.mask_heads, a.mask_q_blocks, a.mask_k_blocks);

  if (threadIdx.x == 0) {
#pragma unroll
    for (int s = 0; s < Tr::kStages; ++s) {
      mbarrier_init(&full[s], 1);                               // the producer's arrive.expect_tx
      mbarrier_init(&empty[s], Tr::kConsumerWarpgroups * 4);    // lane 0 of every consumer warp
    }
    fence_mbarrier_init();
  }
  __syncthreads();

  if (wg == 0) {
    // ---- producer ----
    setmaxnreg_dec<Tr::kProducerRegs>();
    if (threadIdx.x == 0) {
      int it = 0;
      for (int tile = next_live_tile(mask_row, span.first, n_tiles, Tr::kCtaK); tile < n_tiles;
           tile = next_live_tile(mask_row, tile + 1, n_tiles, Tr::kCtaK), ++it) {
        const int s = it % Tr::kStages;
        const uint32_t round = static_cast<uint32_t>(it / Tr::kStages);
        if (round > 0) mbarrier_wait(&empty[s], (round - 1) & 1u);  // consumers drained this stage's last use
        uint8_t* ks = smem + s * Tr::kStageBytes;
        const int64_t base = sm90_tile_base(bkv, d.len_k_pad, tile, D);
        mbarrier_arrive_expect_tx(&full[s], Tr::kStageBytes);
        bulk_copy_g2s(ks, k_tiles + base, Tr::kKTileBytes, &full[s]);
        bulk_copy_g2s(ks + Tr::kKTileBytes, v_tiles + base, Tr::kVTileBytes, &full[s]);
      }
    }
  } else {
    // ---- consumers ----
    setmaxnreg_inc<Tr::kConsumerRegs>();
    const int tid = threadIdx.x % 128, w = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    const int64_t wg_row0 = r0 + (wg - 1) * Tr::kRowsPerWarpgroup;
    const int64_t wg_last = (wg_row0 + Tr::kRowsPerWarpgroup - 1 < d.len_q - 1) ? wg_row0 + Tr::kRowsPerWarpgroup - 1
                                                                                : d.len_q - 1;
    // Keys any row of this warpgroup sees, [wg_kv_begin, wg_kv_end): halves outside are skipped (all -inf
    // there, a no-op in the twin).
    const int64_t wg_kv_begin = wg_row0 >= d.len_q ? 0 : visible_keys(a.mask, wg_row0, d.len_q, d.len_k).lo;
    const int64_t wg_kv_end = wg_row0 >= d.len_q ? 0 : visible_keys(a.mask, wg_last, d.len_q, d.len_k).hi;

    uint32_t qf[Tr::kQKSteps][4];
    const int8_t* q_g = a.q_int + (bh * d.len_q_pad + wg_row0) * D;
#pragma unroll
    for (int kk = 0; kk < Tr::kQKSteps; ++kk)
#pragma unroll
      for (int r = 0; r < 4; ++r) qf[kk][r] = *reinterpret_cast<const uint32_t*>(q_g + sm90_q_frag_offset<D>(w, g, t, kk, r));
    const float q_sc = a.q_scale[sm90_q_scale_index(bh, d.len_q_pad, wg_row0, w, g)];
    const float* k_sc = a.k_scale + k_scale_index(bkv, d.len_k_pad, 0, 0);
    // Key padding mask row of this batch entry (nullptr: none): a padded key's score is -inf.
    const uint8_t* key_pad = a.key_padding == nullptr ? nullptr : a.key_padding + b * d.len_k;
    int key_lo[2], key_hi[2];  // [lo, hi): keys of rows 16 w + g (+ 8) of this warpgroup
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const KeySpan ks = visible_keys(a.mask, wg_row0 + wg_acc_row(w, g, 2 * hh), d.len_q, d.len_k);
      key_lo[hh] = static_cast<int>(ks.lo);
      key_hi[hh] = static_cast<int>(ks.hi);
    }

    float o[Tr::kPVChunks][Tr::kAccRegs];
#pragma unroll
    for (int cb = 0; cb < Tr::kPVChunks; ++cb)
#pragma unroll
      for (int i = 0; i < Tr::kAccRegs; ++i) o[cb][i] = 0.f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

    int it = 0;
    for (int tile = next_live_tile(mask_row, span.first, n_tiles, Tr::kCtaK); tile < n_tiles;
         tile = next_live_tile(mask_row, tile + 1, n_tiles, Tr::kCtaK), ++it) {
      const int s = it % Tr::kStages;
      mbarrier_wait(&full[s], static_cast<uint32_t>(it / Tr::kStages) & 1u);
      const uint32_t k_addr = smem_u32(smem + s * Tr::kStageBytes);
      const uint32_t v_addr = k_addr + Tr::kKTileBytes;
#pragma unroll
      for (int half = 0; half < Tr::kHalves; ++half) {
        const int key0 = tile * Tr::kCtaK + half * Tr::kHalfK;
        if (key0 >= wg_kv_end) break;  // uniform over the warpgroup
        if (key0 + Tr::kHalfK <= wg_kv_begin) continue;

        // ---- S = Q K^T (exact s32) ----
        int32_t acc[Tr::kAccRegs];
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < Tr::kQKSteps; ++kk)
          wgmma_m64n64k32_s32_s8_rs(
              acc, qf[kk], sm90_k_desc<D>(k_addr, half, kk), kk);
        wgmma_commit_group();
        wgmma_wait_group<0>();
#pragma unroll
        for (int i = 0; i < Tr::kAccRegs; ++i) wgmma_fence_operand(acc[i]);

        const float dq = q_sc * k_sc[sm90_k_scale_in_slice(tile, half, t)];
        float sc[Tr::kAccRegs];
#pragma unroll
        for (int i = 0; i < Tr::kAccRegs; ++i) {
          const int key = key0 + wg_acc_col(t, i), hh = (i >> 1) & 1;
          // (the padding byte is read only for a key inside [lo, hi), so never past Lk)
          const bool vis = key < key_hi[hh] && key >= key_lo[hh] && (key_pad == nullptr || __ldg(key_pad + key) != 0);
          sc[i] = vis ? static_cast<float>(acc[i]) * dq : -INFINITY;
        }

        // ---- online softmax over this 64-key half (a row lives in the 4 lanes of a quad) ----
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          float mx = -INFINITY;
#pragma unroll
          for (int i = 0; i < Tr::kAccRegs; ++i)
            if (((i >> 1) & 1) == hh) mx = fmaxf(mx, sc[i]);
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
          const float m_new = fmaxf(m[hh], mx);
          const bool none = m_new == -INFINITY;
          const float alpha = none ? 1.f : ex2_approx(m[hh] - m_new);
          const float m_shift = none ? 0.f : m_new - kFp8POffset;
          m[hh] = m_new;
          l[hh] *= alpha;
#pragma unroll
          for (int cb = 0; cb < Tr::kPVChunks; ++cb)
#pragma unroll
            for (int i = 0; i < Tr::kAccRegs; ++i)
              if (((i >> 1) & 1) == hh) o[cb][i] *= alpha;
#pragma unroll
          for (int i = 0; i < Tr::kAccRegs; ++i)
            if (((i >> 1) & 1) == hh) sc[i] = ex2_approx(sc[i] - m_shift);
        }

        // ---- P~ (e4m3) into the A registers of P V; the row sum adds the rounded values ----
        uint32_t pa[Tr::kPVSteps][4];
#pragma unroll
        for (int kk = 0; kk < Tr::kPVSteps; ++kk)
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            const uint16_t x0 = cvt_e4m3x2(sc[sm90_p_acc_reg(kk, r, 0)], sc[sm90_p_acc_reg(kk, r, 1)]);
            const uint16_t x1 = cvt_e4m3x2(sc[sm90_p_acc_reg(kk, r, 2)], sc[sm90_p_acc_reg(kk, r, 3)]);
            pa[kk][r] = static_cast<uint32_t>(x0) | (static_cast<uint32_t>(x1) << 16);
            const uint32_t h0 = cvt_f16x2_from_e4m3x2(x0), h1 = cvt_f16x2_from_e4m3x2(x1);
            const __half2 f0 = *reinterpret_cast<const __half2*>(&h0), f1 = *reinterpret_cast<const __half2*>(&h1);
            l[r & 1] += (__low2float(f0) + __high2float(f0)) + (__low2float(f1) + __high2float(f1));
          }

        // ---- O += P~ V~ (each 64-channel chunk from zero, then added: two-level accumulation) ----
#pragma unroll
        for (int cb = 0; cb < Tr::kPVChunks; ++cb) {
          float part[Tr::kAccRegs];
          wgmma_fence();
#pragma unroll
          for (int kk = 0; kk < Tr::kPVSteps; ++kk)
            wgmma_m64n64k32_f32_e4m3_rs(
                part, pa[kk], sm90_v_desc(v_addr, cb, half, kk), kk);
          wgmma_commit_group();
          wgmma_wait_group<0>();
#pragma unroll
          for (int i = 0; i < Tr::kAccRegs; ++i) {
            wgmma_fence_operand(part[i]);
            o[cb][i] += part[i];
          }
        }
      }
      // Every wgmma of this warp that read stage s has retired (wait_group 0): hand the stage back.
      __syncwarp();
      if (lane == 0) mbarrier_arrive(&empty[s]);
    }

    // ---- epilogue (as sm8x) ----
    T16* out = static_cast<T16*>(a.out);
    const float* v_sc = a.v_scale + bkv * D;
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      float lsum = l[hh];
      lsum += __shfl_xor_sync(0xffffffffu, lsum, 1);
      lsum += __shfl_xor_sync(0xffffffffu, lsum, 2);
      const int64_t row = wg_row0 + wg_acc_row(w, g, 2 * hh);
      if (row >= d.len_q) continue;
      const bool dead = !(lsum > 0.f);
      const float inv_l = dead ? 0.f : 1.f / lsum;
      T16* orow = out + (bh * d.len_q + row) * D;
#pragma unroll
      for (int cb = 0; cb < Tr::kPVChunks; ++cb)
#pragma unroll
        for (int i = 2 * hh; i < Tr::kAccRegs; i += 4) {
          const int c = cb * 64 + wg_acc_col(t, i);
          float v0 = o[cb][i] * v_sc[c] * inv_l, v1 = o[cb][i + 1] * v_sc[c + 1] * inv_l;
          if (dead) v0 = v1 = 0.f;
          *reinterpret_cast<uint32_t*>(orow + c) = pack_out<T16>(v0, v1);
        }
      if (t == 0)
        a.lse[bh * d.len_q + row] =
            dead ? -INFINITY
                 : (m[hh] - kFp8POffset + log2f(lsum)) * 0.6931471805599453f + a.lse_corr[bh * d.len_q + row];
    }
  }
#endif
}

template <int D, typename T16>
cudaError_t launch(const SageAttnArgs& a, int8_t* k_tiles, uint8_t* v_tiles, cudaStream_t stream) {
  using Tr = SageAttnSm90KernelTraits<D>;
  const dim3 relayout_grid(static_cast<unsigned>(a.dims.len_k_pad / Tr::kCtaK),
                           static_cast<unsigned>(a.dims.batch * a.dims.heads_kv));
  sage_sm90_relayout_kernel<D><<<relayout_grid, 256, 0, stream>>>(a, k_tiles, v_tiles);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  auto kernel = sage_attn_sm90_kernel<D, T16>;
  e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes);
  if (e != cudaSuccess) return e;
  const dim3 grid(static_cast<unsigned>(a.dims.len_q_pad / Tr::kCtaQ), static_cast<unsigned>(a.dims.batch * a.dims.heads_q));
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(a, k_tiles, v_tiles);
  return cudaGetLastError();
}

template <typename T16>
cudaError_t dispatch(const SageAttnArgs& a, int8_t* k_tiles, uint8_t* v_tiles, cudaStream_t stream) {
  if (a.dims.head_dim == 64) return launch<64, T16>(a, k_tiles, v_tiles, stream);
  if (a.dims.head_dim == 128) return launch<128, T16>(a, k_tiles, v_tiles, stream);
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t sage_attention_sm90(const SageAttnArgs& a, int8_t* k_tiles, uint8_t* v_tiles, cudaStream_t stream) {
  if (!a.pv_fp8 || a.dims.len_k_pad % 128 != 0 || a.dims.len_q_pad % 128 != 0) return cudaErrorInvalidValue;
  return a.dtype == DType::kBFloat16 ? dispatch<__nv_bfloat16>(a, k_tiles, v_tiles, stream)
                                     : dispatch<__half>(a, k_tiles, v_tiles, stream);
}

}  // namespace tersor::attention
