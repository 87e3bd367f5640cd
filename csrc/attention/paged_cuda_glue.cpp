// CUDA registrations of the paged-KV-cache ops. The decode kernels of issue 15 (split-KV / stream-K over the
// pages, GQA rows packed into the MMA's M, an LSE merge) and the quantize-on-write kernel are not written yet:
// on CUDA tensors both ops raise NotImplementedError (the error contract's "mode not supported on this
// device"), naming the CPU twin that does run. They are registered so that a CUDA tensor gets that message
// instead of the dispatcher's "no kernel for CUDA".
#include <tuple>

#include "common/torch_glue.h"

namespace tersor::attention {
namespace {

void paged_kv_append_cuda(Tensor, Tensor, Tensor, Tensor, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                          const Tensor&) {
  TERSOR_CHECK_NOT_IMPL(false, "paged_kv_append_: the quantized paged KV cache has no CUDA kernel yet (issue 15); "
                        "it runs on CPU tensors (the reference twin)");
}

std::tuple<Tensor, Tensor> sage_decode_paged_cuda(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                  const Tensor&, const Tensor&, const Tensor&, double, int64_t,
                                                  int64_t, int64_t) {
  TERSOR_CHECK_NOT_IMPL(false, "sage_decode_paged: the decode kernels have no CUDA implementation yet (issue 15); "
                        "they run on CPU tensors (the reference twin)");
  return {};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(tersor, CUDA, m) {
  m.impl("paged_kv_append_", TORCH_BOX(&paged_kv_append_cuda));
  m.impl("sage_decode_paged", TORCH_BOX(&sage_decode_paged_cuda));
}

}  // namespace tersor::attention
