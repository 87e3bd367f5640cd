// _paged_append_emulate_cuda: the CUDA quantize-on-write kernels (paged_append_cuda.cu) replayed on the CPU: the
// statistics kernel per (sequence, KV head) into its scratch, then the token kernel's warps in REVERSE order (the
// GPU runs them in any order; the kernel's claim is that none depends on another: each takes its page
// statistics from the scratch or from the page of token start - 1, never from a page the call opens), each with
// the kernel's per-lane channel split and warp-max butterfly. Bit-identical to the twin is the expected result
// (tests/test_paged_decode_cuda.py); writes in place like the op.
#include <algorithm>
#include <cmath>
#include <vector>

#include "attention/paged_format.h"
#include "attention/paged_glue.h"
#include "attention/sage_format.h"

namespace tersor::attention {
namespace {

void paged_append_emulate_cuda(Tensor k_codes, Tensor k_scale, Tensor v_codes, Tensor page_meta, const Tensor& k,
                               const Tensor& v, const Tensor& block_table, const Tensor& start,
                               const Tensor& lengths) {
  const char* op = "_paged_append_emulate_cuda";
  const PagedLayout l = check_append_args(op, k_codes, k_scale, v_codes, page_meta, k, v, block_table, start, lengths);
  const int64_t B = k.size(0), L = k.size(1), H = l.heads_kv, D = l.head_dim, S = l.page_size;
  const Tensor kf = as_contiguous(as_dtype(k, ScalarType::Float)), vf = as_contiguous(as_dtype(v, ScalarType::Float));
  const Tensor bt = as_contiguous(block_table), st = as_contiguous(start), ln = as_contiguous(lengths);
  const float* kp = kf.const_data_ptr<float>();
  const float* vp = vf.const_data_ptr<float>();
  const int32_t* btp = bt.const_data_ptr<int32_t>();
  const int32_t* stp = st.const_data_ptr<int32_t>();
  const int32_t* lnp = ln.const_data_ptr<int32_t>();
  const int64_t max_pages = bt.size(1);
  int8_t* kc = k_codes.mutable_data_ptr<int8_t>();
  float* ks = k_scale.mutable_data_ptr<float>();
  uint8_t* vc = v_codes.mutable_data_ptr<uint8_t>();
  float* meta = page_meta.mutable_data_ptr<float>();
  // paged_append_stats_kernel
  std::vector<float> stats(B * H * 2 * D, std::nanf(""));
  for (int64_t bh = 0; bh < B * H; ++bh) {
    const int64_t b = bh / H, h = bh % H, n = lnp[b];
    if (stp[b] != 0 || n <= 0) continue;
    for (int64_t d = 0; d < D; ++d) {
      double s = 0;
      float amax = 0.f;
      for (int64_t t = 0; t < n; ++t) {
        const int64_t off = ((b * L + t) * H + h) * D + d;
        s += kp[off];
        amax = std::max(amax, std::fabs(vp[off]));
      }
      stats[(bh * 2 + 0) * D + d] = static_cast<float>(s / static_cast<double>(n));
      stats[(bh * 2 + 1) * D + d] = paged_v_scale(amax);
    }
  }
  // paged_append_tokens_kernel, warps in reverse order
  for (int64_t w = B * L * H - 1; w >= 0; --w) {
    const int64_t h = w % H, t = (w / H) % L, b = w / (H * L);
    const int64_t s0 = stp[b], n = lnp[b];
    if (t >= n) continue;
    const int64_t pos = s0 + t, page = btp[b * max_pages + pos / S], slot = pos % S;
    const float* sts = s0 == 0 ? stats.data() + (b * H + h) * 2 * D
                               : meta + paged_meta_offset(l, btp[b * max_pages + (s0 - 1) / S], h, 0);
    if (slot == 0) {
      float* pm = meta + paged_meta_offset(l, page, h, 0);
      for (int64_t d = 0; d < 2 * D; ++d) pm[d] = sts[d];
    }
    const float* kt = kp + w * D;
    const float* vt = vp + w * D;
    constexpr int kPer = 256 / 32;
    float ksm[32][kPer], lane_max[32];
    for (int lane = 0; lane < 32; ++lane) {
      lane_max[lane] = 0.f;
      for (int i = 0; i < kPer; ++i) {
        const int64_t d = lane + 32 * i;
        ksm[lane][i] = d < D ? kt[d] - sts[d] : 0.f;
        lane_max[lane] = std::max(lane_max[lane], std::fabs(ksm[lane][i]));
      }
    }
    for (int o = 16; o > 0; o >>= 1) {
      float nx[32];
      for (int lane = 0; lane < 32; ++lane) nx[lane] = std::max(lane_max[lane], lane_max[lane ^ o]);
      std::copy(nx, nx + 32, lane_max);
    }
    const IntQuantParams qp = int_quant_params(lane_max[0], 8);
    int8_t* kdst = kc + paged_token_offset(l, page, h, slot);
    uint8_t* vdst = vc + paged_token_offset(l, page, h, slot);
    for (int lane = 0; lane < 32; ++lane)
      for (int i = 0; i < kPer; ++i) {
        const int64_t d = lane + 32 * i;
        if (d >= D) continue;
        kdst[d] = paged_k_code(ksm[lane][i], qp.inv_scale);
        vdst[d] = paged_v_code(vt[d], sts[D + d]);
      }
    ks[paged_scale_offset(l, page, h, slot)] = qp.scale;
  }
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(tersor_testing, CPU, m) {
  m.impl("_paged_append_emulate_cuda", TORCH_BOX(&paged_append_emulate_cuda));
}

}  // namespace tersor::attention
