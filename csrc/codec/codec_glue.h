// Argument checking shared by the codec's CPU and CUDA torch glue (host C++; never in kernel sources).
#pragma once

#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "codec/codec_format.h"
#include "codec/codec_host.h"
#include "codec/codec_view.h"
#include "common/torch_glue.h"

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


inline ScalarType scalar_type_of(WireDType t) {
  switch (t) {
    case WireDType::kFloat32: return ScalarType::Float;
    case WireDType::kFloat16: return ScalarType::Half;
    case WireDType::kBFloat16: return ScalarType::BFloat16;
    case WireDType::kFloat8E4M3: return ScalarType::Float8_e4m3fn;
    case WireDType::kFloat8E5M2: return ScalarType::Float8_e5m2;
  }
  return ScalarType::Undefined;
}

inline WireDType wire_dtype_of(ScalarType t, const char* op) {
  switch (t) {
    case ScalarType::Float: return WireDType::kFloat32;
    case ScalarType::Half: return WireDType::kFloat16;
    case ScalarType::BFloat16: return WireDType::kBFloat16;
    case ScalarType::Float8_e4m3fn: return WireDType::kFloat8E4M3;
    case ScalarType::Float8_e5m2: return WireDType::kFloat8E5M2;
    default:
      TERSOR_CHECK_TYPE(false, op, ": expected float32, float16, bfloat16, float8_e4m3fn or float8_e5m2, got ",
                        dtype_name(t));
  }
  return WireDType::kFloat32;  // unreachable
}

// A decode/linear call's stream description, from the `header` list, checked for internal consistency
// against the formulas of the format and against the stream tensor's size, dtype and shape arguments.
// It does not read the stream (which may live on the GPU); the kernels bounds-check what they read.
struct DecodeCall {
  StreamInfo info;   // code_len is not set here
  uint64_t code_len_pos = 0;
};

// The fields of a header list, range-checked (no tensor looked at). check_header_layout then checks them
// against each other; check_decode_call does both around its checks of the tensors and arguments.
inline DecodeCall parse_header(const std::vector<int64_t>& header, const char* op) {
  TERSOR_CHECK_VALUE(header.size() >= kHShape0 && header[kHVersion] == kVersion, op,
                     ": header must be the list _codec_header returned for this stream");
  const int64_t ndim64 = header[kHNdim];
  TERSOR_CHECK_VALUE(ndim64 >= 0 && ndim64 <= kMaxNdim && header.size() == static_cast<size_t>(kHShape0 + ndim64), op,
                     ": malformed header list");
  const int ndim = static_cast<int>(ndim64);
  DecodeCall c;
  StreamInfo& s = c.info;
  TERSOR_CHECK_VALUE(header[kHDtype] >= 0 && header[kHDtype] <= 255 &&
                         wire_dtype_valid(static_cast<uint8_t>(header[kHDtype])) &&
                         (header[kHMode] == 0 || header[kHMode] == 1),
                     op, ": malformed header list");
  s.version = kVersion;
  s.dtype = static_cast<WireDType>(header[kHDtype]);
  s.mode = static_cast<Mode>(header[kHMode]);
  s.ndim = ndim;
  for (int64_t v : header) TERSOR_CHECK_VALUE(v >= 0, op, ": malformed header list");
  for (int d = 0; d < ndim; ++d) s.shape[d] = static_cast<uint64_t>(header[kHShape0 + d]);
  TERSOR_CHECK_VALUE(header[kHChunkElems] <= static_cast<int64_t>(kMaxChunkElems), op,
                     ": malformed header list (chunk_elems out of range)");
  s.numel = header[kHNumel];
  s.row_len = header[kHRowLen];
  s.chunk_elems = static_cast<uint32_t>(header[kHChunkElems]);
  s.n_chunks = header[kHNChunks];
  s.offsets_pos = header[kHOffsetsPos];
  s.exp_pos = header[kHExpPos];
  s.raw_pos = header[kHRawPos];
  s.total_bytes = header[kHTotalBytes];
  c.code_len_pos = header[kHCodeLenPos];
  return c;
}

// numel against the shape, and the format's layout rules between the fields (layout_error) for a stream
// of total_bytes bytes.
inline void check_header_layout(DecodeCall& c, const char* op) {
  StreamInfo& s = c.info;
  unsigned __int128 numel = 1;  // as parse_stream: no overflow, at most 2^56 elements
  for (int d = 0; d < s.ndim; ++d) {
    numel *= s.shape[d];
    TERSOR_CHECK_VALUE(numel <= (static_cast<unsigned __int128>(1) << 56), op, ": shape too large");
  }
  TERSOR_CHECK_VALUE(static_cast<uint64_t>(numel) == s.numel, op, ": malformed header list (numel)");
  // The list has no exponent-section size; raw_pos - exp_pos is its padded value, which satisfies the
  // same rules (records are 16-byte multiples).
  s.exp_bytes = s.mode == Mode::kHuffman && s.raw_pos >= s.exp_pos ? s.raw_pos - s.exp_pos : 0;
  s.raw_bytes = s.total_bytes >= s.raw_pos ? s.total_bytes - s.raw_pos : ~0ull;
  const Layout L = layout_for(s.ndim, s.mode, s.mode == Mode::kHuffman ? s.n_chunks : 0);
  const char* bad = layout_error(s, s.total_bytes);
  if (!bad && s.mode == Mode::kHuffman && (c.code_len_pos != L.code_len_pos || s.offsets_pos != L.offsets_pos))
    bad = "table positions";
  TERSOR_CHECK_VALUE(!bad, op, ": malformed header list (", bad ? bad : "", ")");
}

// A header list checked on its own (the route op: no stream tensor to compare it with).
inline DecodeCall check_header(const std::vector<int64_t>& header, const char* op) {
  DecodeCall c = parse_header(header, op);
  check_header_layout(c, op);
  return c;
}

// A decode/linear call's stream description, from the `header` list, checked for internal consistency
// against the formulas of the format and against the stream tensor's size, dtype and shape arguments.
// It does not read the stream (which may live on the GPU); the kernels bounds-check what they read.
inline DecodeCall check_decode_call(const Tensor& stream, const Tensor& table, const std::vector<int64_t>& header,
                                    ScalarType dtype, const std::vector<int64_t>& shape, const char* op) {
  TERSOR_CHECK_TYPE(stream.scalar_type() == ScalarType::Byte, op, ": stream must be uint8, got ",
                    dtype_name(stream.scalar_type()));
  TERSOR_CHECK_VALUE(stream.dim() == 1 && stream.is_contiguous(), op, ": stream must be a contiguous 1-d tensor");
  TERSOR_CHECK_TYPE(table.scalar_type() == ScalarType::Int, op, ": table must be int32 (_codec_decode_table)");
  TERSOR_CHECK_VALUE(table.dim() == 1 && table.numel() == kLutSize && table.is_contiguous(), op,
                     ": table must be the 4096-entry _codec_decode_table of the stream");
  TERSOR_CHECK_VALUE(table.device() == stream.device(), op, ": table is on ", device_str(table), ", stream on ",
               device_str(stream));
  DecodeCall c = parse_header(header, op);
  const StreamInfo& s = c.info;
  TERSOR_CHECK_TYPE(dtype == scalar_type_of(s.dtype), op, ": dtype ", dtype_name(dtype),
                    " does not match the stream's ", dtype_name(scalar_type_of(s.dtype)));
  TERSOR_CHECK_VALUE(static_cast<int>(shape.size()) == s.ndim, op, ": shape ", list_str(shape),
                     " does not match the stream");
  for (int d = 0; d < s.ndim; ++d)
    TERSOR_CHECK_VALUE(shape[d] >= 0 && static_cast<uint64_t>(shape[d]) == s.shape[d], op, ": shape ",
                       list_str(shape), " does not match the stream");
  TERSOR_CHECK_VALUE(s.total_bytes == static_cast<uint64_t>(stream.numel()), op, ": the stream has ", stream.numel(),
                     " bytes, the header says ", s.total_bytes);
  check_header_layout(c, op);
  return c;
}

// The CUDA codec_linear's path for a weight with header `c` and `rows` rows of x (codec_view.h).
inline LinearPath linear_path(const DecodeCall& c, int64_t rows) {
  return choose_linear_path(make_stream_view(c.info, c.code_len_pos, nullptr, nullptr), rows);
}

}  // namespace tersor::codec
