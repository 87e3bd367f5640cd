// CPU ops of the quantized paged KV cache (paged_format.h; docs/formats.md "Paged KV cache v1"):
//   paged_kv_append_  quantizes new K/V tokens once, on write, into their pages;
//   sage_decode_paged the CPU twin of decode attention over those pages (1 <= Lq <= 16 queries per sequence).
//
// Decode numerics (what the CUDA decode kernels, decode_kernel.cuh, reproduce): the query heads that share a KV
// head are one block of Lq * group rows (GQA packed into the MMA's M dimension). Each row is Q * scale * log2(e) in
// fp32, quantized to INT8 with its own scale. Score of key j in page c: q_scale(row) * k_scale(j) * (q_int .
// k_int_j) + (q_fp32 . k_mean(c)) (the smoothing mean added back exactly, per page). Keys are walked page by page
// in tiles of at most 64 tokens with the prefill twin's online softmax (base 2, log2(448) offset, P~ rounded to
// e4m3, each tile's P~ V summed in a fresh fp32 buffer, scaled by the page's v_scale per channel and added into the
// fp32 accumulator), then out = acc / l and LSE = ln2 (m - log2(448) + log2 l). A row that sees no key gives 0 and
// LSE -inf.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "attention/paged_format.h"
#include "attention/sage_format.h"
#include "attention/paged_glue.h"

namespace tersor::attention {
namespace {

// ------------------------------------------------------------------------------------------- append
void paged_kv_append_cpu(Tensor k_codes, Tensor k_scale, Tensor v_codes, Tensor page_meta, const Tensor& k,
                         const Tensor& v, const Tensor& block_table, const Tensor& start, const Tensor& lengths) {
  const char* op = "paged_kv_append_";
  const PagedLayout l = check_append_args(op, k_codes, k_scale, v_codes, page_meta, k, v, block_table, start, lengths);
  const int64_t B = k.size(0), L = k.size(1);
  const Tensor bt = as_contiguous(block_table), st = as_contiguous(start), ln = as_contiguous(lengths);
  const int32_t* btp = bt.const_data_ptr<int32_t>();
  const int32_t* stp = st.const_data_ptr<int32_t>();
  const int32_t* lnp = ln.const_data_ptr<int32_t>();
  const int64_t max_pages = bt.size(1), S = l.page_size, D = l.head_dim, H = l.heads_kv;

  // Every index first (nothing is written when any is bad). Each slot is written by one sequence of the call,
  // and a page a sequence copies its statistics from is not opened by another sequence in the same call (the
  // tasks below run in parallel). O(tokens written): no per-call pass over the whole cache.
  std::unordered_map<int64_t, int64_t> writer;  // page * S + slot -> sequence
  int64_t total = 0;
  for (int64_t b = 0; b < B; ++b) total += std::max<int64_t>(0, lnp[b]);
  writer.reserve(static_cast<size_t>(std::min<int64_t>(total, B * L)));
  for (int64_t b = 0; b < B; ++b) {
    const int64_t s0 = stp[b], n = lnp[b];
    TERSOR_CHECK_VALUE(n >= 0 && n <= L, op, ": lengths[", b, "] = ", n, " is outside [0, ", L, "]");
    TERSOR_CHECK_VALUE(s0 >= 0, op, ": start[", b, "] = ", s0, " is negative");
    if (n == 0) continue;
    TERSOR_CHECK_VALUE((s0 + n - 1) / S < max_pages, op, ": sequence ", b, " writes token ", s0 + n - 1,
                       ", past its block_table row (", max_pages, " pages of ", S, " tokens)");
    const int64_t c0 = s0 > 0 && s0 % S == 0 ? (s0 - 1) / S : s0 / S;  // the stats source page is read too
    for (int64_t c = c0; c <= (s0 + n - 1) / S; ++c) {
      const int64_t page = btp[b * max_pages + c];
      TERSOR_CHECK_VALUE(page >= 0 && page < l.num_pages, op, ": block_table[", b, ", ", c, "] = ", page,
                         " is not a page of this cache (", l.num_pages, " pages)");
    }
    for (int64_t t = 0; t < n; ++t) {
      const int64_t pos = s0 + t, page = btp[b * max_pages + pos / S];
      const auto [it, fresh] = writer.emplace(page * S + pos % S, b);
      TERSOR_CHECK_VALUE(fresh, op, ": page ", page, " slot ", pos % S, " is written by sequences ", it->second,
                         " and ", b, " (token ", pos, ") in one call: block_table rows share a page");
    }
  }
  for (int64_t b = 0; b < B; ++b) {
    const int64_t s0 = stp[b], n = lnp[b];
    for (int64_t pos = s0 + (S - s0 % S) % S; n > 0 && s0 > 0 && pos < s0 + n; pos += S) {  // pages it opens
      const int64_t src = btp[b * max_pages + page_stats_source(s0, pos, S)];
      const auto it = writer.find(src * S);
      TERSOR_CHECK_VALUE(it == writer.end() || it->second == b, op, ": sequence ", b, " continues from page ", src,
                         ", which sequence ", it == writer.end() ? -1 : it->second, " opens in the same call");
    }
  }

  const Tensor kf = as_contiguous(as_dtype(k, ScalarType::Float));
  const Tensor vf = as_contiguous(as_dtype(v, ScalarType::Float));
  const float* kp = kf.const_data_ptr<float>();
  const float* vp = vf.const_data_ptr<float>();
  int8_t* kc = k_codes.mutable_data_ptr<int8_t>();
  float* ks = k_scale.mutable_data_ptr<float>();
  uint8_t* vc = v_codes.mutable_data_ptr<uint8_t>();
  float* meta = page_meta.mutable_data_ptr<float>();
  // One task per (sequence, KV head): its pages are its own (checked above), written in token order, so a page
  // copying its statistics from the sequence's previous page sees them already set.
  tersor::parallel_for(0, B * H, 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> chunk_mean(D), chunk_vscale(D), ksm(D);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t b = w / H, h = w % H, s0 = stp[b], n = lnp[b];
      if (n == 0) continue;
      const float* kb = kp + (b * L * H + h) * D;  // token t at kb + t * H * D
      const float* vb = vp + (b * L * H + h) * D;
      if (s0 == 0) {  // the chunk that starts the sequence fixes its statistics
        for (int64_t d = 0; d < D; ++d) {
          double s = 0;
          float amax = 0.f;
          for (int64_t t = 0; t < n; ++t) {
            s += kb[t * H * D + d];
            amax = std::max(amax, std::fabs(vb[t * H * D + d]));
          }
          chunk_mean[d] = static_cast<float>(s / static_cast<double>(n));
          chunk_vscale[d] = paged_v_scale(amax);
        }
      }
      for (int64_t t = 0; t < n; ++t) {
        const int64_t pos = s0 + t, page = btp[b * max_pages + pos / S], slot = pos % S;
        float* pm = meta + paged_meta_offset(l, page, h, 0);  // [k_mean D][v_scale D]
        if (slot == 0) {  // this token opens the page: its statistics are fixed now (page_stats_source)
          const int64_t src = page_stats_source(s0, pos, S);
          if (src < 0) {
            std::copy(chunk_mean.begin(), chunk_mean.end(), pm);
            std::copy(chunk_vscale.begin(), chunk_vscale.end(), pm + D);
          } else {
            const float* sm = meta + paged_meta_offset(l, btp[b * max_pages + src], h, 0);
            std::copy(sm, sm + 2 * D, pm);
          }
        }
        const float* kt = kb + t * H * D;
        const float* vt = vb + t * H * D;
        float amax = 0.f;
        for (int64_t d = 0; d < D; ++d) {
          ksm[d] = kt[d] - pm[d];
          amax = std::max(amax, std::fabs(ksm[d]));
        }
        const IntQuantParams qp = int_quant_params(amax, 8);
        int8_t* kdst = kc + paged_token_offset(l, page, h, slot);
        for (int64_t d = 0; d < D; ++d) kdst[d] = paged_k_code(ksm[d], qp.inv_scale);
        ks[paged_scale_offset(l, page, h, slot)] = qp.scale;
        uint8_t* vdst = vc + paged_token_offset(l, page, h, slot);
        for (int64_t d = 0; d < D; ++d) vdst[d] = paged_v_code(vt[d], pm[D + d]);
      }
    }
  });
}

// ------------------------------------------------------------------------------------------- decode
std::tuple<Tensor, Tensor> sage_decode_paged_cpu(const Tensor& q, const Tensor& k_codes, const Tensor& k_scale,
                                                 const Tensor& v_codes, const Tensor& page_meta,
                                                 const Tensor& block_table, const Tensor& seqlens, double scale,
                                                 int64_t window_left, int64_t window_right, int64_t num_workers) {
  const char* op = "sage_decode_paged";
  const DecodeCall call = check_decode_args(op, q, k_codes, k_scale, v_codes, page_meta, block_table, seqlens, scale,
                                            num_workers);
  const PagedLayout l = call.l;
  const int64_t B = call.batch, Lq = call.len_q, Hq = call.heads_q, D = l.head_dim, H = l.heads_kv, S = l.page_size;
  const Tensor bt = as_contiguous(block_table), sl = as_contiguous(seqlens);
  const int32_t* btp = bt.const_data_ptr<int32_t>();
  const int32_t* slp = sl.const_data_ptr<int32_t>();
  const int64_t max_pages = bt.size(1);
  check_decode_indices(op, l, btp, slp, B, max_pages);
  if (num_workers < 0) num_workers = 0;  // auto: the CPU walks each sequence in one pass
  // Split-KV quota: the key tiles of all (sequence, KV head) pairs shared out in equal chunks of `quota` tiles
  // over num_workers work items (0: one chunk per pair).
  int64_t total_tiles = 0;
  for (int64_t b = 0; b < B; ++b) total_tiles += decode_seq_tiles(Lq, slp[b], window_left, window_right, S, kDecodeTile) * H;
  const int64_t quota = decode_split_quota(total_tiles, num_workers);
  const Tensor qf = as_contiguous(as_dtype(q, ScalarType::Float));
  Tensor out = empty({B, Lq, Hq, D}, ScalarType::Float, qf.device());
  Tensor lse = empty({B, Hq, Lq}, ScalarType::Float, qf.device());
  const float* qp = qf.const_data_ptr<float>();
  const int8_t* kc = k_codes.const_data_ptr<int8_t>();
  const float* ks = k_scale.const_data_ptr<float>();
  const uint8_t* vc = v_codes.const_data_ptr<uint8_t>();
  const float* meta = page_meta.const_data_ptr<float>();
  float* op_ = out.mutable_data_ptr<float>();
  float* lp = lse.mutable_data_ptr<float>();
  const int64_t group = Hq / H, R = Lq * group;
  const float qk_mul = static_cast<float>(scale) * kLog2e;
  const float neg_inf = -std::numeric_limits<float>::infinity();

  // One task per (sequence, KV head): rows r = i * group + g are query token i of query head h * group + g.
  tersor::parallel_for(0, B * H, 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> qs(R * D), q_op(R * D), q_scale(R), bias(R), m(R), l_(R), alpha(R), acc(R * D);
    std::vector<float> s_tile(R * kDecodeTile), pv(R * D), v_tile(kDecodeTile * D);
    std::vector<float> m_tot(R), l_tot(R), acc_tot(R * D);
    std::vector<KeyRange> vis(R);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t b = w / H, h = w % H, n = slp[b];
      const KeyRange span = decode_span(Lq, n, window_left, window_right);
      const int64_t lo_all = span.lo, hi_all = span.hi;
      for (int64_t r = 0; r < R; ++r) {
        const int64_t i = r / group, hq = h * group + r % group;
        const float* src = qp + ((b * Lq + i) * Hq + hq) * D;
        float amax = 0.f;
        for (int64_t d = 0; d < D; ++d) {
          qs[r * D + d] = src[d] * qk_mul;
          amax = std::max(amax, std::fabs(qs[r * D + d]));
        }
        const IntQuantParams p = int_quant_params(amax, 8);
        q_scale[r] = p.scale;
        for (int64_t d = 0; d < D; ++d) q_op[r * D + d] = static_cast<float>(quantize_int(qs[r * D + d], p.inv_scale, 8));
        vis[r] = decode_visible_keys(i, Lq, n, window_left, window_right);
      }
      // The sequence's key tiles (paged_format.h: decode_tiles), in chunks of `quota` tiles: each chunk is one
      // split-KV work item of the CUDA kernel, with its own online softmax (m, l, acc from scratch), merged into
      // the totals in chunk order. One chunk (quota >= the tile count) is the plain sequential walk.
      const DecodeTiles tiles = decode_tiles(lo_all, hi_all, S, kDecodeTile);
      std::fill(m_tot.begin(), m_tot.end(), neg_inf);
      std::fill(l_tot.begin(), l_tot.end(), 0.f);
      std::fill(acc_tot.begin(), acc_tot.end(), 0.f);
      for (int64_t g0 = tiles.first; g0 < tiles.first + tiles.count; g0 += quota) {
        const int64_t g1 = std::min(tiles.first + tiles.count, g0 + quota);
        std::fill(m.begin(), m.end(), neg_inf);
        std::fill(l_.begin(), l_.end(), 0.f);
        std::fill(acc.begin(), acc.end(), 0.f);
        int64_t bias_page_col = -1;
        for (int64_t g = g0; g < g1; ++g) {
          const KeyRange kr_tile = decode_tile_keys(g, lo_all, hi_all, S, kDecodeTile);
          const int64_t c = kr_tile.lo / S, page = btp[b * max_pages + c];
          const float* kmean = meta + paged_meta_offset(l, page, h, 0);
          const float* vscale = kmean + D;
          if (c != bias_page_col) {  // q . k_mean(page), fp32, in channel order: once per page of the chunk
            for (int64_t r = 0; r < R; ++r) {
              float s = 0.f;
              for (int64_t d = 0; d < D; ++d) s += qs[r * D + d] * kmean[d];
              bias[r] = s;
            }
            bias_page_col = c;
          }
          const int64_t j0 = kr_tile.lo, j1 = kr_tile.hi, nt = j1 - j0;
          for (int64_t jj = 0; jj < nt; ++jj) {
            const uint8_t* vr = vc + paged_token_offset(l, page, h, (j0 + jj) % S);
            for (int64_t d = 0; d < D; ++d) v_tile[jj * D + d] = e4m3_to_float(vr[d]);
          }
          std::fill(pv.begin(), pv.end(), 0.f);
          for (int64_t r = 0; r < R; ++r) {
            const int64_t a = std::max(j0, vis[r].lo), z = std::min(j1, vis[r].hi);
            if (z <= a) {
              alpha[r] = 1.f;
              continue;
            }
            float* srow = s_tile.data() + r * kDecodeTile;
            float tile_max = neg_inf;
            for (int64_t j = a; j < z; ++j) {
              const int8_t* kr = kc + paged_token_offset(l, page, h, j % S);
              float dot = 0.f;  // |dot| <= 127 * 127 * 256 < 2^24: exact in fp32 in any order
              for (int64_t d = 0; d < D; ++d) dot += q_op[r * D + d] * static_cast<float>(kr[d]);
              const float sj = dot * (q_scale[r] * ks[paged_scale_offset(l, page, h, j % S)]) + bias[r];
              srow[j - j0] = sj;
              tile_max = std::max(tile_max, sj);
            }
            const float m_new = std::max(m[r], tile_max);
            alpha[r] = std::exp2(m[r] - m_new);
            const float m_shift = m_new - kFp8POffset;
            float tile_sum = 0.f;
            float* prow = pv.data() + r * D;
            for (int64_t j = a; j < z; ++j) {
              const float p = e4m3_to_float(float_to_e4m3(std::exp2(srow[j - j0] - m_shift)));
              tile_sum += p;
              if (p == 0.f) continue;
              const float* vt = v_tile.data() + (j - j0) * D;
              for (int64_t d = 0; d < D; ++d) prow[d] += p * vt[d];
            }
            l_[r] = l_[r] * alpha[r] + tile_sum;
            m[r] = m_new;
          }
          for (int64_t r = 0; r < R; ++r)
            for (int64_t d = 0; d < D; ++d) acc[r * D + d] = acc[r * D + d] * alpha[r] + pv[r * D + d] * vscale[d];
        }
        // Merge the chunk (the kernel's LSE combine, in split order): rescale both sides to the larger max.
        for (int64_t r = 0; r < R; ++r) {
          if (!(l_[r] > 0.f)) continue;  // the row saw no key in this chunk
          const float m_new = std::max(m_tot[r], m[r]);
          const float a_tot = std::exp2(m_tot[r] - m_new), a_chunk = std::exp2(m[r] - m_new);
          l_tot[r] = l_tot[r] * a_tot + l_[r] * a_chunk;
          for (int64_t d = 0; d < D; ++d) acc_tot[r * D + d] = acc_tot[r * D + d] * a_tot + acc[r * D + d] * a_chunk;
          m_tot[r] = m_new;
        }
      }
      for (int64_t r = 0; r < R; ++r) {
        const int64_t i = r / group, hq = h * group + r % group;
        float* o = op_ + ((b * Lq + i) * Hq + hq) * D;
        float* ls = lp + (b * Hq + hq) * Lq + i;
        if (vis[r].hi <= vis[r].lo || !(l_tot[r] > 0.f)) {
          std::fill(o, o + D, 0.f);
          *ls = neg_inf;
          continue;
        }
        const float inv_l = 1.f / l_tot[r];
        for (int64_t d = 0; d < D; ++d) o[d] = acc_tot[r * D + d] * inv_l;
        *ls = (m_tot[r] - kFp8POffset + std::log2(l_tot[r])) * 0.6931471805599453f;
      }
    }
  });
  return {as_dtype(out, q.scalar_type()), lse};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(tersor, CPU, m) {
  m.impl("paged_kv_append_", TORCH_BOX(&paged_kv_append_cpu));
  m.impl("sage_decode_paged", TORCH_BOX(&sage_decode_paged_cpu));
}

}  // namespace tersor::attention
