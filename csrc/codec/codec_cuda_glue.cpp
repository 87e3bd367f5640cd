// CUDA implementations of codec_decode and codec_linear (torch glue; kernels in codec_*_cuda.cu).
#include <optional>
#include <vector>

#include "codec/codec_cuda.h"
#include "codec/codec_glue.h"
#include "common/cuda_glue.h"

namespace tersor::codec {
namespace {

// Kernels read the stream and the table with aligned 16-byte (table) and up-to-16-byte (stream)
// loads relative to the start of the tensor; a view at an odd storage offset gets a fresh copy.
Tensor aligned16(const Tensor& t) {
  Tensor c = as_contiguous(t);
  return is_aligned(c.const_data_ptr(), 16) ? c : torch::stable::clone(c);
}

DeviceStreamView make_view(const DecodeCall& c, const Tensor& stream, const Tensor& table) {
  return make_stream_view(c.info, c.code_len_pos, static_cast<const uint8_t*>(stream.const_data_ptr()),
                          static_cast<const uint32_t*>(table.const_data_ptr()));
}

// Decodes into `out` (contiguous, numel elements of the stream's dtype). With verify, waits for the
// kernel and raises if any chunk failed its checks.
void decode_into(const DecodeCall& c, const Tensor& stream, const Tensor& table, Tensor& out, bool verify,
                 const char* op) {
  const StreamInfo& s = c.info;
  if (s.numel == 0) return;
  const cudaStream_t cs = current_cuda_stream(stream.get_device_index());
  if (s.mode == Mode::kStored) {
    TERSOR_CUDA_CHECK(cudaMemcpyAsync(out.mutable_data_ptr(),
                                      static_cast<const uint8_t*>(stream.const_data_ptr()) + s.raw_pos,
                                      s.numel * s.elem_bytes(), cudaMemcpyDeviceToDevice, cs));
    return;
  }
  const Tensor sa = aligned16(stream), ta = aligned16(table);
  const DeviceStreamView v = make_view(c, sa, ta);
  Tensor err;
  if (verify) err = zeros({1}, ScalarType::Int, stream.device());
  TERSOR_CUDA_CHECK(launch_codec_decode(v, out.mutable_data_ptr(), verify ? err.mutable_data_ptr<int>() : nullptr, cs));
  if (verify) {
    int flag = 0;  // waits for the kernel, as .item() did
    TERSOR_CUDA_CHECK(cudaMemcpyAsync(&flag, err.const_data_ptr<int>(), sizeof(int), cudaMemcpyDeviceToHost, cs));
    TERSOR_CUDA_CHECK(cudaStreamSynchronize(cs));
    TERSOR_CHECK_VALUE(flag == 0, op,
                       ": corrupt stream: a chunk record is malformed or a lane does not decode to exactly its "
                       "declared length (was the stream modified, or decoded with another stream's table?)");
  }
}

Tensor codec_decode_cuda(const Tensor& stream, const Tensor& table, std::vector<int64_t> header, ScalarType dtype,
                         std::vector<int64_t> shape, bool verify) {
  constexpr const char* op = "codec_decode";
  TERSOR_CHECK(stream.is_cuda(), op, " (CUDA kernel): expected a CUDA stream tensor, got ", device_str(stream));
  const DecodeCall c = check_decode_call(stream, table, header, dtype, shape, op);
  const CudaDeviceGuard guard(stream);
  Tensor out = empty(shape, dtype, stream.device());
  decode_into(c, stream, table, out, verify, op);
  return out;
}

Tensor codec_linear_cuda(const Tensor& x, const Tensor& stream, const Tensor& table, std::vector<int64_t> header,
                         ScalarType dtype, std::vector<int64_t> shape, const std::optional<Tensor>& bias) {
  constexpr const char* op = "codec_linear";
  TERSOR_CHECK(stream.is_cuda(), op, " (CUDA kernel): expected a CUDA stream tensor, got ", device_str(stream));
  TERSOR_CHECK(x.device() == stream.device(), op, ": x is on ", device_str(x), ", the stream on ",
               device_str(stream));
  const DecodeCall c = check_decode_call(stream, table, header, dtype, shape, op);
  const StreamInfo& s = c.info;
  TERSOR_CHECK_VALUE(s.ndim == 2, op, ": the weight must be 2-d [N, K], got shape ", list_str(shape));
  const int64_t N = shape[0], K = shape[1];
  TERSOR_CHECK_TYPE(x.scalar_type() == dtype, op, ": x has dtype ", dtype_name(x.scalar_type()), ", the weight ",
                    dtype_name(dtype));
  TERSOR_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == K, op, ": x must be [..., ", K, "] for a [", N, ", ", K,
                     "] weight, got ", sizes_str(x));
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TERSOR_CHECK(bias->device() == stream.device(), op, ": bias is on ", device_str(*bias), ", the stream on ",
                 device_str(stream));
    TERSOR_CHECK_TYPE(bias->scalar_type() == dtype, op, ": bias has dtype ", dtype_name(bias->scalar_type()),
                      ", the weight ", dtype_name(dtype));
    TERSOR_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, op, ": bias must be [", N, "], got ",
                       sizes_str(*bias));
  }
  const CudaDeviceGuard guard(stream);

  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) rows *= x.size(d);
  std::vector<int64_t> out_shape = sizes_vec(x);
  out_shape.back() = N;

  if (linear_path(c, rows) == LinearPath::kDecodeMatmul) {
    // Decode to a scratch weight and let cuBLAS do the product (as the CPU path does).
    Tensor w = empty(shape, dtype, stream.device());
    decode_into(c, stream, table, w, /*verify=*/false, op);
    return linear(x, w, has_bias ? std::optional<Tensor>(*bias) : std::nullopt);
  }

  const Tensor sa = aligned16(stream), ta = aligned16(table);
  const DeviceStreamView v = make_view(c, sa, ta);
  const Tensor x2 = aligned16(torch::stable::reshape(x, {rows, K}));
  const std::optional<Tensor> b = has_bias ? std::optional<Tensor>(as_contiguous(*bias)) : std::nullopt;
  Tensor y = empty({rows, N}, x.scalar_type(), x.device());
  const uint64_t np = gemv_partials_floats(v, static_cast<int>(rows));
  std::optional<Tensor> partials;
  if (np) partials = empty({static_cast<int64_t>(np)}, ScalarType::Float, x.device());
  TERSOR_CUDA_CHECK(launch_codec_gemv(v, x2.const_data_ptr(), static_cast<int>(rows),
                                      b ? b->const_data_ptr() : nullptr, y.mutable_data_ptr(),
                                      partials ? partials->mutable_data_ptr<float>() : nullptr, /*err_flag=*/nullptr,
                                      current_cuda_stream(stream.get_device_index())));
  return torch::stable::view(y, out_shape);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(tersor, CUDA, m) {
  m.impl("codec_decode", TORCH_BOX(&codec_decode_cuda));
  m.impl("codec_linear", TORCH_BOX(&codec_linear_cuda));
}

}  // namespace tersor::codec
