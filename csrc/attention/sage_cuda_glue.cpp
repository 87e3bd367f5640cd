// CUDA registration of sage_attention_fwd, stage 1: the CUDA kernels are not written yet, so a CUDA build
// runs the CPU twin on host copies (correct, slow, warns once). This keeps the op contract (every public op
// has a CUDA kernel in a CUDA build) and lets CUDA callers get the twin's exact numerics until the sm80/89/
// 90a kernels replace this file's body. tersor.attention.route_sdpa keeps CUDA calls on SDPA meanwhile.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <tuple>

namespace tersor::attention {
namespace {

std::tuple<at::Tensor, at::Tensor> sage_attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& v, bool is_causal, double scale,
                                                           int64_t qk_bits, c10::string_view pv, bool smooth_k,
                                                           bool smooth_q) {
  TORCH_CHECK(q.device() == k.device() && q.device() == v.device(),
              "sage_attention_fwd: q, k, v must be on the same device, got ", q.device(), ", ", k.device(), ", ",
              v.device());
  TORCH_WARN_ONCE("sage_attention_fwd: no CUDA kernel yet (stage 2); running the CPU twin on host copies");
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("tersor::sage_attention_fwd", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                       const at::Tensor&, bool, double, int64_t,
                                                                       c10::string_view, bool, bool)>();
  auto [out, lse] = op.call(q.cpu(), k.cpu(), v.cpu(), is_causal, scale, qk_bits, pv, smooth_k, smooth_q);
  return {out.to(q.device()), lse.to(q.device())};
}

}  // namespace

TORCH_LIBRARY_IMPL(tersor, CUDA, m) { m.impl("sage_attention_fwd", &sage_attention_fwd_cuda); }

}  // namespace tersor::attention
