// Quantize-on-write into the paged KV cache (paged_kv_append_ on CUDA; docs/formats.md "Paged KV cache v1").
// CUDA path compiled, not run.
//
// Two launches:
//   paged_append_stats_kernel   one CTA per (sequence, KV head) whose chunk starts the sequence (start == 0, the
//                               prompt), one thread per channel: k_mean = the chunk's mean summed in double in
//                               token order, rounded once; v_scale = paged_v_scale(amax |v|). Into a scratch.
//   paged_append_tokens_kernel  one warp per (sequence, token, KV head): the token's page statistics, its K codes
//                               (INT8 of k - k_mean at amax / 127, the amax a warp max) and V codes (e4m3 of
//                               v / v_scale); the warp of a page's slot-0 token writes the page's statistics.
// Tokens need no order: every page a call opens gets the same statistics, the prompt chunk's (start == 0) or,
// for a continuing chunk, those of the page holding token start - 1 (page_stats_source applied page by page
// copies them forward unchanged), which the call never writes (its slot 0 precedes start; the wrapper refuses
// a continuation from a page another sequence opens in the same call, as the twin does).
//
// Bit-identical to the twin (paged_cpu.cpp) by construction: the same fp32 / double operations in the same
// order per element (paged_k_code, paged_v_code, paged_v_scale, int_quant_params from paged_format.h /
// sage_format.h, shared with the twin), a max reduction (order-free), and the same sequential double sum for
// the mean. No multiply-add pair exists for nvcc to contract into an FMA.
#include "attention/decode_cuda.h"
#include "attention/paged_format.h"
#include "attention/sage_format.h"

namespace tersor::attention {
namespace {

constexpr int kAppendWarps = 4;

__global__ void paged_append_stats_kernel(const PagedAppendArgs a) {
  const int64_t bh = blockIdx.x, b = bh / a.heads_kv, h = bh % a.heads_kv, D = a.head_dim;
  const int64_t n = a.lengths[b];
  if (a.start[b] != 0 || n <= 0) return;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    double s = 0;
    float amax = 0.f;
    for (int64_t t = 0; t < n; ++t) {
      const int64_t off = ((b * a.len + t) * a.heads_kv + h) * D + d;
      s += a.k[off];
      amax = fmaxf(amax, fabsf(a.v[off]));
    }
    a.stats[(bh * 2 + 0) * D + d] = static_cast<float>(s / static_cast<double>(n));
    a.stats[(bh * 2 + 1) * D + d] = paged_v_scale(amax);
  }
}

__global__ void __launch_bounds__(kAppendWarps * 32) paged_append_tokens_kernel(const PagedAppendArgs a) {
  const int64_t w = static_cast<int64_t>(blockIdx.x) * kAppendWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t H = a.heads_kv, D = a.head_dim, S = a.page_size;
  if (w >= a.batch * a.len * H) return;
  const int64_t h = w % H, t = (w / H) % a.len, b = w / (H * a.len);  // w = (b * L + t) * H + h: k's row order
  const int64_t s0 = a.start[b], n = a.lengths[b];
  if (t >= n) return;
  const PagedLayout L{a.num_pages, H, S, D};
  const int64_t pos = s0 + t, page = a.block_table[b * a.max_pages + pos / S], slot = pos % S;
  const float* stats = s0 == 0 ? a.stats + (b * H + h) * 2 * D
                               : a.page_meta + paged_meta_offset(L, a.block_table[b * a.max_pages + (s0 - 1) / S], h, 0);
  if (slot == 0) {  // this token opens the page: its statistics are fixed now
    float* pm = a.page_meta + paged_meta_offset(L, page, h, 0);
    for (int64_t d = lane; d < 2 * D; d += 32) pm[d] = stats[d];
  }
  constexpr int kPer = 256 / 32;  // channels per lane (D <= 256)
  const float* kt = a.k + w * D;
  const float* vt = a.v + w * D;
  float ksm[kPer];
  float amax = 0.f;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int64_t d = lane + 32 * i;
    ksm[i] = d < D ? kt[d] - stats[d] : 0.f;
    amax = fmaxf(amax, fabsf(ksm[i]));
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  const IntQuantParams qp = int_quant_params(amax, 8);
  int8_t* kdst = a.k_codes + paged_token_offset(L, page, h, slot);
  uint8_t* vdst = a.v_codes + paged_token_offset(L, page, h, slot);
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int64_t d = lane + 32 * i;
    if (d < D) {
      kdst[d] = paged_k_code(ksm[i], qp.inv_scale);
      vdst[d] = paged_v_code(vt[d], stats[D + d]);
    }
  }
  if (lane == 0) a.k_scale[paged_scale_offset(L, page, h, slot)] = qp.scale;
}

}  // namespace

cudaError_t paged_append_cuda_launch(const PagedAppendArgs& a, cudaStream_t stream) {
  if (a.batch * a.heads_kv > 0) {
    paged_append_stats_kernel<<<static_cast<unsigned>(a.batch * a.heads_kv), static_cast<unsigned>(a.head_dim), 0,
                                stream>>>(a);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  const int64_t warps = a.batch * a.len * a.heads_kv;
  if (warps == 0) return cudaSuccess;
  paged_append_tokens_kernel<<<static_cast<unsigned>((warps + kAppendWarps - 1) / kAppendWarps), kAppendWarps * 32,
                               0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace tersor::attention
