// CUDA implementations of the codebook ops (torch glue; kernels in e8p_cuda.cu and aqlm_cuda.cu).
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/matmul.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "codebook/codebook_cuda.h"
#include "codebook/codebook_glue.h"
#include "common/torch_glue.h"

namespace tersor::codebook {
namespace {

at::Tensor aligned16(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return is_aligned(c.const_data_ptr(), 16) ? c : c.clone();
}

E8PKernelArgs e8p_args(const E8PCall& c, const at::Tensor& q) {
  E8PKernelArgs a;
  a.qidxs = q.const_data_ptr<int64_t>();
  a.m = c.m;
  a.n = c.n;
  a.row_words = c.row_words;
  a.bits = c.bits;
  a.resid_scale = c.resid_scale;
  return a;
}

at::Tensor e8p_decode_cuda(const at::Tensor& qidxs, int64_t in_features, std::optional<double> resid_scale,
                           std::optional<c10::ScalarType> dtype) {
  constexpr const char* op = "e8p_decode";
  const E8PCall c = check_e8p_call(qidxs, in_features, resid_scale, op);
  const c10::ScalarType out_t = decode_dtype(dtype, at::kFloat, op);
  const DType kt = to_kernel_dtype(out_t, op);
  const c10::cuda::CUDAGuard guard(qidxs.device());
  const at::Tensor q = aligned16(qidxs);
  at::Tensor out = at::empty({c.m, c.n}, q.options().dtype(out_t));
  C10_CUDA_CHECK(launch_e8p_decode(e8p_args(c, q), out.mutable_data_ptr(), kt, c10::cuda::getCurrentCUDAStream()));
  return out;
}

// fp16 x fp16 -> fp32 matmul where this torch has aten::mm.dtype (so large products cannot overflow
// fp16 on the way out); otherwise fp16 out, widened.
at::Tensor mm_f16_to_f32(const at::Tensor& a, const at::Tensor& b) {
  static const auto handle = c10::Dispatcher::singleton().findSchema({"aten::mm", "dtype"});
  if (handle) {
    return handle->typed<at::Tensor(const at::Tensor&, const at::Tensor&, c10::ScalarType)>().call(a, b, at::kFloat);
  }
  return at::matmul(a, b).to(at::kFloat);
}

at::Tensor e8p_linear_cuda(const at::Tensor& x, const at::Tensor& qidxs, int64_t in_features,
                           std::optional<double> resid_scale) {
  constexpr const char* op = "e8p_linear";
  const E8PCall c = check_e8p_call(qidxs, in_features, resid_scale, op);
  const std::vector<int64_t> out_shape = check_linear_inputs(x, std::nullopt, qidxs, c.n, c.m, op);
  const c10::cuda::CUDAGuard guard(qidxs.device());
  // The tensor cores multiply fp16 x (QuIP#'s kernels do the same).
  const at::Tensor x16 = aligned16(x.reshape({-1, c.n}).to(at::kHalf));
  const int64_t B = x16.size(0);
  if (B == 0) return at::empty(out_shape, x.options().dtype(at::kFloat));
  const at::Tensor q = aligned16(qidxs);
  if (B > E8PGemvTraits::kMaxBatch) {
    at::Tensor w16 = at::empty({c.m, c.n}, q.options().dtype(at::kHalf));
    C10_CUDA_CHECK(launch_e8p_decode(e8p_args(c, q), w16.mutable_data_ptr(), DType::kFloat16,
                                     c10::cuda::getCurrentCUDAStream()));
    return mm_f16_to_f32(x16, w16.t()).reshape(out_shape);
  }
  at::Tensor z = at::empty({B, c.m}, x16.options().dtype(at::kFloat));
  C10_CUDA_CHECK(launch_e8p_gemv(e8p_args(c, q), x16.const_data_ptr(), static_cast<int>(B), z.mutable_data_ptr<float>(),
                                 c10::cuda::getCurrentCUDAStream()));
  return z.reshape(out_shape);
}

struct AQLMDeviceTensors {
  at::Tensor codes, codebooks, scales;
};

AQLMDeviceTensors aqlm_tensors(const at::Tensor& codes, const at::Tensor& codebooks, const at::Tensor& scales) {
  return {aligned16(codes), aligned16(codebooks.to(at::kFloat)), scales.to(at::kFloat).reshape({-1}).contiguous()};
}

AQLMKernelArgs aqlm_args(const AQLMCall& c, const AQLMDeviceTensors& t) {
  AQLMKernelArgs a;
  a.codes = t.codes.const_data_ptr();
  a.codes_int16 = t.codes.scalar_type() == at::kShort;
  a.codebooks = t.codebooks.const_data_ptr<float>();
  a.scales = t.scales.const_data_ptr<float>();
  a.out = c.out;
  a.groups = c.groups;
  a.num_codebooks = c.num_codebooks;
  a.nbits = c.nbits;
  a.index_mask = c.index_mask;
  return a;
}

at::Tensor aqlm_decode_cuda(const at::Tensor& codes, const at::Tensor& codebooks, const at::Tensor& scales,
                            std::optional<c10::ScalarType> dtype) {
  constexpr const char* op = "aqlm_decode";
  const AQLMCall c = check_aqlm_call(codes, codebooks, scales, op);
  TORCH_CHECK(codes.is_cuda(), op, " (CUDA kernel): expected CUDA tensors, got ", codes.device());
  const c10::ScalarType out_t = decode_dtype(dtype, codebooks.scalar_type(), op);
  const DType kt = to_kernel_dtype(out_t, op);
  const c10::cuda::CUDAGuard guard(codes.device());
  const AQLMDeviceTensors t = aqlm_tensors(codes, codebooks, scales);
  at::Tensor out = at::empty({c.out, c.in}, codes.options().dtype(out_t));
  C10_CUDA_CHECK(launch_aqlm_decode(aqlm_args(c, t), out.mutable_data_ptr(), kt, c10::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor aqlm_linear_cuda(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& codebooks,
                            const at::Tensor& scales, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "aqlm_linear";
  const AQLMCall c = check_aqlm_call(codes, codebooks, scales, op);
  const std::vector<int64_t> out_shape = check_linear_inputs(x, bias, codes, c.in, c.out, op);
  const DType xt = to_kernel_dtype(x.scalar_type(), op);
  const c10::cuda::CUDAGuard guard(codes.device());
  const at::Tensor x2 = aligned16(x.reshape({-1, c.in}));
  const int64_t B = x2.size(0);
  if (B == 0) return at::empty(out_shape, x.options());
  const AQLMDeviceTensors t = aqlm_tensors(codes, codebooks, scales);
  if (B > AQLMGemvTraits::kMaxBatch) {
    at::Tensor w = at::empty({c.out, c.in}, x.options());
    C10_CUDA_CHECK(launch_aqlm_decode(aqlm_args(c, t), w.mutable_data_ptr(), xt, c10::cuda::getCurrentCUDAStream()));
    std::optional<at::Tensor> b;
    if (bias) b = bias->to(x.scalar_type());
    return at::linear(x2, w, b).reshape(out_shape);
  }
  at::Tensor bias_f;
  if (bias) bias_f = bias->to(at::kFloat).contiguous();
  at::Tensor y = at::empty({B, c.out}, x.options());
  C10_CUDA_CHECK(launch_aqlm_gemv(aqlm_args(c, t), x2.const_data_ptr(), xt, static_cast<int>(B),
                                  bias ? bias_f.const_data_ptr<float>() : nullptr, y.mutable_data_ptr(),
                                  c10::cuda::getCurrentCUDAStream()));
  return y.reshape(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(tersor, CUDA, m) {
  m.impl("e8p_decode", &e8p_decode_cuda);
  m.impl("e8p_linear", &e8p_linear_cuda);
  m.impl("aqlm_decode", &aqlm_decode_cuda);
  m.impl("aqlm_linear", &aqlm_linear_cuda);
}

}  // namespace tersor::codebook
