// Argument checking shared by the codec's CPU and CUDA torch glue (host C++; never in kernel sources).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

#include "codec/codec_format.h"
#include "codec/codec_host.h"

namespace tersor::codec {

// Indices into the list _codec_header returns (and every `header` argument takes).
enum HeaderField : int {
  kHVersion = 0, kHDtype, kHMode, kHNumel, kHRowLen, kHChunkElems, kHNChunks, kHCodeLenPos, kHOffsetsPos,
  kHExpPos, kHRawPos, kHTotalBytes, kHNdim, kHShape0
};

inline std::vector<int64_t> header_list(const StreamInfo& s) {
  std::vector<int64_t> h = {s.version,
                            static_cast<int64_t>(s.dtype),
                            static_cast<int64_t>(s.mode),
                            static_cast<int64_t>(s.numel),
                            static_cast<int64_t>(s.row_len),
                            static_cast<int64_t>(s.chunk_elems),
                            static_cast<int64_t>(s.n_chunks),
                            static_cast<int64_t>(s.code_len_pos()),
                            static_cast<int64_t>(s.offsets_pos),
                            static_cast<int64_t>(s.exp_pos),
                            static_cast<int64_t>(s.raw_pos),
                            static_cast<int64_t>(s.total_bytes),
                            s.ndim};
  for (int d = 0; d < s.ndim; ++d) h.push_back(static_cast<int64_t>(s.shape[d]));
  return h;
}

inline c10::ScalarType scalar_type_of(WireDType t) {
  switch (t) {
    case WireDType::kFloat32: return c10::ScalarType::Float;
    case WireDType::kFloat16: return c10::ScalarType::Half;
    case WireDType::kBFloat16: return c10::ScalarType::BFloat16;
    case WireDType::kFloat8E4M3: return c10::ScalarType::Float8_e4m3fn;
    case WireDType::kFloat8E5M2: return c10::ScalarType::Float8_e5m2;
  }
  return c10::ScalarType::Undefined;
}

inline WireDType wire_dtype_of(c10::ScalarType t, const char* op) {
  switch (t) {
    case c10::ScalarType::Float: return WireDType::kFloat32;
    case c10::ScalarType::Half: return WireDType::kFloat16;
    case c10::ScalarType::BFloat16: return WireDType::kBFloat16;
    case c10::ScalarType::Float8_e4m3fn: return WireDType::kFloat8E4M3;
    case c10::ScalarType::Float8_e5m2: return WireDType::kFloat8E5M2;
    default:
      TORCH_CHECK_TYPE(false, op, ": expected float32, float16, bfloat16, float8_e4m3fn or float8_e5m2, got ", t);
  }
}

// A decode/linear call's stream description, from the `header` list, checked for internal consistency
// against the formulas of the format and against the stream tensor's size, dtype and shape arguments.
// It does not read the stream (which may live on the GPU); the kernels bounds-check what they read.
struct DecodeCall {
  StreamInfo info;   // code_len is not set here
  uint64_t code_len_pos = 0;
};

inline DecodeCall check_decode_call(const at::Tensor& stream, const at::Tensor& table, c10::IntArrayRef header,
                                    c10::ScalarType dtype, c10::IntArrayRef shape, const char* op) {
  TORCH_CHECK_TYPE(stream.scalar_type() == c10::ScalarType::Byte, op, ": stream must be uint8, got ",
                   stream.scalar_type());
  TORCH_CHECK_VALUE(stream.dim() == 1 && stream.is_contiguous(), op, ": stream must be a contiguous 1-d tensor");
  TORCH_CHECK_TYPE(table.scalar_type() == c10::ScalarType::Int, op, ": table must be int32 (_codec_decode_table)");
  TORCH_CHECK_VALUE(table.dim() == 1 && table.numel() == kLutSize && table.is_contiguous(), op,
                    ": table must be the 4096-entry _codec_decode_table of the stream");
  TORCH_CHECK(table.device() == stream.device(), op, ": table is on ", table.device(), ", stream on ",
              stream.device());
  TORCH_CHECK_VALUE(header.size() >= kHShape0 && header[kHVersion] == kVersion, op,
                    ": header must be the list _codec_header returned for this stream");
  const int ndim = static_cast<int>(header[kHNdim]);
  TORCH_CHECK_VALUE(ndim >= 0 && ndim <= kMaxNdim && header.size() == static_cast<size_t>(kHShape0 + ndim), op,
                    ": malformed header list");
  DecodeCall c;
  StreamInfo& s = c.info;
  TORCH_CHECK_VALUE(wire_dtype_valid(static_cast<uint8_t>(header[kHDtype])) && (header[kHMode] == 0 || header[kHMode] == 1),
                    op, ": malformed header list");
  s.version = kVersion;
  s.dtype = static_cast<WireDType>(header[kHDtype]);
  s.mode = static_cast<Mode>(header[kHMode]);
  s.ndim = ndim;
  for (int d = 0; d < ndim; ++d) {
    TORCH_CHECK_VALUE(header[kHShape0 + d] >= 0, op, ": malformed header list");
    s.shape[d] = static_cast<uint64_t>(header[kHShape0 + d]);
  }
  for (int64_t v : header) TORCH_CHECK_VALUE(v >= 0, op, ": malformed header list");
  s.numel = header[kHNumel];
  s.row_len = header[kHRowLen];
  s.chunk_elems = static_cast<uint32_t>(header[kHChunkElems]);
  s.n_chunks = header[kHNChunks];
  s.offsets_pos = header[kHOffsetsPos];
  s.exp_pos = header[kHExpPos];
  s.raw_pos = header[kHRawPos];
  s.total_bytes = header[kHTotalBytes];
  c.code_len_pos = header[kHCodeLenPos];
  TORCH_CHECK_TYPE(dtype == scalar_type_of(s.dtype), op, ": dtype ", dtype, " does not match the stream's ",
                   scalar_type_of(s.dtype));
  TORCH_CHECK_VALUE(static_cast<int>(shape.size()) == ndim, op, ": shape ", shape, " does not match the stream");
  unsigned __int128 numel = 1;  // as parse_stream: no overflow, at most 2^56 elements
  for (int d = 0; d < ndim; ++d) {
    TORCH_CHECK_VALUE(static_cast<uint64_t>(shape[d]) == s.shape[d], op, ": shape ", shape,
                      " does not match the stream");
    numel *= s.shape[d];
    TORCH_CHECK_VALUE(numel <= (static_cast<unsigned __int128>(1) << 56), op, ": shape too large");
  }
  TORCH_CHECK_VALUE(static_cast<uint64_t>(numel) == s.numel, op, ": malformed header list (numel)");
  TORCH_CHECK_VALUE(s.total_bytes == static_cast<uint64_t>(stream.numel()), op, ": the stream has ", stream.numel(),
                    " bytes, the header says ", s.total_bytes);
  // The list has no exponent-section size; raw_pos - exp_pos is its padded value, which satisfies the
  // same rules (records are 16-byte multiples).
  s.exp_bytes = s.mode == Mode::kHuffman && s.raw_pos >= s.exp_pos ? s.raw_pos - s.exp_pos : 0;
  s.raw_bytes = s.total_bytes >= s.raw_pos ? s.total_bytes - s.raw_pos : ~0ull;
  const Layout L = layout_for(ndim, s.mode, s.mode == Mode::kHuffman ? s.n_chunks : 0);
  const char* bad = layout_error(s, s.total_bytes);
  if (!bad && s.mode == Mode::kHuffman && (c.code_len_pos != L.code_len_pos || s.offsets_pos != L.offsets_pos))
    bad = "table positions";
  TORCH_CHECK_VALUE(!bad, op, ": malformed header list (", bad ? bad : "", ")");
  return c;
}

}  // namespace tersor::codec
