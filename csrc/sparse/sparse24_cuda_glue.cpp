// CUDA implementations of the 2:4 ops (torch glue; kernels in sparse24_cuda.cu, sparse24_gemm_cuda.cu and
// sparse24_wgmma_sm90.cu).
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common/cuda_glue.h"
#include "common/torch_glue.h"
#include "sparse/sparse24_cuda.h"
#include "sparse/sparse24_glue.h"
#include "sparse/sparse24_route.h"

namespace tersor::sparse24 {
namespace {

Tensor aligned16(const Tensor& t) {
  Tensor c = as_contiguous(t);
  return is_aligned(c.const_data_ptr(), 16) ? c : torch::stable::clone(c);
}

struct DevicePacked {
  Tensor values, meta;
  Sparse24Args args;
};

DevicePacked device_packed(const Tensor& values, const Tensor& meta, const Shape& s, const char* op) {
  TERSOR_CHECK(values.is_cuda(), op, " (CUDA kernel): expected CUDA tensors, got ", device_str(values));
  DevicePacked d{aligned16(values), aligned16(meta), {}};  // both are read with 16-byte (cp.async) copies
  d.args.values = d.values.const_data_ptr();
  d.args.meta = reinterpret_cast<const uint32_t*>(d.meta.const_data_ptr<int32_t>());
  d.args.M = s.M;
  d.args.K = s.K;
  d.args.dtype = to_kernel_dtype(values.scalar_type(), op);
  return d;
}

std::tuple<Tensor, Tensor> compress_cuda(const Tensor& weight) {
  constexpr const char* op = "sparse24_compress";
  check_value_dtype(weight.scalar_type(), op, "weight");
  TERSOR_CHECK_VALUE(weight.dim() == 2, op, ": weight must be 2-d [out_features, in_features], got shape ",
                     sizes_str(weight));
  const int64_t M = weight.size(0), K = weight.size(1);
  TERSOR_CHECK_VALUE(M > 0 && M % kRowAlign == 0 && K > 0 && K % kColAlign == 0, op,
                     ": weight [M, K] needs M a positive multiple of ", kRowAlign, " and K a positive multiple of ",
                     kColAlign, " (format v1 tiles), got shape ", sizes_str(weight));
  const CudaDeviceGuard guard(weight);
  const Tensor w = aligned16(weight);
  Tensor values = empty({M / kRowAlign, K / kTileK, kTileElems}, w.scalar_type(), w.device());
  Tensor meta = empty({M / kRowAlign, K / kColAlign, 32}, ScalarType::Int, w.device());
  Tensor bad = zeros({1}, ScalarType::Int, w.device());
  TERSOR_CUDA_CHECK(launch_sparse24_compress(w.const_data_ptr(), M, K, values.mutable_data_ptr(),
                                             reinterpret_cast<uint32_t*>(meta.mutable_data_ptr<int32_t>()),
                                             bad.mutable_data_ptr<int>(), current_cuda_stream(w.get_device_index())));
  // Compression is an offline step: synchronizing to report a weight that is not 2:4 is fine. The error
  // names the first offending chunk, as the CPU op's does.
  const Tensor bad_h = torch::stable::to(bad, Device(DeviceType::CPU));
  if (bad_h.const_data_ptr<int32_t>()[0] != 0) {
    const Tensor w_h = torch::stable::to(w, Device(DeviceType::CPU));
    throw_first_bad_chunk(reinterpret_cast<const uint16_t*>(w_h.const_data_ptr()), M, K);
    TERSOR_CHECK_VALUE(false, op, ": the weight is not 2:4 sparse (prune with tersor.sparse.prune_2_4)");
  }
  return {values, meta};
}

Tensor decompress_cuda(const Tensor& values, const Tensor& meta) {
  constexpr const char* op = "sparse24_decompress";
  const Shape s = check_packed(values, meta, op);
  const CudaDeviceGuard guard(values);
  const DevicePacked d = device_packed(values, meta, s, op);
  Tensor out = empty({s.M, s.K}, values.scalar_type(), values.device());
  TERSOR_CUDA_CHECK(
      launch_sparse24_decompress(d.args, out.mutable_data_ptr(), current_cuda_stream(values.get_device_index())));
  return out;
}

// The kernel comes from route_linear (sparse24_route.h) with this device's compute capability: `path`
// "auto" picks by rows of x, a forced kernel this device cannot run is NotImplementedError.
Tensor linear_cuda(const Tensor& x, const Tensor& values, const Tensor& meta, const std::optional<Tensor>& bias,
                   std::string path) {
  constexpr const char* op = "sparse24_linear";
  const Shape s = check_packed(values, meta, op);
  const std::vector<int64_t> out_shape = check_linear_inputs(x, bias, values, s, op);
  TERSOR_CHECK(values.is_cuda(), op, " (CUDA kernel): expected CUDA tensors, got ", device_str(values));
  const int device = values.get_device_index();
  const int64_t rows = x.numel() / s.K;
  const LinearKernel kernel = route_linear(compute_capability(device), rows, path, kBuildHasSm90Cubin, op);
  const CudaDeviceGuard guard(values);
  if (rows == 0) return empty(out_shape, x.scalar_type(), x.device());
  const Tensor x2 = aligned16(torch::stable::reshape(x, {-1, s.K}));  // x is read as 32-bit pairs
  const int64_t B = x2.size(0);
  const DevicePacked d = device_packed(values, meta, s, op);
  const cudaStream_t stream = current_cuda_stream(device);
  std::optional<Tensor> b;
  if (bias.has_value()) b = as_contiguous(*bias);
  const void* bp = b.has_value() ? b->const_data_ptr() : nullptr;
  const int64_t max_rows = kernel == LinearKernel::kGemm   ? sparse24_gemm_max_rows()
                           : kernel == LinearKernel::kSm90 ? sparse24_sm90_max_rows(s.M)
                                                           : int64_t{Sparse24GemvTraits::kMaxBatch};
  TERSOR_CHECK_VALUE(B <= max_rows, op, ": x has ", B, " rows; the CUDA '", kernel_name(kernel), "' kernel takes at most ",
                     max_rows, " rows per call for this weight (CUDA's grid limits); split x along its leading dims");
  Tensor y = empty({B, s.M}, x.scalar_type(), x.device());
  switch (kernel) {
    case LinearKernel::kGemv:
      TERSOR_CUDA_CHECK(launch_sparse24_gemv(d.args, x2.const_data_ptr(), static_cast<int>(B), bp,
                                             y.mutable_data_ptr(), stream));
      break;
    case LinearKernel::kGemm:
      TERSOR_CUDA_CHECK(launch_sparse24_gemm(d.args, x2.const_data_ptr(), B, bp, y.mutable_data_ptr(), stream));
      break;
    case LinearKernel::kSm90:
#ifdef TERSOR_SPARSE24_SM90
      TERSOR_CUDA_CHECK(
          launch_sparse24_gemm_sm90(d.args, x2.const_data_ptr(), B, bp, y.mutable_data_ptr(), stream));
      break;
#endif
    default:
      TERSOR_CHECK(false, op, ": internal error: route '", kernel_name(kernel), "' has no launcher in this build");
  }
  return torch::stable::reshape(y, out_shape);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(tersor, CUDA, m) {
  m.impl("sparse24_compress", TORCH_BOX(&compress_cuda));
  m.impl("sparse24_decompress", TORCH_BOX(&decompress_cuda));
  m.impl("sparse24_linear", TORCH_BOX(&linear_cuda));
}

}  // namespace tersor::sparse24
