// CUDA implementations of codec_decode and codec_linear (torch glue; kernels in codec_*_cuda.cu).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/zeros.h>
#include <c10/core/SymIntArrayRef.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "codec/codec_cuda.h"
#include "codec/codec_glue.h"
#include "common/torch_glue.h"

namespace tersor::codec {
namespace {

// Kernels read the stream and the table with aligned 16-byte (table) and up-to-16-byte (stream)
// loads relative to the start of the tensor; a view at an odd storage offset gets a fresh copy.
at::Tensor aligned16(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return is_aligned(c.const_data_ptr(), 16) ? c : c.clone();
}

DeviceStreamView make_view(const DecodeCall& c, const at::Tensor& stream, const at::Tensor& table) {
  return make_stream_view(c.info, c.code_len_pos, static_cast<const uint8_t*>(stream.const_data_ptr()),
                          static_cast<const uint32_t*>(table.const_data_ptr()));
}

// Decodes into `out` (contiguous, numel elements of the stream's dtype). With verify, waits for the
// kernel and raises if any chunk failed its checks.
void decode_into(const DecodeCall& c, const at::Tensor& stream, const at::Tensor& table, at::Tensor& out,
                 bool verify, const char* op) {
  const StreamInfo& s = c.info;
  if (s.numel == 0) return;
  const cudaStream_t cs = c10::cuda::getCurrentCUDAStream();
  if (s.mode == Mode::kStored) {
    C10_CUDA_CHECK(cudaMemcpyAsync(out.mutable_data_ptr(), static_cast<const uint8_t*>(stream.const_data_ptr()) + s.raw_pos,
                                   s.numel * s.elem_bytes(), cudaMemcpyDeviceToDevice, cs));
    return;
  }
  const at::Tensor sa = aligned16(stream), ta = aligned16(table);
  const DeviceStreamView v = make_view(c, sa, ta);
  at::Tensor err;
  if (verify) err = at::zeros({1}, stream.options().dtype(at::kInt));
  C10_CUDA_CHECK(launch_codec_decode(v, out.mutable_data_ptr(), verify ? err.mutable_data_ptr<int>() : nullptr, cs));
  if (verify) {
    const int flag = err.item<int>();  // synchronizes with the kernel
    TORCH_CHECK(flag == 0, op,
                ": corrupt stream: a chunk record is malformed or a lane does not decode to exactly its "
                "declared length (was the stream modified, or decoded with another stream's table?)");
  }
}

at::Tensor codec_decode_cuda(const at::Tensor& stream, const at::Tensor& table, c10::IntArrayRef header,
                             c10::ScalarType dtype, c10::SymIntArrayRef shape, bool verify) {
  constexpr const char* op = "codec_decode";
  TORCH_CHECK(stream.is_cuda(), op, " (CUDA kernel): expected a CUDA stream tensor, got ", stream.device());
  const c10::IntArrayRef dims = C10_AS_INTARRAYREF_SLOW(shape);
  const DecodeCall c = check_decode_call(stream, table, header, dtype, dims, op);
  const c10::cuda::CUDAGuard guard(stream.device());
  at::Tensor out = at::empty(dims, stream.options().dtype(dtype));
  decode_into(c, stream, table, out, verify, op);
  return out;
}

at::Tensor codec_linear_cuda(const at::Tensor& x, const at::Tensor& stream, const at::Tensor& table,
                             c10::IntArrayRef header, c10::ScalarType dtype, c10::SymIntArrayRef shape,
                             const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "codec_linear";
  TORCH_CHECK(stream.is_cuda(), op, " (CUDA kernel): expected a CUDA stream tensor, got ", stream.device());
  TORCH_CHECK(x.device() == stream.device(), op, ": x is on ", x.device(), ", the stream on ", stream.device());
  const c10::IntArrayRef dims = C10_AS_INTARRAYREF_SLOW(shape);
  const DecodeCall c = check_decode_call(stream, table, header, dtype, dims, op);
  const StreamInfo& s = c.info;
  TORCH_CHECK_VALUE(s.ndim == 2, op, ": the weight must be 2-d [N, K], got shape ", dims);
  const int64_t N = dims[0], K = dims[1];
  TORCH_CHECK_TYPE(x.scalar_type() == dtype, op, ": x has dtype ", x.scalar_type(), ", the weight ", dtype);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == K, op, ": x must be [..., ", K, "] for a [", N, ", ", K,
                    "] weight, got ", x.sizes());
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->device() == stream.device(), op, ": bias is on ", bias->device(), ", the stream on ",
                stream.device());
    TORCH_CHECK_TYPE(bias->scalar_type() == dtype, op, ": bias has dtype ", bias->scalar_type(), ", the weight ",
                     dtype);
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, op, ": bias must be [", N, "], got ", bias->sizes());
  }
  const c10::cuda::CUDAGuard guard(stream.device());

  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) rows *= x.size(d);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;

  at::Tensor sa = stream, ta = table;
  DeviceStreamView v;
  bool fused = s.mode == Mode::kHuffman && rows >= 1 && rows <= CodecCudaTraits::kMaxBatch;
  if (fused) {
    sa = aligned16(stream);
    ta = aligned16(table);
    v = make_view(c, sa, ta);
    fused = gemv_fused_eligible(v, static_cast<int>(rows));
  }
  if (!fused) {
    // Decode to a scratch weight and let cuBLAS do the product (as the CPU path does).
    at::Tensor w = at::empty(dims, stream.options().dtype(dtype));
    decode_into(c, stream, table, w, /*verify=*/false, op);
    return at::linear(x, w, has_bias ? std::optional<at::Tensor>(*bias) : std::nullopt);
  }

  const at::Tensor x2 = aligned16(x.reshape({rows, K}));
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty({rows, N}, x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor partials;
  const uint64_t np = gemv_partials_floats(v, static_cast<int>(rows));
  if (np) partials = at::empty({static_cast<int64_t>(np)}, x.options().dtype(at::kFloat));
  C10_CUDA_CHECK(launch_codec_gemv(v, x2.const_data_ptr(), static_cast<int>(rows),
                                   has_bias ? b.const_data_ptr() : nullptr, y.mutable_data_ptr(),
                                   np ? partials.mutable_data_ptr<float>() : nullptr, /*err_flag=*/nullptr,
                                   c10::cuda::getCurrentCUDAStream()));
  return y.view(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(tersor, CUDA, m) {
  m.impl("codec_decode", &codec_decode_cuda);
  m.impl("codec_linear", &codec_linear_cuda);
}

}  // namespace tersor::codec
