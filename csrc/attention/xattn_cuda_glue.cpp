// CUDA registration of xattention_mask: the checks of the CPU op (xattn_glue.h), then the fused scoring kernel
// (xattn_cuda.cu). CUDA path compiled, not run.
#include <tuple>

#include "attention/xattn_cuda.h"
#include "attention/xattn_glue.h"
#include "common/cuda_glue.h"

namespace tersor::attention {
namespace {

std::tuple<Tensor, Tensor> xattention_mask_cuda(const Tensor& q, const Tensor& k, int64_t block_size, int64_t stride,
                                                double threshold, bool is_causal, double scale) {
  const char* op = "xattention_mask";
  const XattnCall c = check_xattn(q, k, block_size, stride, threshold, is_causal, scale);
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
  const int64_t smem = xattn_smem_bytes(a);
  int dev = q.get_device_index(), limit = 0;
  TERSOR_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  TERSOR_CHECK_NOT_IMPL(smem <= limit, op, ": the CUDA kernel keeps a query block's strided rows and the key blocks' "
                        "masses in shared memory: ", smem, " bytes needed, the device has ", limit,
                        " (use a smaller block_size, or the CPU)");
  TERSOR_CHECK_NOT_IMPL(c.batch * c.heads_q * c.q_blocks < (int64_t{1} << 31), op,
                        ": at most 2^31 - 1 (batch, head, query block) triples on CUDA");
  TERSOR_CUDA_CHECK(xattention_mask_cuda_launch(a, current_cuda_stream(dev)));
  return {mask, mass};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(tersor, CUDA, m) { m.impl("xattention_mask", TORCH_BOX(&xattention_mask_cuda)); }

}  // namespace tersor::attention
