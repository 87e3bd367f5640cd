// CPU twin of the quantized attention kernels (SageAttention2 numerics) and its exact fp64 mode.
//
// The quantized mode reproduces, step by step, what the CUDA kernels compute (sage_format.h has the
// shared pieces): Q (times scale*log2e) and K quantized per fragment group, K smoothed by its token mean,
// optionally Q smoothed per 32-row block (its q_mean . K^T term added back in fp32), online softmax over
// the kernel's 64-key tiles in base 2 with the log2(448) offset, P~ rounded to e4m3 (or to V's 16-bit
// dtype), each tile's P~ V accumulated in a fresh fp32 buffer and added into the fp32 output, V's
// per-channel fp8 scale and 1/l applied in the epilogue. Where the GPU differs it is documented in
// docs/research/sage_attention.md (ex2.approx vs exp2f, FP8-MMA accumulator width, summation order).
//
// qk_bits == 0 with pv == "fp32" is the exact mode: everything in fp64, rounded once to the output dtype.
//
// Also here: _sage_route, the CUDA routing table (sage_route.h) of this build as an op (tensor-free, so it
// registers for CompositeExplicitAutograd and answers on any machine).
#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "attention/sage_format.h"
#include "attention/sage_glue.h"

namespace tersor::attention {
namespace {

using Traits = SageTraitsSm8x;

// Rounds to the 16-bit dtype of the inputs (the sm80 P.V operand type).
inline float round_to(float x, ScalarType t) {
  return t == ScalarType::BFloat16 ? static_cast<float>(BFloat16(x)) : static_cast<float>(Half(x));
}

// Per (batch, kv head) data derived from K and V once, shared by every query head of the group (GQA).
struct KVPrepared {
  std::vector<float> k_mean;    // [D] (zeros without smoothing)
  std::vector<float> k_smooth;  // [Lk, D] fp32 K - k_mean
  std::vector<int8_t> k_int;    // [Lk, D] codes (quantized modes)
  std::vector<float> k_scale;   // [k_groups]
  std::vector<float> v_val;     // [Lk, D] the P.V operand: e4m3 codes decoded, V in its dtype, or V
  std::vector<float> v_scale;   // [D] epilogue scale (1 unless fp8)
  // Score operand, transposed (fp32 [D, Lk]): the K codes as floats (or the smoothed K for fp32 scores).
  // INT8/INT4 dot products over D <= 128 stay below 2^24, so fp32 sums compute them exactly in any order.
  std::vector<float> k_op_t;
};

void prepare_kv(const SageCall& c, const float* k, const float* v, KVPrepared& p) {
  const int64_t L = c.len_k, D = c.head_dim;
  p.k_mean.assign(D, 0.f);
  if (c.smooth_k)  // fp64 in the kernels' chunk order, rounded once (sage_format.h chunked_channel_mean)
    for (int64_t d = 0; d < D; ++d) p.k_mean[d] = chunked_channel_mean(k + d, L, D);
  p.k_smooth.resize(L * D);
  for (int64_t j = 0; j < L; ++j)
    for (int64_t d = 0; d < D; ++d) p.k_smooth[j * D + d] = k[j * D + d] - p.k_mean[d];
  if (c.qk_bits > 0) {
    const int64_t G = k_groups(L);
    std::vector<float> amax(G, 0.f);
    for (int64_t j = 0; j < L; ++j) {
      float& a = amax[k_group(j)];
      for (int64_t d = 0; d < D; ++d) a = std::max(a, std::fabs(p.k_smooth[j * D + d]));
    }
    p.k_scale.resize(G);
    std::vector<float> inv(G);
    for (int64_t g = 0; g < G; ++g) {
      const IntQuantParams qp = int_quant_params(amax[g], c.qk_bits);
      p.k_scale[g] = qp.scale;
      inv[g] = qp.inv_scale;
    }
    p.k_int.resize(L * D);
    for (int64_t j = 0; j < L; ++j)
      for (int64_t d = 0; d < D; ++d)
        p.k_int[j * D + d] = static_cast<int8_t>(quantize_int(p.k_smooth[j * D + d], inv[k_group(j)], c.qk_bits));
  }
  p.v_val.assign(v, v + L * D);
  p.v_scale.assign(D, 1.f);
  if (c.pv == PVMode::kFp8) {
    for (int64_t d = 0; d < D; ++d) {
      float amax = 0.f;
      for (int64_t j = 0; j < L; ++j) amax = std::max(amax, std::fabs(v[j * D + d]));
      const IntQuantParams qp = fp8_channel_params(amax);
      p.v_scale[d] = qp.scale;
      for (int64_t j = 0; j < L; ++j) p.v_val[j * D + d] = e4m3_to_float(float_to_e4m3(v[j * D + d] * qp.inv_scale));
    }
  }
  p.k_op_t.resize(L * D);
  for (int64_t j = 0; j < L; ++j)
    for (int64_t d = 0; d < D; ++d)
      p.k_op_t[d * L + j] = c.qk_bits > 0 ? static_cast<float>(p.k_int[j * D + d]) : p.k_smooth[j * D + d];
}

// The masks of one CTA's rows (each nullptr when absent). block_row: the block mask's row of this query block
// (tiles of masked key blocks are skipped, as the kernels skip them); key_pad: the key padding mask's row of
// this batch entry (a padded key's score is -inf); attn_bool / attn_bias: the attention mask's rows r0.. of
// this (batch, head), row stride Lk: false hides the key, a float is added to the score (natural-log units;
// CPU only: no kernel takes a general mask).
struct TwinMasks {
  const uint8_t* block_row = nullptr;
  const uint8_t* key_pad = nullptr;
  const uint8_t* attn_bool = nullptr;
  const float* attn_bias = nullptr;
  // key j is hidden from row i (of the CTA) by the padding or the boolean attention mask
  bool hidden(int64_t i, int64_t j, int64_t len_k) const {
    return (key_pad != nullptr && !key_pad[j]) || (attn_bool != nullptr && !attn_bool[i * len_k + j]);
  }
  double bias(int64_t i, int64_t j, int64_t len_k) const {
    return attn_bias != nullptr ? static_cast<double>(attn_bias[i * len_k + j]) : 0.0;
  }
};

// The quantized pipeline for query rows [r0, r1) of one (batch, head): the kernel's CTA (128 rows).
void quantized_rows(const SageCall& c, ScalarType in_t, const float* q, const KVPrepared& kv, int64_t r0,
                    int64_t r1, const TwinMasks& mk, float* out, float* lse) {
  const uint8_t* mask_row = mk.block_row;
  const int64_t D = c.head_dim, Lk = c.len_k;
  const int64_t rows = r1 - r0;
  const float qk_mul = static_cast<float>(c.scale) * kLog2e;  // fp32, folded into Q before quantization
  // Q scaled (and smoothed) in fp32.
  std::vector<float> qs(rows * D);
  for (int64_t i = 0; i < rows * D; ++i) qs[i] = q[r0 * D + i] * qk_mul;
  // Q smoothing: per 32-row block mean, and its dot product with every (smoothed, unquantized) key.
  const int64_t n_blocks = (rows + Traits::kWarpQ - 1) / Traits::kWarpQ;  // r0 is a multiple of 128
  std::vector<float> q_bias;  // [n_blocks, Lk]: q_mean . k_j, added to the dequantized scores
  if (c.smooth_q) {
    q_bias.assign(n_blocks * Lk, 0.f);
    std::vector<float> mean(D);
    for (int64_t b = 0; b < n_blocks; ++b) {
      const int64_t i0 = b * Traits::kWarpQ, i1 = std::min(rows, i0 + Traits::kWarpQ);
      for (int64_t d = 0; d < D; ++d) {
        double s = 0;
        for (int64_t i = i0; i < i1; ++i) s += qs[i * D + d];
        mean[d] = static_cast<float>(s / static_cast<double>(i1 - i0));
      }
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t d = 0; d < D; ++d) qs[i * D + d] -= mean[d];
      for (int64_t j = 0; j < Lk; ++j) {
        float s = 0.f;
        for (int64_t d = 0; d < D; ++d) s += mean[d] * kv.k_smooth[j * D + d];
        q_bias[b * Lk + j] = s;
      }
    }
  }
  // Q quantization: group ids are those of the sequence rows (r0 is CTA aligned, so local = global mod 128).
  std::vector<int8_t> q_int;
  std::vector<float> q_scale;
  if (c.qk_bits > 0) {
    const int64_t G = q_groups(rows);
    std::vector<float> amax(G, 0.f);
    for (int64_t i = 0; i < rows; ++i) {
      float& a = amax[q_group(i)];
      for (int64_t d = 0; d < D; ++d) a = std::max(a, std::fabs(qs[i * D + d]));
    }
    std::vector<float> inv(G);
    q_scale.resize(G);
    for (int64_t g = 0; g < G; ++g) {
      const IntQuantParams qp = int_quant_params(amax[g], c.qk_bits);
      q_scale[g] = qp.scale;
      inv[g] = qp.inv_scale;
    }
    q_int.resize(rows * D);
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t d = 0; d < D; ++d)
        q_int[i * D + d] = static_cast<int8_t>(quantize_int(qs[i * D + d], inv[q_group(i)], c.qk_bits));
  }

  const float p_offset = c.pv == PVMode::kFp8 ? kFp8POffset : 0.f;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  // Q operand of the scores: codes as floats (exact products and sums, see KVPrepared) or fp32 Q.
  std::vector<float> q_op(rows * D);
  for (int64_t i = 0; i < rows * D; ++i) q_op[i] = c.qk_bits > 0 ? static_cast<float>(q_int[i]) : qs[i];
  std::vector<KeySpan> visible(rows);
  for (int64_t i = 0; i < rows; ++i) visible[i] = visible_keys(c.mask, r0 + i, c.len_q, Lk);
  std::vector<float> m(rows, neg_inf), l(rows, 0.f), alpha(rows);
  std::vector<float> acc(rows * D, 0.f);
  std::vector<float> s_tile(rows * Traits::kCtaK), p_tile(rows * Traits::kCtaK), pv_tile(rows * D);
  // Keys in the kernel's 64-token tiles, over the CTA's span of visible keys (visible_tiles); a row with no
  // visible key in a tile skips it (m, l, acc unchanged), and so does every row for a tile of a masked key
  // block (the kernels never load it).
  const TileSpan span = visible_tiles(c.mask, r0, r1 - 1, c.len_q, Lk, Traits::kCtaK);
  const int64_t span_end = std::min<int64_t>(Lk, static_cast<int64_t>(span.end) * Traits::kCtaK);
  for (int tile = next_live_tile(mask_row, span.first, span.end, Traits::kCtaK); tile < span.end;
       tile = next_live_tile(mask_row, tile + 1, span.end, Traits::kCtaK)) {
    const int64_t t0 = static_cast<int64_t>(tile) * Traits::kCtaK;
    const int64_t n = std::min<int64_t>(Traits::kCtaK, span_end - t0);
    // Scores of the tile: rank-1 updates with contiguous inner loops over keys (they vectorize).
    std::fill(s_tile.begin(), s_tile.begin() + rows * n, 0.f);
    for (int64_t i = 0; i < rows; ++i) {
      float* srow = s_tile.data() + i * n;
      for (int64_t d = 0; d < D; ++d) {
        const float a = q_op[i * D + d];
        const float* kt = kv.k_op_t.data() + d * Lk + t0;
        for (int64_t jj = 0; jj < n; ++jj) srow[jj] += a * kt[jj];
      }
    }
    const float* st = s_tile.data();
    float* pt = p_tile.data();
    for (int64_t i = 0; i < rows; ++i) {
      float* p_row = pt + i * n;
      // This row's visible keys in the tile: [j0, nn).
      const int64_t j0 = std::max<int64_t>(0, visible[i].lo - t0);
      const int64_t nn = std::min<int64_t>(n, visible[i].hi - t0);
      if (nn <= j0) {
        std::fill(p_row, p_row + n, 0.f);
        alpha[i] = 1.f;
        continue;
      }
      float tile_max = neg_inf;
      for (int64_t jj = j0; jj < nn; ++jj) {
        const int64_t j = t0 + jj;
        if (mk.hidden(i, j, Lk)) {
          p_row[jj] = neg_inf;  // exp2 gives 0 below
          continue;
        }
        float sj = st[i * n + jj];
        if (c.qk_bits > 0) sj *= q_scale[q_group(i)] * kv.k_scale[k_group(j)];
        if (c.smooth_q) sj += q_bias[q_smooth_block(i) * Lk + j];
        // the scores are in log2 units (Q was scaled by scale * log2e): an additive mask in natural-log units too
        if (mk.attn_bias != nullptr) sj += mk.attn_bias[i * Lk + j] * kLog2e;
        p_row[jj] = sj;
        tile_max = std::max(tile_max, sj);
      }
      const float m_new = std::max(m[i], tile_max);
      if (m_new == neg_inf) {  // only padded keys so far: nothing changes (the kernels' `none` case)
        std::fill(p_row, p_row + n, 0.f);
        alpha[i] = 1.f;
        continue;
      }
      alpha[i] = std::exp2(m[i] - m_new);  // 0 on the row's first tile (m = -inf)
      const float m_shift = m_new - p_offset;
      float tile_sum = 0.f;
      std::fill(p_row, p_row + j0, 0.f);
      for (int64_t jj = j0; jj < nn; ++jj) {
        float p = std::exp2(p_row[jj] - m_shift);
        if (c.pv == PVMode::kFp8)
          p = e4m3_to_float(float_to_e4m3(p));
        else if (c.pv == PVMode::kFp16)
          p = round_to(p, in_t);
        p_row[jj] = p;
        tile_sum += p;
      }
      std::fill(p_row + nn, p_row + n, 0.f);
      l[i] = l[i] * alpha[i] + tile_sum;
      m[i] = m_new;
    }
    // Each tile's P V in a fresh fp32 buffer, then added into the fp32 accumulator (two-level).
    std::fill(pv_tile.begin(), pv_tile.end(), 0.f);
    for (int64_t i = 0; i < rows; ++i) {
      float* prow = pv_tile.data() + i * D;
      for (int64_t jj = 0; jj < n; ++jj) {
        const float p = pt[i * n + jj];
        if (p == 0.f) continue;
        const float* vr = kv.v_val.data() + (t0 + jj) * D;
        for (int64_t d = 0; d < D; ++d) prow[d] += p * vr[d];
      }
    }
    const float* pv = pv_tile.data();
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t d = 0; d < D; ++d) acc[i * D + d] = acc[i * D + d] * alpha[i] + pv[i * D + d];
  }
  for (int64_t i = 0; i < rows; ++i) {
    float* o = out + i * D;
    if (visible[i].hi <= visible[i].lo || l[i] == 0.f) {  // no visible key, or all of them in masked blocks
      for (int64_t d = 0; d < D; ++d) o[d] = 0.f;
      lse[i] = neg_inf;
      continue;
    }
    const float inv_l = 1.f / l[i];
    for (int64_t d = 0; d < D; ++d) o[d] = acc[i * D + d] * kv.v_scale[d] * inv_l;
    // log(sum_j e^{scale q.k_j}) = ln2 * (m - offset + log2 l) for the smoothed K; + scale q.k_mean.
    float corr = 0.f;
    if (c.smooth_k) {
      for (int64_t d = 0; d < D; ++d) corr += q[(r0 + i) * D + d] * kv.k_mean[d];
      corr *= static_cast<float>(c.scale);
    }
    lse[i] = (m[i] - p_offset + std::log2(l[i])) * 0.6931471805599453f + corr;
  }
}

// Exact mode: fp64 throughout (smoothing applied too, exactly, so the LSE correction is exercised).
void exact_rows(const SageCall& c, const float* q, const float* k, const float* v, int64_t r0, int64_t r1,
                const TwinMasks& mk, float* out, float* lse) {
  const uint8_t* mask_row = mk.block_row;
  const int64_t D = c.head_dim, Lk = c.len_k, rows = r1 - r0;
  std::vector<double> k_mean(D, 0.0);
  if (c.smooth_k) {
    for (int64_t j = 0; j < Lk; ++j)
      for (int64_t d = 0; d < D; ++d) k_mean[d] += k[j * D + d];
    for (int64_t d = 0; d < D; ++d) k_mean[d] /= static_cast<double>(Lk);
  }
  // Scores: contiguous inner loops over keys (K smoothed and transposed), fp64.
  std::vector<double> kt(D * Lk), sp(rows * Lk, 0.0);
  for (int64_t j = 0; j < Lk; ++j)
    for (int64_t d = 0; d < D; ++d) kt[d * Lk + j] = k[j * D + d] - k_mean[d];
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t d = 0; d < D; ++d) {
      const double a = q[(r0 + i) * D + d];
      double* row = sp.data() + i * Lk;
      const double* kr = kt.data() + d * Lk;
      for (int64_t j = 0; j < Lk; ++j) row[j] += a * kr[j];
    }
  std::vector<double> l(rows, 0.0), m(rows, -std::numeric_limits<double>::infinity());
  std::vector<KeySpan> visible(rows);
  std::vector<char> kept(Lk, 1);  // key j's block is kept by the block mask
  if (mask_row != nullptr)
    for (int64_t j = 0; j < Lk; ++j) kept[j] = mask_row[j / kSparseBlockK] != 0;
  const double neg_inf = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < rows; ++i) {
    visible[i] = visible_keys(c.mask, r0 + i, c.len_q, Lk);
    const int64_t lo = visible[i].lo, hi = visible[i].hi;
    double* row = sp.data() + i * Lk;
    // row[j] becomes the scaled, masked score (-inf for a key the row does not see), then its exp
    for (int64_t j = 0; j < Lk; ++j) {
      row[j] = j >= lo && j < hi && kept[j] && !mk.hidden(i, j, Lk) ? row[j] * c.scale + mk.bias(i, j, Lk) : neg_inf;
      m[i] = std::max(m[i], row[j]);
    }
    for (int64_t j = 0; j < Lk; ++j) {
      row[j] = row[j] == neg_inf ? 0.0 : std::exp(row[j] - m[i]);
      l[i] += row[j];
    }
    // no visible key, or only -inf ones (NaN inputs still propagate)
    if (l[i] == 0.0) visible[i].hi = lo;
  }
  std::vector<double> op(rows * D, 0.0);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = visible[i].lo; j < visible[i].hi; ++j) {
      if (sp[i * Lk + j] == 0.0) continue;  // a hidden key is never read (as the kernels never load a masked block)
      const double p = sp[i * Lk + j];
      for (int64_t d = 0; d < D; ++d) op[i * D + d] += p * v[j * D + d];
    }
  for (int64_t i = 0; i < rows; ++i) {
    float* orow = out + i * D;
    if (visible[i].hi <= visible[i].lo) {
      for (int64_t d = 0; d < D; ++d) orow[d] = 0.f;
      lse[i] = -std::numeric_limits<float>::infinity();
      continue;
    }
    for (int64_t d = 0; d < D; ++d) orow[d] = static_cast<float>(op[i * D + d] / l[i]);
    double corr = 0;
    for (int64_t d = 0; d < D; ++d) corr += static_cast<double>(q[(r0 + i) * D + d]) * k_mean[d];
    lse[i] = static_cast<float>(m[i] + std::log(l[i]) + corr * c.scale);
  }
}

// The twin on checked arguments (attn_mask: as given; checked here, CPU only).
std::tuple<Tensor, Tensor> run_cpu(const SageCall& c, const Tensor& q, const Tensor& k, const Tensor& v,
                                   const SageBlockMask& bm, const SageKeyPadding& key_padding,
                                   const std::optional<Tensor>& attn_mask) {
  // The general attention mask (CPU only): bool (false hides the key) or float (added to the scores), 4-d
  // [B or 1, Hq or 1, Lq, Lk]; read as bytes or as contiguous float32.
  std::optional<Tensor> am;
  int64_t am_b = 0, am_h = 0;
  bool am_bool = false;
  if (attn_mask) {
    const Tensor& t = *attn_mask;
    const char* op = "sage_attention_fwd";
    const ScalarType mt = t.scalar_type();
    TERSOR_CHECK_TYPE(mt == ScalarType::Bool || mt == ScalarType::Float || mt == ScalarType::Half ||
                          mt == ScalarType::BFloat16,
                      op, ": attn_mask must be bool or float32/float16/bfloat16, got ", dtype_name(mt));
    TERSOR_CHECK_VALUE(t.dim() == 4 && (t.size(0) == 1 || t.size(0) == c.batch) &&
                           (t.size(1) == 1 || t.size(1) == c.heads_q) && t.size(2) == c.len_q && t.size(3) == c.len_k,
                       op, ": attn_mask must be [", c.batch, " or 1, ", c.heads_q, " or 1, ", c.len_q, ", ", c.len_k,
                       "], got ", sizes_str(t));
    TERSOR_CHECK_VALUE(t.is_cpu(), op, ": attn_mask must be on the CPU with q, got ", device_str(t));
    am_bool = mt == ScalarType::Bool;
    am = as_contiguous(am_bool ? t : as_dtype(t, ScalarType::Float));
    am_b = t.size(0);
    am_h = t.size(1);
  }
  const Tensor qf = as_contiguous(as_dtype(q, ScalarType::Float));
  const Tensor kf = as_contiguous(as_dtype(k, ScalarType::Float));
  const Tensor vf = as_contiguous(as_dtype(v, ScalarType::Float));
  Tensor out = empty({c.batch, c.heads_q, c.len_q, c.head_dim}, ScalarType::Float, qf.device());
  Tensor lse = empty({c.batch, c.heads_q, c.len_q}, ScalarType::Float, qf.device());
  const int64_t D = c.head_dim, group = c.heads_q / c.heads_kv;
  const float* qp = qf.const_data_ptr<float>();
  const float* kf_p = kf.const_data_ptr<float>();
  const float* vp = vf.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  float* lp = lse.mutable_data_ptr<float>();
  const ScalarType in_t = q.scalar_type();

  std::vector<KVPrepared> kv(c.exact() ? 0 : c.batch * c.heads_kv);
  if (!c.exact()) {
    tersor::parallel_for(0, c.batch * c.heads_kv, 1, [&](int64_t b, int64_t e) {
      for (int64_t bh = b; bh < e; ++bh)
        prepare_kv(c, kf_p + bh * c.len_k * D, vp + bh * c.len_k * D, kv[bh]);
    });
  }
  const int64_t tiles = (c.len_q + Traits::kCtaQ - 1) / Traits::kCtaQ;
  tersor::parallel_for(0, c.batch * c.heads_q * tiles, 1, [&](int64_t b, int64_t e) {
    for (int64_t w = b; w < e; ++w) {
      const int64_t bh = w / tiles, tile = w % tiles;
      const int64_t bkv = (bh / c.heads_q) * c.heads_kv + (bh % c.heads_q) / group;
      const int64_t r0 = tile * Traits::kCtaQ, r1 = std::min(c.len_q, r0 + Traits::kCtaQ);
      TwinMasks mk;
      mk.block_row = bm.row(bh / c.heads_q, bh % c.heads_q, tile);  // kCtaQ == kSparseBlockQ
      mk.key_pad = key_padding.row(bh / c.heads_q, c.len_k);
      if (am) {
        const int64_t plane = (am_b == 1 ? 0 : bh / c.heads_q) * am_h + (am_h == 1 ? 0 : bh % c.heads_q);
        const int64_t off = (plane * c.len_q + r0) * c.len_k;
        if (am_bool)
          mk.attn_bool = static_cast<const uint8_t*>(am->const_data_ptr()) + off;
        else
          mk.attn_bias = am->const_data_ptr<float>() + off;
      }
      const float* qh = qp + bh * c.len_q * D;
      float* oh = op + bh * c.len_q * D + r0 * D;
      float* lh = lp + bh * c.len_q + r0;
      if (c.exact())
        exact_rows(c, qh, kf_p + bkv * c.len_k * D, vp + bkv * c.len_k * D, r0, r1, mk, oh, lh);
      else
        quantized_rows(c, in_t, qh, kv[bkv], r0, r1, mk, oh, lh);
    }
  });
  return {in_t == ScalarType::Float ? out : as_dtype(out, in_t), lse};
}

std::tuple<Tensor, Tensor> sage_attention_fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v, bool is_causal,
                                                  double scale, int64_t qk_bits, std::string pv, bool smooth_k,
                                                  bool smooth_q, std::string kernel,
                                                  std::optional<Tensor> block_mask, int64_t window_left,
                                                  int64_t window_right, std::optional<Tensor> key_padding_mask,
                                                  std::optional<Tensor> attn_mask) {
  const SageCall c = check_call(q, k, v, is_causal, scale, qk_bits, pv, smooth_k, smooth_q, window_left, window_right);
  const SageBlockMask bm = check_block_mask(block_mask, c, q);
  const SageKeyPadding key_padding = check_key_padding(key_padding_mask, c, q);
  parse_kernel(kernel);  // selects a CUDA kernel; the CPU twin reproduces all of them (checked, then unused)
  return run_cpu(c, q, k, v, bm, key_padding, attn_mask);
}

// Varlen: the packed tensors as one [1, H, total, D] sequence whose rows see only their own sequence's keys
// (KeyMask's cu_q / cu_k, checked here value by value).
std::tuple<Tensor, Tensor> sage_attention_varlen_fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                                         const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
                                                         bool is_causal, double scale, int64_t qk_bits, std::string pv,
                                                         bool smooth_k, bool smooth_q, std::string kernel,
                                                         int64_t window_left, int64_t window_right) {
  const VarlenCall vc = check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, is_causal, scale, qk_bits, pv, smooth_k,
                                     smooth_q, window_left, window_right);
  check_varlen_offsets(vc);
  parse_kernel(kernel, "sage_attention_varlen_fwd");
  auto [out, lse] = run_cpu(vc.call, vc.q4, vc.k4, vc.v4, SageBlockMask{}, SageKeyPadding{}, std::nullopt);
  return varlen_outputs(out, lse);
}

// The CUDA kernel sage_attention_fwd runs for these modes on a device of compute capability cc in this build
// ("sm8x-mma" or "sm90a-wgmma"), or the NotImplementedError such a call raises.
std::string sage_route_op(int64_t cc, int64_t qk_bits, std::string pv, bool smooth_q, std::string kernel) {
  return sage_path_name(
      route_or_throw(static_cast<int>(cc), qk_bits, pv, smooth_q, kernel, built_sage_cubins(), "_sage_route").path);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(tersor, CPU, m) {
  m.impl("sage_attention_fwd", TORCH_BOX(&sage_attention_fwd_cpu));
  m.impl("sage_attention_varlen_fwd", TORCH_BOX(&sage_attention_varlen_fwd_cpu));
}

// Tensor-free: no backend to dispatch on, so it registers for every key.
STABLE_TORCH_LIBRARY_IMPL(tersor, CompositeExplicitAutograd, m) { m.impl("_sage_route", TORCH_BOX(&sage_route_op)); }

}  // namespace tersor::attention
