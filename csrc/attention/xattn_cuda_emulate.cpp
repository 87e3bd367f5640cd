// _xattn_emulate_cuda: the XAttention scoring kernel (xattn_cuda.cu) replayed thread by thread on the CPU, with
// the kernel's own per-thread code (xattn_kernel.h): the CTA's shared Q' buffer, per thread the strided reduced
// keys j = tid, tid + 256, ... with an online (max, sum) per row, the warp butterfly (shfl_xor 16..1) and the
// cross-warp combine, pass 2's per-thread probability sums added into the block masses, the rank sort and
// thread 0's selection. The one thing the GPU does in an unspecified order, the shared-memory atomicAdd of pass
// 2, is replayed in thread order (the GPU's order changes the masses by float rounding only); expf is the host's
// (CUDA's expf is within 2 ulp).
//
// fault (tests only): 1 loads the query rows in natural order within the stride (XAttention's "slash" mode,
// not the antidiagonal), 2 puts key j's probability into block j / per + 1 (a wrong reduction index).
#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "attention/xattn_glue.h"
#include "attention/xattn_kernel.h"

namespace tersor::attention {
namespace {

struct FloatLoad {
  const float* kh;
  int64_t D;
  float operator()(int64_t row, int64_t d) const { return kh[row * D + d]; }
};

void replay_cta(const XattnCall& c, const float* qp, const float* kp, int64_t w, int fault, uint8_t* mask_out,
                float* mass_out) {
  const int64_t S = c.stride, D = c.head_dim, SD = S * D, per = c.block / S;
  const int64_t nq = (c.len_q + S - 1) / S;
  const int64_t bh = w / c.q_blocks, qb = w % c.q_blocks;
  const int64_t b = bh / c.heads_q, h = bh % c.heads_q, hk = h / (c.heads_q / c.heads_kv);
  const float* qh = qp + (b * c.heads_q + h) * c.len_q * D;
  const FloatLoad load{kp + (b * c.heads_kv + hk) * c.len_k * D, D};
  const int64_t i0 = qb * per, rows = std::min(per, nq - i0), rows_pad = xattn_rows_padded(c.block, S);
  std::vector<float> qs(rows_pad * SD), mass(c.k_blocks, 0.f);
  for (int64_t e = 0; e < rows_pad * SD; ++e) {
    const int64_t r = e / SD, col = e % SD, s = col / D, d = col % D;
    const int64_t row = fault == 1 ? (i0 + r) * S + s : xattn_query_row(i0 + r, s, S);
    qs[e] = r < rows && row < c.len_q ? qh[row * D + d] : 0.f;
  }
  const float mul = static_cast<float>(c.scale) / static_cast<float>(S);
  constexpr int G = kXattnRowGroup, NT = kXattnThreads;
  std::vector<float> m(NT * G), l(NT * G);
  for (int64_t g0 = 0; g0 < rows; g0 += G) {
    int64_t nv[G];
    int64_t nv_max = 0;
    for (int r = 0; r < G; ++r) {
      nv[r] = g0 + r < rows ? xattn_visible_reduced_keys(i0 + g0 + r, S, c.len_q, c.len_k, c.causal) : 0;
      nv_max = std::max(nv_max, nv[r]);
    }
    // pass 1, per thread
    std::fill(m.begin(), m.end(), -INFINITY);
    std::fill(l.begin(), l.end(), 0.f);
    for (int tid = 0; tid < NT; ++tid)
      for (int64_t j = tid; j < nv_max; j += NT) {
        float acc[G];
        xattn_score_group(qs.data(), S, D, c.len_k, g0, j, load, acc);
        for (int r = 0; r < G; ++r)
          if (j < nv[r]) xattn_combine(m[tid * G + r], l[tid * G + r], acc[r] * mul, 1.f);
      }
    // warp butterfly: every lane combines with lane ^ off, all lanes at once
    std::vector<float> wm(kXattnWarps * G), wl(kXattnWarps * G);
    for (int warp = 0; warp < kXattnWarps; ++warp)
      for (int r = 0; r < G; ++r) {
        float lm[32], ll[32];
        for (int lane = 0; lane < 32; ++lane) lm[lane] = m[(warp * 32 + lane) * G + r], ll[lane] = l[(warp * 32 + lane) * G + r];
        for (int off = 16; off > 0; off >>= 1) {
          float nm[32], nl[32];
          for (int lane = 0; lane < 32; ++lane) {
            nm[lane] = lm[lane];
            nl[lane] = ll[lane];
            xattn_combine(nm[lane], nl[lane], lm[lane ^ off], ll[lane ^ off]);
          }
          std::copy(nm, nm + 32, lm);
          std::copy(nl, nl + 32, ll);
        }
        wm[warp * G + r] = lm[0];
        wl[warp * G + r] = ll[0];
      }
    float row_m[G], row_l[G];
    for (int r = 0; r < G; ++r) {
      float mm = -INFINITY, lsum = 0.f;
      for (int wi = 0; wi < kXattnWarps; ++wi) xattn_combine(mm, lsum, wm[wi * G + r], wl[wi * G + r]);
      row_m[r] = mm;
      row_l[r] = lsum;
    }
    // pass 2: the atomicAdds in thread order, round by round
    for (int64_t base = 0; base < nv_max; base += NT)
      for (int tid = 0; tid < NT; ++tid) {
        const int64_t j = base + tid;
        if (j >= nv_max) break;
        float acc[G];
        xattn_score_group(qs.data(), S, D, c.len_k, g0, j, load, acc);
        float psum = 0.f;
        for (int r = 0; r < G; ++r)
          if (j < nv[r]) psum += expf(acc[r] * mul - row_m[r]) / row_l[r];
        int64_t blk = j / per;
        if (fault == 2) blk = std::min(blk + 1, c.k_blocks - 1);
        mass[blk] += psum;
      }
  }
  std::vector<int> order(c.k_blocks);
  for (int64_t j = 0; j < c.k_blocks; ++j) {
    order[xattn_rank(mass.data(), c.k_blocks, j)] = static_cast<int>(j);
    mass_out[w * c.k_blocks + j] = mass[j];
  }
  xattn_select(mass.data(), order.data(), c.k_blocks, xattn_diagonal_block(qb, c.block, c.len_q, c.len_k), c.causal,
               c.threshold, mask_out + w * c.k_blocks);
}

std::tuple<Tensor, Tensor> xattn_emulate_cuda(const Tensor& q, const Tensor& k, int64_t block_size, int64_t stride,
                                              double threshold, bool is_causal, double scale, int64_t fault) {
  const char* op = "_xattn_emulate_cuda";
  const XattnCall c = check_xattn(q, k, block_size, stride, threshold, is_causal, scale);
  TERSOR_CHECK_VALUE(fault >= 0 && fault <= 2, op, ": fault must be in [0, 2], got ", fault);
  TERSOR_CHECK(q.is_cpu() && k.is_cpu(), op, ": expects CPU tensors");
  const Tensor qf = as_contiguous(as_dtype(q, ScalarType::Float));  // exact for float16 / bfloat16
  const Tensor kf = as_contiguous(as_dtype(k, ScalarType::Float));
  Tensor mask = empty({c.batch, c.heads_q, c.q_blocks, c.k_blocks}, ScalarType::Bool, q.device());
  Tensor mass = empty({c.batch, c.heads_q, c.q_blocks, c.k_blocks}, ScalarType::Float, q.device());
  const float* qp = qf.const_data_ptr<float>();
  const float* kp = kf.const_data_ptr<float>();
  uint8_t* mp = static_cast<uint8_t*>(mask.mutable_data_ptr());
  float* wp = mass.mutable_data_ptr<float>();
  torch::stable::parallel_for(0, c.batch * c.heads_q * c.q_blocks, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) replay_cta(c, qp, kp, w, static_cast<int>(fault), mp, wp);
  });
  return {mask, mass};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(tersor_testing, CPU, m) { m.impl("_xattn_emulate_cuda", TORCH_BOX(&xattn_emulate_cuda)); }

}  // namespace tersor::attention
