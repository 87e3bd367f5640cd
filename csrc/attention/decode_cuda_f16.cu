// Decode over the quantized paged KV cache, P~ V by fp16 mma on the exact fp16 images of the e4m3 codes (every
// target: sm_80 has no FP8 mma, and on sm_90a mma.sync e4m3 is not native), plus the plan and merge kernels
// both variants share. Kernel body: decode_kernel.cuh. CUDA path compiled, not run.
#include "attention/decode_kernel.cuh"

namespace tersor::attention {
namespace decode_detail {

constexpr int kPlanThreads = 256;

// Total key tiles of the call (the twin's total_tiles) and the split quota, into the workspace.
__global__ void __launch_bounds__(kPlanThreads) decode_plan_kernel(const DecodeArgs a) {
  __shared__ long long part[kPlanThreads];
  long long s = 0;
  for (int64_t b = threadIdx.x; b < a.batch; b += kPlanThreads)
    s += decode_seq_tiles(a.len_q, a.seqlens[b], a.window_left, a.window_right, a.page_size, DecodeTraits<64, false>::kTile) * a.heads_kv;
  part[threadIdx.x] = s;
  __syncthreads();
  for (int w = kPlanThreads / 2; w > 0; w >>= 1) {
    if (static_cast<int>(threadIdx.x) < w) part[threadIdx.x] += part[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) *a.ws_quota = decode_split_quota(part[0], a.workers);
}

// One CTA per output row (row r of KV head h of sequence b): the chunks' partials combined in chunk order
// exactly as the twin combines them (rescale both sides to the larger max), then out = acc / l and
// LSE = ln 2 (m - log2 448 + log2 l); a row that sees no key: 0 and -inf.
__global__ void __launch_bounds__(DecodeTraits<64, false>::kMergeThreads) decode_merge_kernel(const DecodeArgs a) {
  constexpr int kT = DecodeTraits<64, false>::kMergeThreads;
  const int64_t r = blockIdx.x, bh = blockIdx.y, b = bh / a.heads_kv, h = bh % a.heads_kv;
  const int64_t group = a.heads_q / a.heads_kv, D = a.head_dim;
  const int64_t n = a.seqlens[b];
  const KeyRange span = decode_span(a.len_q, n, a.window_left, a.window_right);
  const int64_t chunks = decode_num_chunks(decode_tiles(span.lo, span.hi, a.page_size, DecodeTraits<64, false>::kTile).count, *a.ws_quota);
  constexpr int kPer = 256 / kT;  // channels per thread (D <= 256)
  float acc[kPer], m_tot = -INFINITY, l_tot = 0.f;
#pragma unroll
  for (int k = 0; k < kPer; ++k) acc[k] = 0.f;
  for (int64_t s = 0; s < chunks; ++s) {
    const int64_t prow = decode_partial_row(b, h, s, r, a.heads_kv, a.max_splits, a.rows);
    const float m = a.ws_ml[prow * 2], l = a.ws_ml[prow * 2 + 1];
    if (!(l > 0.f)) continue;  // the row saw no key in this chunk
    const float m_new = fmaxf(m_tot, m);
    const float a_tot = exp2f(m_tot - m_new), a_chunk = exp2f(m - m_new);
    l_tot = __fadd_rn(__fmul_rn(l_tot, a_tot), __fmul_rn(l, a_chunk));
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      const int64_t c = threadIdx.x + k * kT;
      if (c < D) acc[k] = __fadd_rn(__fmul_rn(acc[k], a_tot), __fmul_rn(a.ws_acc[prow * D + c], a_chunk));
    }
    m_tot = m_new;
  }
  const int64_t i = decode_row_token(r, group), hq = decode_row_head(r, h, group);
  const KeyRange vis = decode_visible_keys(i, a.len_q, n, a.window_left, a.window_right);
  const bool dead = vis.hi <= vis.lo || !(l_tot > 0.f);
  const float inv_l = dead ? 0.f : 1.f / l_tot;
  float* o = a.out + decode_q_offset(b, i, hq, a.len_q, a.heads_q, D);
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const int64_t c = threadIdx.x + k * kT;
    if (c < D) o[c] = dead ? 0.f : __fmul_rn(acc[k], inv_l);
  }
  if (threadIdx.x == 0)
    a.lse[(b * a.heads_q + hq) * a.len_q + i] =
        dead ? -INFINITY : __fmul_rn(__fadd_rn(m_tot - kFp8POffset, log2f(l_tot)), 0.6931471805599453f);
}

}  // namespace decode_detail

int64_t decode_smem_bytes(int64_t head_dim, bool fp8) {
  if (head_dim == 64) return fp8 ? DecodeTraits<64, true>::kSmemBytes : DecodeTraits<64, false>::kSmemBytes;
  if (head_dim == 128) return fp8 ? DecodeTraits<128, true>::kSmemBytes : DecodeTraits<128, false>::kSmemBytes;
  return fp8 ? DecodeTraits<256, true>::kSmemBytes : DecodeTraits<256, false>::kSmemBytes;
}

cudaError_t decode_plan_launch(const DecodeArgs& a, cudaStream_t stream) {
  decode_detail::decode_plan_kernel<<<1, decode_detail::kPlanThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t decode_merge_launch(const DecodeArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.rows), static_cast<unsigned>(a.batch * a.heads_kv));
  decode_detail::decode_merge_kernel<<<grid, DecodeTraits<64, false>::kMergeThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t decode_paged_cuda_launch_f16(const DecodeArgs& a, cudaStream_t stream) {
  cudaError_t e = decode_plan_launch(a, stream);
  if (e == cudaSuccess) e = decode_detail::dispatch_split<false>(a, stream);
  if (e == cudaSuccess) e = decode_merge_launch(a, stream);
  return e;
}

}  // namespace tersor::attention
