// The per-thread pieces of the XAttention scoring kernel (xattn_cuda.cu), host+device so the lane-by-lane CPU
// replay (xattn_cuda_emulate.cpp, testing extension) runs the same code: the CTA shape, the softmax-state
// combine, the strided score of a group of reduced query rows, the rank of a block mass and the greedy selection.
#pragma once

#include <cmath>
#include <cstdint>

#include "attention/sage_cuda_layout.h"
#include "attention/sage_format.h"
#include "attention/xattn_format.h"
#include "common/macros.h"

// Unrolled in device code (the accumulators must stay in registers); a no-op for the host compiler.
#if defined(__CUDA_ARCH__)
#define TERSOR_XATTN_UNROLL _Pragma("unroll")
#else
#define TERSOR_XATTN_UNROLL
#endif

namespace tersor::attention {

constexpr int kXattnThreads = 256;
constexpr int kXattnWarps = kXattnThreads / 32;
constexpr int kXattnRowGroup = 16;  // reduced query rows scored together (one accumulator register each)

// Reduced query rows of a block, padded to whole row groups (the shared Q' buffer's rows; the padding is zeros).
TERSOR_HD constexpr int64_t xattn_rows_padded(int64_t block, int64_t stride) {
  return (block / stride + kXattnRowGroup - 1) / kXattnRowGroup * kXattnRowGroup;
}

// (m, l) <- the softmax state (max, sum of exp(x - max)) of the union of (m, l) and (m2, l2).
TERSOR_HD inline void xattn_combine(float& m, float& l, float m2, float l2) {
  const float mn = fmaxf(m, m2);
  if (mn == -INFINITY) return;
  l = (m == -INFINITY ? 0.f : l * expf(m - mn)) + (m2 == -INFINITY ? 0.f : l2 * expf(m2 - mn));
  m = mn;
}

// acc[r] = Q'[g0 + r] . K'[j] for the kRowGroup rows of a group: qs is the CTA's Q' ([rows_padded, S D] floats),
// load(row, d) reads key row `row` of the head as float (rows past len_k are zeros: skipped). fmaf in the
// kernel's order (s, then d, then r).
template <typename Load>
TERSOR_HD inline void xattn_score_group(const float* qs, int64_t stride, int64_t head_dim, int64_t len_k, int64_t g0,
                                        int64_t j, const Load& load, float (&acc)[kXattnRowGroup]) {
  const int64_t SD = stride * head_dim;
  TERSOR_XATTN_UNROLL
  for (int r = 0; r < kXattnRowGroup; ++r) acc[r] = 0.f;
  for (int64_t s = 0; s < stride; ++s) {
    const int64_t row = xattn_key_row(j, s, stride);
    if (row >= len_k) break;
    const float* qcol = qs + g0 * SD + s * head_dim;
    for (int64_t d = 0; d < head_dim; ++d) {
      const float kv = load(row, d);
      TERSOR_XATTN_UNROLL
      for (int r = 0; r < kXattnRowGroup; ++r) acc[r] = fmaf(qcol[r * SD + d], kv, acc[r]);
    }
  }
}

// Position of block j in the descending order of the masses (ties: lower index first).
TERSOR_HD inline int xattn_rank(const float* mass, int64_t n, int64_t j) {
  const float mj = mass[j];
  int rank = 0;
  for (int64_t k = 0; k < n; ++k) rank += (mass[k] > mj) || (mass[k] == mj && k < j);
  return rank;
}

// The selection of one query block from its masses and their order (xattn_cpu.cpp's select_blocks, in fp64 sums).
TERSOR_HD inline void xattn_select(const float* mass, const int* order, int64_t n, int64_t diag, bool causal,
                                   double threshold, uint8_t* keep) {
  double total = 0;
  for (int64_t j = 0; j < n; ++j) total += mass[j];
  for (int64_t j = 0; j < n; ++j) keep[j] = 0;
  keep[diag] = 1;
  if (causal) keep[0] = 1;
  double kept = 0;
  for (int64_t j = 0; j < n; ++j)
    if (keep[j]) kept += mass[j];
  const double required = threshold * total;
  for (int64_t t = 0; t < n; ++t) {
    const int j = order[t];
    if (keep[j]) continue;
    if (!(mass[j] > 0.f)) break;
    if (threshold < 1 && !(kept < required)) break;
    keep[j] = 1;
    kept += mass[j];
  }
}

// ---- qk = "int8": the reduced rows quantized to INT8, one symmetric scale per row (amax / 127, RNE: the
// attention kernels' int_quant_params / quantize_int), the scores from exact int32 dot products ----

// Reduced keys padded to whole 8-key n-tiles of mma.m16n8k32.
TERSOR_HD constexpr int64_t xattn_nk_pad(int64_t len_k, int64_t stride) { return ((len_k + stride - 1) / stride + 7) / 8 * 8; }
// Row of the quantized Q' buffer [B * Hq * q_blocks * rows_padded, S D] holding reduced query r of query block qb.
TERSOR_HD constexpr int64_t xattn_int8_q_row(int64_t bh, int64_t qb, int64_t r, int64_t q_blocks, int64_t rows_pad) {
  return (bh * q_blocks + qb) * rows_pad + r;
}
// Row of the quantized K' buffer [B * Hkv * nk_pad, S D] holding reduced key j.
TERSOR_HD constexpr int64_t xattn_int8_k_row(int64_t bkv, int64_t j, int64_t nk_pad) { return bkv * nk_pad + j; }
// The score of an exact int32 dot product: float(acc) * (q_scale * k_scale) * (scale / stride), in that order.
TERSOR_HD inline float xattn_int8_score(int32_t acc, float q_scale, float k_scale, float mul) {
  return static_cast<float>(acc) * (q_scale * k_scale) * mul;
}
// mma.m16n8k32 fragments (sage_cuda_layout.h's conventions): A register r of lane (g, t), m-tile mt, k-step kk,
// as a byte offset into the CTA's shared Q' codes (row stride row_bytes); B register j of lane (g, t) relative
// to the first K' code row of the n-tile (row stride sd bytes).
TERSOR_HD constexpr int64_t xattn_a_frag_byte(int mt, int g, int t, int kk, int r, int64_t row_bytes) {
  return (mt * 16 + frag_a_row(g, r)) * row_bytes + kk * 32 + frag_k_byte(t, r >> 1);
}
TERSOR_HD constexpr int64_t xattn_b_frag_byte(int g, int t, int kk, int j, int64_t sd) {
  return g * sd + kk * 32 + frag_k_byte(t, j);
}
// Shared Q' code rows are padded by 16 bytes (rows 4 banks apart: conflict-free A loads, as in the attention kernel).
TERSOR_HD constexpr int64_t xattn_int8_row_bytes(int64_t sd) { return sd + 16; }

}  // namespace tersor::attention
