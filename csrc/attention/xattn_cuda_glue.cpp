// CUDA registration of xattention_mask: the checks of the CPU op (xattn_glue.h), then the fused scoring kernel
// (xattn_cuda.cu). CUDA path compiled, not run.
#include <string>
#include <tuple>

#include "attention/xattn_cuda.h"
#include "attention/xattn_glue.h"
#include "common/cuda_glue.h"

namespace tersor::attention {
namespace {

std::tuple<Tensor, Tensor> xattention_mask_cuda(const Tensor& q, const Tensor& k, int64_t block_size, int64_t stride,
                                                double threshold, bool is_causal, double scale, std::string qk) {
  const char* op = "xattention_mask";
  const XattnCall c = check_xattn(q, k, block_size, stride, threshold, is_causal, scale, qk);
  TERSOR_CHECK_VALUE(q.is_cuda() && k.is_cuda() && q.get_device_index() == k.get_device_index(), op,
                     ": q and k must be on the same device, got ", device_str(q), ", ", device_str(k));
  const CudaDeviceGuard guard(q);
  const Tensor qc = q.stride(3) == 1 ? q : as_contiguous(q);
  const Tensor kc = k.stride(3) == 1 ? k : as_contiguous(k);
  Tensor mask = empty({c.batch, c.heads_q, c.q_blocks, c.k_blocks}, ScalarType::Bool, q.device());
  Tensor mass = empty({c.batch, c.heads_q, c.q_blocks, c.k_blocks}, ScalarType::Float, q.device());
  XattnArgs a{};
  a.batch = c.batch;
  a.heads_q = c.heads_q;
  a.heads_kv = c.heads_kv;
  a.len_q = c.len_q;
  a.len_k = c.len_k;
  a.head_dim = c.head_dim;
  a.block = c.block;
  a.stride = c.stride;
  a.q_blocks = c.q_blocks;
  a.k_blocks = c.k_blocks;
  a.sq_b = qc.stride(0);
  a.sq_h = qc.stride(1);
  a.sq_l = qc.stride(2);
  a.sk_b = kc.stride(0);
  a.sk_h = kc.stride(1);
  a.sk_l = kc.stride(2);
  a.dtype = to_kernel_dtype(q.scalar_type(), op);
  a.q = qc.const_data_ptr();
  a.k = kc.const_data_ptr();
  a.scale = static_cast<float>(c.scale);
  a.threshold = c.threshold;
  a.causal = c.causal;
  a.mask = static_cast<uint8_t*>(mask.mutable_data_ptr());
  a.mass = mass.mutable_data_ptr<float>();
  const int64_t smem = c.int8 ? xattn_int8_smem_bytes(a) : xattn_smem_bytes(a);
  int dev = q.get_device_index(), limit = 0;
  TERSOR_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  TERSOR_CHECK_NOT_IMPL(smem <= limit, op, ": the CUDA kernel keeps a query block's strided rows and the key blocks' "
                        "masses in shared memory: ", smem, " bytes needed, the device has ", limit,
                        " (use a smaller block_size, or the CPU)");
  TERSOR_CHECK_NOT_IMPL(c.batch * c.heads_q * c.q_blocks < (int64_t{1} << 31), op,
                        ": at most 2^31 - 1 (batch, head, query block) triples on CUDA");
  if (!c.int8) {
    TERSOR_CUDA_CHECK(xattention_mask_cuda_launch(a, current_cuda_stream(dev)));
    return {mask, mass};
  }
#ifdef TERSOR_XATTN_INT8_ARCHS
  TERSOR_CHECK_NOT_IMPL((c.block / c.stride) % 8 == 0 && (c.stride * c.head_dim) % 32 == 0, op,
                        ": qk=\"int8\" on CUDA needs (block_size / stride) % 8 == 0 and (stride * head_dim) % 32 == 0 "
                        "(8-key MMA tiles inside one block, 32-byte k-steps), got block_size ", c.block, ", stride ",
                        c.stride, ", head_dim ", c.head_dim, " (use qk=\"none\")");
  TERSOR_CHECK_NOT_IMPL(compute_capability(dev) >= 80, op, ": qk=\"int8\" needs compute capability 8.0+");
  int64_t q_rows = 0, k_rows = 0;
  xattn_int8_scratch_sizes(a, &q_rows, &k_rows);
  const int64_t sd = c.stride * c.head_dim;
  Tensor q_codes = empty({q_rows, sd}, ScalarType::Char, q.device());
  Tensor k_codes = empty({k_rows, sd}, ScalarType::Char, q.device());
  Tensor q_scale = empty({q_rows}, ScalarType::Float, q.device());
  Tensor k_scale = empty({k_rows}, ScalarType::Float, q.device());
  const XattnInt8Scratch s{q_codes.mutable_data_ptr<int8_t>(), q_scale.mutable_data_ptr<float>(),
                           k_codes.mutable_data_ptr<int8_t>(), k_scale.mutable_data_ptr<float>()};
  TERSOR_CUDA_CHECK(xattention_mask_int8_cuda_launch(a, s, current_cuda_stream(dev)));
  return {mask, mass};
#else
  TERSOR_CHECK_NOT_IMPL(false, op, ": qk=\"int8\" has no CUDA kernel in this build (use qk=\"none\")");
  return {mask, mass};
#endif
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(tersor, CUDA, m) { m.impl("xattention_mask", TORCH_BOX(&xattention_mask_cuda)); }

}  // namespace tersor::attention
