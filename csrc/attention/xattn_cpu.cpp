// xattention_mask on the CPU: XAttention's block selection (docs/research/xattention.md), exact (fp64 scores,
// softmax and sums; one float32 rounding of the reported masses). Index rules: xattn_format.h.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <tuple>
#include <vector>

#include "attention/xattn_format.h"
#include "attention/xattn_glue.h"
#include "attention/xattn_kernel.h"

namespace tersor::attention {
namespace {

// Keeps, for one query block, the forced blocks and then the heaviest others (ties: lower index first) while the
// kept mass is below threshold * total; blocks without mass are never added by the threshold, and threshold 1
// keeps every block with mass (exactly, whatever the rounding of the running sum).
void select_blocks(const double* mass, int64_t n, int64_t diag, bool causal, double threshold, uint8_t* keep,
                   std::vector<int64_t>& order) {
  double total = 0;
  for (int64_t j = 0; j < n; ++j) total += mass[j];
  std::fill(keep, keep + n, 0);
  keep[diag] = 1;
  if (causal) keep[0] = 1;
  double kept = 0;
  for (int64_t j = 0; j < n; ++j)
    if (keep[j]) kept += mass[j];
  order.resize(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return mass[a] > mass[b]; });
  const double required = threshold * total;
  for (int64_t j : order) {
    if (keep[j]) continue;
    if (!(mass[j] > 0)) break;  // sorted: the rest carry nothing either
    if (threshold < 1 && !(kept < required)) break;
    keep[j] = 1;
    kept += mass[j];
  }
}

// qk = "int8": a reduced row (S D values, exact in fp32) replaced by its INT8 codes (as doubles: the dot products
// of codes are exact integers); returns the row's scale.
float quantize_row(double* x, int64_t n) {
  float amax = 0.f;
  for (int64_t e = 0; e < n; ++e) amax = std::max(amax, std::fabs(static_cast<float>(x[e])));
  const IntQuantParams p = int_quant_params(amax, 8);
  for (int64_t e = 0; e < n; ++e) x[e] = quantize_int(static_cast<float>(x[e]), p.inv_scale, 8);
  return p.scale;
}

std::tuple<Tensor, Tensor> xattention_mask_cpu(const Tensor& q, const Tensor& k, int64_t block_size, int64_t stride,
                                               double threshold, bool is_causal, double scale, std::string qk) {
  const XattnCall c = check_xattn(q, k, block_size, stride, threshold, is_causal, scale, qk);
  const Tensor qf = as_contiguous(as_dtype(q, ScalarType::Float));
  const Tensor kf = as_contiguous(as_dtype(k, ScalarType::Float));
  Tensor mask = empty({c.batch, c.heads_q, c.q_blocks, c.k_blocks}, ScalarType::Bool, qf.device());
  Tensor mass = empty({c.batch, c.heads_q, c.q_blocks, c.k_blocks}, ScalarType::Float, qf.device());
  if (c.batch * c.heads_q * c.q_blocks == 0) return {mask, mass};
  const int64_t S = c.stride, D = c.head_dim, SD = S * D;
  const int64_t nq = (c.len_q + S - 1) / S, nk = (c.len_k + S - 1) / S, per_block = c.block / S;
  const float* qp = qf.const_data_ptr<float>();
  const float* kp = kf.const_data_ptr<float>();
  // Strided keys: kr[bkv][j][s D + d] = k[j S + s][d] (zero past the sequence), fp64.
  std::vector<double> kr(c.batch * c.heads_kv * nk * SD, 0.0);
  tersor::parallel_for(0, c.batch * c.heads_kv, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t bkv = b0; bkv < b1; ++bkv)
      for (int64_t j = 0; j < nk; ++j)
        for (int64_t s = 0; s < S; ++s) {
          const int64_t row = xattn_key_row(j, s, S);
          if (row >= c.len_k) continue;
          const float* src = kp + (bkv * c.len_k + row) * D;
          double* dst = kr.data() + (bkv * nk + j) * SD + s * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = src[d];
        }
  });
  std::vector<float> k_scale(c.int8 ? c.batch * c.heads_kv * nk : 0);
  if (c.int8) {
    tersor::parallel_for(0, c.batch * c.heads_kv * nk, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) k_scale[r] = quantize_row(kr.data() + r * SD, SD);
    });
  }
  const float mul_f = static_cast<float>(c.scale) / static_cast<float>(S);  // the kernels' fp32 factor
  uint8_t* mp = static_cast<uint8_t*>(mask.mutable_data_ptr());
  float* wp = mass.mutable_data_ptr<float>();
  const int64_t group = c.heads_q / c.heads_kv;
  const double mul = c.scale / static_cast<double>(S);
  tersor::parallel_for(0, c.batch * c.heads_q * c.q_blocks, 1, [&](int64_t w0, int64_t w1) {
    std::vector<double> qrow(SD), scores(nk), block_mass(c.k_blocks);
    std::vector<int64_t> order;
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t bh = w / c.q_blocks, qb = w % c.q_blocks;
      const int64_t bkv = (bh / c.heads_q) * c.heads_kv + (bh % c.heads_q) / group;
      const double* kh = kr.data() + bkv * nk * SD;
      std::fill(block_mass.begin(), block_mass.end(), 0.0);
      const int64_t i0 = qb * per_block, i1 = std::min(nq, i0 + per_block);
      for (int64_t i = i0; i < i1; ++i) {
        // Reduced query i: rows reversed within the stride, concatenated (zero past the sequence).
        for (int64_t s = 0; s < S; ++s) {
          const int64_t row = xattn_query_row(i, s, S);
          double* dst = qrow.data() + s * D;
          if (row >= c.len_q) {
            std::fill(dst, dst + D, 0.0);
            continue;
          }
          const float* src = qp + (bh * c.len_q + row) * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = src[d];
        }
        const int64_t nv = xattn_visible_reduced_keys(i, S, c.len_q, c.len_k, c.causal);
        if (nv == 0) continue;  // no visible key: the row carries no mass
        const float q_scale = c.int8 ? quantize_row(qrow.data(), SD) : 0.f;
        double mx = -INFINITY;
        for (int64_t j = 0; j < nv; ++j) {
          const double* kj = kh + j * SD;
          double acc = 0;
          for (int64_t e = 0; e < SD; ++e) acc += qrow[e] * kj[e];
          scores[j] = c.int8 ? xattn_int8_score(static_cast<int32_t>(acc), q_scale, k_scale[bkv * nk + j], mul_f)
                             : acc * mul;
          mx = std::max(mx, scores[j]);
        }
        double sum = 0;
        for (int64_t j = 0; j < nv; ++j) sum += (scores[j] = std::exp(scores[j] - mx));
        for (int64_t j = 0; j < nv; ++j) block_mass[j / per_block] += scores[j] / sum;
      }
      const int64_t diag = xattn_diagonal_block(qb, c.block, c.len_q, c.len_k);
      select_blocks(block_mass.data(), c.k_blocks, diag, c.causal, c.threshold, mp + w * c.k_blocks, order);
      for (int64_t j = 0; j < c.k_blocks; ++j) wp[w * c.k_blocks + j] = static_cast<float>(block_mass[j]);
    }
  });
  return {mask, mass};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(tersor, CPU, m) { m.impl("xattention_mask", TORCH_BOX(&xattention_mask_cpu)); }

}  // namespace tersor::attention
