// CUDA implementations of the codebook ops (torch glue; kernels in e8p_cuda.cu and aqlm_cuda.cu). Which
// kernel runs is codebook_route (codebook_route.h): one host function, tested on the CPU for every
// compute capability through _codebook_route. A device it has no kernel for raises NotImplementedError.
#include <optional>
#include <vector>

#include "codebook/codebook_cuda.h"
#include "codebook/codebook_glue.h"
#include "codebook/codebook_route.h"
#include "common/cuda_glue.h"

namespace tersor::codebook {
namespace {

Tensor aligned16(const Tensor& t) {
  Tensor c = as_contiguous(t);
  return is_aligned(c.const_data_ptr(), 16) ? c : torch::stable::clone(c);
}

// The route of `op` on x's device; NotImplementedError where the device has no codebook kernel.
CodebookPath route_or_throw(CodebookOp op, const Tensor& t, int64_t rows, int64_t codebook_entries = 0) {
  TERSOR_CHECK(t.is_cuda(), codebook_op_name(op), " (CUDA kernel): expected CUDA tensors, got ", device_str(t));
  const int cc = compute_capability(t.get_device_index());
  const CodebookPath p = codebook_route(op, cc, rows, codebook_entries);
  TERSOR_CHECK_NOT_IMPL(p != CodebookPath::kUnsupported, codebook_unsupported_message(op, cc));
  return p;
}

E8PKernelArgs e8p_args(const E8PCall& c, const Tensor& q) {
  E8PKernelArgs a;
  a.qidxs = q.const_data_ptr<int64_t>();
  a.m = c.m;
  a.n = c.n;
  a.row_words = c.row_words;
  a.bits = c.bits;
  a.resid_scale = c.resid_scale;
  return a;
}

Tensor e8p_decode_cuda(const Tensor& qidxs, int64_t in_features, std::optional<double> resid_scale,
                       std::optional<ScalarType> dtype) {
  constexpr const char* op = "e8p_decode";
  const E8PCall c = check_e8p_call(qidxs, in_features, resid_scale, op);
  const ScalarType out_t = decode_dtype(dtype, ScalarType::Float, op);
  const DType kt = to_kernel_dtype(out_t, op);
  route_or_throw(CodebookOp::kE8PDecode, qidxs, 0);
  const CudaDeviceGuard guard(qidxs);
  const Tensor q = aligned16(qidxs);
  Tensor out = empty({c.m, c.n}, out_t, q.device());
  TERSOR_CUDA_CHECK(launch_e8p_decode(e8p_args(c, q), out.mutable_data_ptr(), kt,
                                      current_cuda_stream(qidxs.get_device_index())));
  return out;
}

// fp16 x fp16 -> fp32 (aten::mm.dtype, in every torch >= 2.11), so that large products cannot overflow
// fp16 on the way out.
Tensor mm_f16_to_f32(const Tensor& a, const Tensor& b) {
  return call_aten("aten::mm", "dtype", a, b, ScalarType::Float);
}

Tensor e8p_linear_cuda(const Tensor& x, const Tensor& qidxs, int64_t in_features, std::optional<double> resid_scale) {
  constexpr const char* op = "e8p_linear";
  const E8PCall c = check_e8p_call(qidxs, in_features, resid_scale, op);
  const std::vector<int64_t> out_shape = check_linear_inputs(x, std::nullopt, qidxs, c.n, c.m, op);
  const CudaDeviceGuard guard(qidxs);
  const int64_t B = c.n ? x.numel() / c.n : 0;
  const CodebookPath path = route_or_throw(CodebookOp::kE8PLinear, qidxs, B);
  if (path == CodebookPath::kEmpty) return empty(out_shape, ScalarType::Float, x.device());
  // The tensor cores multiply fp16 x (QuIP#'s kernels do the same).
  const Tensor x16 = aligned16(as_dtype(torch::stable::reshape(x, {-1, c.n}), ScalarType::Half));
  const Tensor q = aligned16(qidxs);
  const cudaStream_t stream = current_cuda_stream(qidxs.get_device_index());
  if (path == CodebookPath::kE8PDecodeMatmul) {
    Tensor w16 = empty({c.m, c.n}, ScalarType::Half, q.device());
    TERSOR_CUDA_CHECK(launch_e8p_decode(e8p_args(c, q), w16.mutable_data_ptr(), DType::kFloat16, stream));
    return torch::stable::reshape(mm_f16_to_f32(x16, torch::stable::transpose(w16, 0, 1)), out_shape);
  }
  Tensor z = empty({B, c.m}, ScalarType::Float, x16.device());
  TERSOR_CUDA_CHECK(launch_e8p_gemv(e8p_args(c, q), x16.const_data_ptr(), static_cast<int>(B),
                                    z.mutable_data_ptr<float>(), stream));
  return torch::stable::reshape(z, out_shape);
}

struct AQLMDeviceTensors {
  Tensor codes, codebooks, scales;
};

AQLMDeviceTensors aqlm_tensors(const Tensor& codes, const Tensor& codebooks, const Tensor& scales) {
  return {aligned16(codes), aligned16(as_dtype(codebooks, ScalarType::Float)),
          as_contiguous(torch::stable::reshape(as_dtype(scales, ScalarType::Float), {-1}))};
}

AQLMKernelArgs aqlm_args(const AQLMCall& c, const AQLMDeviceTensors& t) {
  AQLMKernelArgs a;
  a.codes = t.codes.const_data_ptr();
  a.codes_int16 = t.codes.scalar_type() == ScalarType::Short;
  a.codebooks = t.codebooks.const_data_ptr<float>();
  a.scales = t.scales.const_data_ptr<float>();
  a.out = c.out;
  a.groups = c.groups;
  a.num_codebooks = c.num_codebooks;
  a.nbits = c.nbits;
  a.index_mask = c.index_mask;
  return a;
}

Tensor aqlm_decode_cuda(const Tensor& codes, const Tensor& codebooks, const Tensor& scales,
                        std::optional<ScalarType> dtype) {
  constexpr const char* op = "aqlm_decode";
  const AQLMCall c = check_aqlm_call(codes, codebooks, scales, op);
  const ScalarType out_t = decode_dtype(dtype, codebooks.scalar_type(), op);
  const DType kt = to_kernel_dtype(out_t, op);
  route_or_throw(CodebookOp::kAQLMDecode, codes, 0);
  const CudaDeviceGuard guard(codes);
  const AQLMDeviceTensors t = aqlm_tensors(codes, codebooks, scales);
  Tensor out = empty({c.out, c.in}, out_t, codes.device());
  TERSOR_CUDA_CHECK(launch_aqlm_decode(aqlm_args(c, t), out.mutable_data_ptr(), kt,
                                       current_cuda_stream(codes.get_device_index())));
  return out;
}

Tensor aqlm_linear_cuda(const Tensor& x, const Tensor& codes, const Tensor& codebooks, const Tensor& scales,
                        const std::optional<Tensor>& bias) {
  constexpr const char* op = "aqlm_linear";
  const AQLMCall c = check_aqlm_call(codes, codebooks, scales, op);
  const std::vector<int64_t> out_shape = check_linear_inputs(x, bias, codes, c.in, c.out, op);
  const DType xt = to_kernel_dtype(x.scalar_type(), op);
  const CudaDeviceGuard guard(codes);
  const int64_t B = x.numel() / c.in;
  const CodebookPath path =
      route_or_throw(CodebookOp::kAQLMLinear, codes, B, int64_t{c.num_codebooks} << c.nbits);
  if (path == CodebookPath::kEmpty) return empty(out_shape, x.scalar_type(), x.device());
  const Tensor x2 = aligned16(torch::stable::reshape(x, {-1, c.in}));
  const AQLMDeviceTensors t = aqlm_tensors(codes, codebooks, scales);
  const cudaStream_t stream = current_cuda_stream(codes.get_device_index());
  if (path == CodebookPath::kAQLMDecodeLinear) {
    Tensor w = empty({c.out, c.in}, x.scalar_type(), x.device());
    TERSOR_CUDA_CHECK(launch_aqlm_decode(aqlm_args(c, t), w.mutable_data_ptr(), xt, stream));
    std::optional<Tensor> b;
    if (bias) b = as_dtype(*bias, x.scalar_type());
    return torch::stable::reshape(linear(x2, w, b), out_shape);
  }
  // kAQLMGemvSmem / kAQLMGemvL2: the launcher stages the codebooks by the same aqlm_gemv_uses_smem.
  std::optional<Tensor> bias_f;
  if (bias) bias_f = as_contiguous(as_dtype(*bias, ScalarType::Float));
  Tensor y = empty({B, c.out}, x.scalar_type(), x.device());
  TERSOR_CUDA_CHECK(launch_aqlm_gemv(aqlm_args(c, t), x2.const_data_ptr(), xt, static_cast<int>(B),
                                     bias_f ? bias_f->const_data_ptr<float>() : nullptr, y.mutable_data_ptr(),
                                     stream));
  return torch::stable::reshape(y, out_shape);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(tersor, CUDA, m) {
  m.impl("e8p_decode", TORCH_BOX(&e8p_decode_cuda));
  m.impl("e8p_linear", TORCH_BOX(&e8p_linear_cuda));
  m.impl("aqlm_decode", TORCH_BOX(&aqlm_decode_cuda));
  m.impl("aqlm_linear", TORCH_BOX(&aqlm_linear_cuda));
}

}  // namespace tersor::codebook
