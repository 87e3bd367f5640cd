// CUDA implementations of the 2:4 ops (torch glue; kernels in sparse24_cuda.cu).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "common/cuda_glue.h"
#include "common/torch_glue.h"
#include "sparse/sparse24_cuda.h"
#include "sparse/sparse24_glue.h"

namespace tersor::sparse24 {
namespace {

at::Tensor aligned16(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return is_aligned(c.const_data_ptr(), 16) ? c : c.clone();
}

struct DevicePacked {
  at::Tensor values, meta;
  Sparse24Args args;
};

DevicePacked device_packed(const at::Tensor& values, const at::Tensor& meta, const Shape& s, const char* op) {
  TORCH_CHECK(values.is_cuda(), op, " (CUDA kernel): expected CUDA tensors, got ", values.device());
  DevicePacked d{aligned16(values), aligned16(meta), {}};  // both are read with 16-byte (cp.async) copies
  d.args.values = d.values.const_data_ptr();
  d.args.meta = reinterpret_cast<const uint32_t*>(d.meta.const_data_ptr<int32_t>());
  d.args.M = s.M;
  d.args.K = s.K;
  d.args.dtype = to_kernel_dtype(values.scalar_type(), op);
  return d;
}

std::tuple<at::Tensor, at::Tensor> compress_cuda(const at::Tensor& weight) {
  constexpr const char* op = "sparse24_compress";
  check_value_dtype(weight.scalar_type(), op, "weight");
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be 2-d [out_features, in_features], got shape ",
                    weight.sizes());
  const int64_t M = weight.size(0), K = weight.size(1);
  TORCH_CHECK_VALUE(M > 0 && M % kRowAlign == 0 && K > 0 && K % kColAlign == 0, op, ": weight [M, K] needs M a positive "
                    "multiple of ", kRowAlign, " and K a positive multiple of ", kColAlign, " (format v1 tiles), got shape ",
                    weight.sizes());
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor w = aligned16(weight);
  at::Tensor values = at::empty({M / kRowAlign, K / kTileK, kTileElems}, w.options());
  at::Tensor meta = at::empty({M / kRowAlign, K / kColAlign, 32}, w.options().dtype(at::kInt));
  at::Tensor bad = at::zeros({1}, w.options().dtype(at::kInt));
  C10_CUDA_CHECK(launch_sparse24_compress(w.const_data_ptr(), M, K, values.mutable_data_ptr(),
                                          reinterpret_cast<uint32_t*>(meta.mutable_data_ptr<int32_t>()),
                                          bad.mutable_data_ptr<int>(), c10::cuda::getCurrentCUDAStream()));
  // Compression is an offline step: synchronizing to report a weight that is not 2:4 is fine. The CPU
  // op names the first offending chunk.
  if (bad.item<int>() != 0) {
    static const auto cpu_op = c10::Dispatcher::singleton()
                                   .findSchemaOrThrow("tersor::sparse24_compress", "")
                                   .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&)>();
    cpu_op.call(weight.cpu());
    TORCH_CHECK_VALUE(false, op, ": the weight is not 2:4 sparse (prune with tersor.sparse.prune_2_4)");
  }
  return {values, meta};
}

at::Tensor decompress_cuda(const at::Tensor& values, const at::Tensor& meta) {
  constexpr const char* op = "sparse24_decompress";
  const Shape s = check_packed(values, meta, op);
  const c10::cuda::CUDAGuard guard(values.device());
  const DevicePacked d = device_packed(values, meta, s, op);
  at::Tensor out = at::empty({s.M, s.K}, values.options());
  C10_CUDA_CHECK(launch_sparse24_decompress(d.args, out.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream()));
  return out;
}

// Which kernel sparse24_linear runs. Default: the GEMV up to Sparse24GemvTraits::kMaxBatch rows of x, then
// on a compute-capability 9.0 device with the sm90a cubin built the wgmma.sp GEMM from
// Sparse24Sm90Traits::kMinBatch rows, else the mma.sp GEMM. TERSOR_SPARSE24_PATH=gemv|gemm|sm90 forces one
// (tests use it to check every kernel against the CPU op; gemv only up to its row limit, sm90 only where
// it can run: otherwise an error, never a silent fallback).
enum class LinearPath { kGemv, kGemm, kSm90 };

bool sm90_kernel_usable(int device) {
#ifdef TERSOR_SPARSE24_SM90
  return compute_capability(device) == 90;
#else
  (void)device;
  return false;
#endif
}

LinearPath choose_path(int64_t rows, int device, const char* op) {
  const char* forced = std::getenv("TERSOR_SPARSE24_PATH");
  if (forced != nullptr && forced[0] != '\0') {
    if (std::strcmp(forced, "gemv") == 0) {
      TORCH_CHECK_VALUE(rows <= Sparse24GemvTraits::kMaxBatch, op, ": TERSOR_SPARSE24_PATH=gemv takes at most ",
                        Sparse24GemvTraits::kMaxBatch, " rows of x, got ", rows);
      return LinearPath::kGemv;
    }
    if (std::strcmp(forced, "gemm") == 0) return LinearPath::kGemm;
    if (std::strcmp(forced, "sm90") == 0) {
      TORCH_CHECK(sm90_kernel_usable(device), op, ": TERSOR_SPARSE24_PATH=sm90 needs a compute-capability 9.0 "
                  "device and a build with the sm90a cubin (TORCH_CUDA_ARCH_LIST containing 9.0a)");
      return LinearPath::kSm90;
    }
    TORCH_CHECK_VALUE(false, op, ": TERSOR_SPARSE24_PATH must be gemv, gemm or sm90, got '", forced, "'");
  }
  if (rows <= Sparse24GemvTraits::kMaxBatch) return LinearPath::kGemv;
  if (rows >= Sparse24Sm90Traits::kMinBatch && sm90_kernel_usable(device)) return LinearPath::kSm90;
  return LinearPath::kGemm;
}

at::Tensor linear_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                       const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "sparse24_linear";
  const Shape s = check_packed(values, meta, op);
  const std::vector<int64_t> out_shape = check_linear_inputs(x, bias, values, s, op);
  const c10::cuda::CUDAGuard guard(values.device());
  const at::Tensor x2 = aligned16(x.reshape({-1, s.K}));  // x is read as 32-bit pairs
  const int64_t B = x2.size(0);
  if (B == 0) return at::empty(out_shape, x.options());
  const DevicePacked d = device_packed(values, meta, s, op);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const void* bp = bias.has_value() ? b.const_data_ptr() : nullptr;
  at::Tensor y = at::empty({B, s.M}, x.options());
  static_assert(Sparse24GemmTraits::kMinBatch == Sparse24GemvTraits::kMaxBatch + 1, "every batch has a kernel");
  switch (choose_path(B, values.get_device(), op)) {
    case LinearPath::kGemv:
      C10_CUDA_CHECK(launch_sparse24_gemv(d.args, x2.const_data_ptr(), static_cast<int>(B), bp, y.mutable_data_ptr(),
                                          stream));
      break;
    case LinearPath::kGemm:
      C10_CUDA_CHECK(launch_sparse24_gemm(d.args, x2.const_data_ptr(), B, bp, y.mutable_data_ptr(), stream));
      break;
    case LinearPath::kSm90:
#ifdef TERSOR_SPARSE24_SM90
      C10_CUDA_CHECK(launch_sparse24_gemm_sm90(d.args, x2.const_data_ptr(), B, bp, y.mutable_data_ptr(), stream));
#endif
      break;
  }
  return y.reshape(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(tersor, CUDA, m) {
  m.impl("sparse24_compress", &compress_cuda);
  m.impl("sparse24_decompress", &decompress_cuda);
  m.impl("sparse24_linear", &linear_cuda);
}

}  // namespace tersor::sparse24
