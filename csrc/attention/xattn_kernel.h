// The per-thread pieces of the XAttention scoring kernel (xattn_cuda.cu), host+device so the lane-by-lane CPU
// replay (xattn_cuda_emulate.cpp, testing extension) runs the same code: the CTA shape, the softmax-state
// combine, the strided score of a group of reduced query rows, the rank of a block mass and the greedy selection.
#pragma once

#include <cmath>
#include <cstdint>

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

}  // namespace tersor::attention
