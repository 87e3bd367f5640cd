// CUDA registrations of the paged-KV-cache ops.
//   sage_decode_paged: the decode kernels of issue 15 (decode_kernel.cuh: plan, split-KV over the pages with the
//     GQA rows packed into the MMA's M, LSE merge). CUDA path compiled, not run. The P~ V variant: e4m3 mma on
//     sm_89 when this build has its cubin, else fp16 mma on the exact fp16 images of the e4m3 codes (sm_80,
//     sm_90a: there mma.sync e4m3 is not native); both compute the twin's numbers (docs/research/paged_decode.md).
//     The checks that read tensor data (sequence lengths against the block table, page ids) are the Python
//     wrapper's on CUDA (tersor.attention.sage_decode; one host sync), the kernels never read outside the
//     cache (a page id out of range reads as an empty tile).
//   paged_kv_append_: the quantize-on-write kernels (paged_append_cuda.cu), bit-identical to the twin by
//     construction; the index checks that read tensor data are the Python wrapper's on CUDA
//     (PagedKVCache._check_append_indices: the twin's checks and messages). CUDA path compiled, not run.
#include <initializer_list>
#include <tuple>

#include "attention/decode_cuda.h"
#include "attention/paged_glue.h"
#include "common/cuda_glue.h"

namespace tersor::attention {
namespace {

void paged_kv_append_cuda(Tensor k_codes, Tensor k_scale, Tensor v_codes, Tensor page_meta, const Tensor& k,
                          const Tensor& v, const Tensor& block_table, const Tensor& start, const Tensor& lengths) {
  const char* op = "paged_kv_append_";
  const PagedLayout l = check_append_args(op, k_codes, k_scale, v_codes, page_meta, k, v, block_table, start, lengths);
  const int dev = k_codes.get_device_index();
  for (const Tensor* t :
       std::initializer_list<const Tensor*>{&k_scale, &v_codes, &page_meta, &k, &v, &block_table, &start, &lengths})
    TERSOR_CHECK_VALUE(t->is_cuda() && t->get_device_index() == dev, op, ": every tensor must be on ",
                       device_str(k_codes), ", got ", device_str(*t));
  const CudaDeviceGuard guard(k_codes);
#ifndef TERSOR_DECODE_F16
  TERSOR_CHECK_NOT_IMPL(false, op, ": this build has no CUDA paged-cache kernels (TORCH_CUDA_ARCH_LIST without 8.0 "
                        "/ 8.9 / 9.0a); append on CPU tensors runs the twin");
  (void)l;
#else
  const int64_t B = k.size(0), L = k.size(1);
  TERSOR_CHECK_VALUE(B * l.heads_kv < (int64_t{1} << 31) && B * L * l.heads_kv < (int64_t{1} << 33), op,
                     ": too many (sequence, head) pairs or tokens for one CUDA call");
  const Tensor kf = as_contiguous(as_dtype(k, ScalarType::Float));  // the twin's widening, exactly
  const Tensor vf = as_contiguous(as_dtype(v, ScalarType::Float));
  const Tensor bt = as_contiguous(block_table), st = as_contiguous(start), ln = as_contiguous(lengths);
  Tensor stats = empty({B * l.heads_kv * 2 * l.head_dim}, ScalarType::Float, k.device());
  PagedAppendArgs a{};
  a.batch = B;
  a.len = L;
  a.heads_kv = l.heads_kv;
  a.head_dim = l.head_dim;
  a.page_size = l.page_size;
  a.num_pages = l.num_pages;
  a.max_pages = bt.size(1);
  a.k = kf.const_data_ptr<float>();
  a.v = vf.const_data_ptr<float>();
  a.block_table = bt.const_data_ptr<int32_t>();
  a.start = st.const_data_ptr<int32_t>();
  a.lengths = ln.const_data_ptr<int32_t>();
  a.k_codes = k_codes.mutable_data_ptr<int8_t>();
  a.k_scale = k_scale.mutable_data_ptr<float>();
  a.v_codes = v_codes.mutable_data_ptr<uint8_t>();
  a.page_meta = page_meta.mutable_data_ptr<float>();
  a.stats = stats.mutable_data_ptr<float>();
  TERSOR_CUDA_CHECK(paged_append_cuda_launch(a, current_cuda_stream(dev)));
#endif
}

std::tuple<Tensor, Tensor> sage_decode_paged_cuda(const Tensor& q, const Tensor& k_codes, const Tensor& k_scale,
                                                  const Tensor& v_codes, const Tensor& page_meta,
                                                  const Tensor& block_table, const Tensor& seqlens, double scale,
                                                  int64_t window_left, int64_t window_right, int64_t num_workers) {
  const char* op = "sage_decode_paged";
  const DecodeCall c = check_decode_args(op, q, k_codes, k_scale, v_codes, page_meta, block_table, seqlens, scale,
                                         num_workers);
  const int dev = q.get_device_index();
  for (const Tensor* t : {&k_codes, &k_scale, &v_codes, &page_meta, &block_table, &seqlens})
    TERSOR_CHECK_VALUE(t->is_cuda() && t->get_device_index() == dev, op, ": every tensor must be on ", device_str(q),
                       ", got ", device_str(*t));
  const CudaDeviceGuard guard(q);
  const int cc = compute_capability(dev);
  TERSOR_CHECK_NOT_IMPL(cc >= 80, op, ": the CUDA decode needs compute capability 8.0+ (mma.sync s8), this device "
                        "has ", cc / 10, ".", cc % 10, " (decode on CPU tensors runs the twin)");
  TERSOR_CHECK_NOT_IMPL(cc < 100, op, ": this build's CUDA decode kernels are compiled for sm_80, sm_89 and sm_90a "
                        "only, this device has compute capability ", cc / 10, ".", cc % 10,
                        " (decode on CPU tensors runs the twin)");
#ifndef TERSOR_DECODE_F16
  TERSOR_CHECK_NOT_IMPL(false, op, ": this build has no CUDA decode kernels (TORCH_CUDA_ARCH_LIST without 8.0 / "
                        "8.9 / 9.0a); decode on CPU tensors runs the twin");
  return {};
#else
  const PagedLayout& l = c.l;
  const Tensor bt = as_contiguous(block_table), sl = as_contiguous(seqlens);
  const int64_t max_pages = bt.size(1);
  int sms = 0;
  TERSOR_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  const DecodePlan plan = plan_decode(c, max_pages, num_workers, sms);
  const int64_t rows = plan.rows, row_blocks = plan.row_blocks, max_splits = plan.max_splits;
  TERSOR_CHECK_VALUE(c.batch * l.heads_kv <= 65535 && row_blocks <= 65535 && max_splits < (int64_t{1} << 31), op,
                     ": at most 65535 (sequence, KV head) pairs and 65535 blocks of 16 rows per KV head on CUDA, got ",
                     c.batch * l.heads_kv, " and ", row_blocks);
  bool fp8 = false;
#ifdef TERSOR_DECODE_E4M3
  fp8 = cc == 89;
#endif
  int smem_limit = 0;
  TERSOR_CUDA_CHECK(cudaDeviceGetAttribute(&smem_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  const int64_t smem = decode_smem_bytes(l.head_dim, fp8);
  TERSOR_CHECK_NOT_IMPL(smem <= smem_limit, op, ": the decode kernel at head_dim ", l.head_dim, " needs ", smem,
                        " bytes of shared memory, the device has ", smem_limit);

  const Tensor qf = as_contiguous(as_dtype(q, ScalarType::Float));  // the twin's widening, exactly
  Tensor out = empty({c.batch, c.len_q, c.heads_q, l.head_dim}, ScalarType::Float, q.device());
  Tensor lse = empty({c.batch, c.heads_q, c.len_q}, ScalarType::Float, q.device());
  Tensor ws_acc = empty({c.batch * l.heads_kv * max_splits * rows * l.head_dim}, ScalarType::Float, q.device());
  Tensor ws_ml = empty({c.batch * l.heads_kv * max_splits * rows * 2}, ScalarType::Float, q.device());
  Tensor ws_quota = empty({1}, ScalarType::Long, q.device());
  DecodeArgs a = decode_args(c, plan, qf, k_codes, k_scale, v_codes, page_meta, bt, sl, scale, window_left,
                             window_right);
  a.ws_acc = ws_acc.mutable_data_ptr<float>();
  a.ws_ml = ws_ml.mutable_data_ptr<float>();
  a.ws_quota = ws_quota.mutable_data_ptr<int64_t>();
  a.out = out.mutable_data_ptr<float>();
  a.lse = lse.mutable_data_ptr<float>();
  const cudaStream_t stream = current_cuda_stream(dev);
#ifdef TERSOR_DECODE_E4M3
  if (fp8) {
    TERSOR_CUDA_CHECK(decode_paged_cuda_launch_e4m3(a, stream));
    return {as_dtype(out, q.scalar_type()), lse};
  }
#endif
  TERSOR_CUDA_CHECK(decode_paged_cuda_launch_f16(a, stream));
  return {as_dtype(out, q.scalar_type()), lse};
#endif
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(tersor, CUDA, m) {
  m.impl("paged_kv_append_", TORCH_BOX(&paged_kv_append_cuda));
  m.impl("sage_decode_paged", TORCH_BOX(&sage_decode_paged_cuda));
}

}  // namespace tersor::attention
