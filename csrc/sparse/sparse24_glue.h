// Argument checking shared by the 2:4 family's CPU ops, CUDA glue and CPU replay (host C++ only).
#pragma once

#include <cstdint>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "common/torch_glue.h"
#include "sparse/sparse24_format.h"

namespace tersor::sparse24 {

struct Shape {
  int64_t M = 0, K = 0;
};


// float32 values (format v1 allows them: same element layout, 4-byte elements) are a CPU-only case: the
// sparse tensor-core MMA takes 16-bit A operands for 2:4 (its tf32 form is 1:2 sparsity, another format).
inline void check_value_dtype(ScalarType t, const char* op, const char* what, bool allow_float32 = false) {
  if (allow_float32 && t == ScalarType::Float) return;
  TERSOR_CHECK_TYPE(t == ScalarType::Half || t == ScalarType::BFloat16, op, ": ", what,
                    allow_float32 ? " must be float16, bfloat16 or float32, got "
                                  : " must be float16 or bfloat16 (float32 2:4 weights are CPU-only), got ",
                    dtype_name(t));
}

// The weight's geometry from values [M/16, K/32, 256] and meta [M/16, K/64, 32] (format v1), with
// every shape/dtype/device rule checked; contents are validated by tersor.sparse.load_2_4.
inline Shape check_packed(const Tensor& values, const Tensor& meta, const char* op, bool allow_float32 = false) {
  check_value_dtype(values.scalar_type(), op, "values", allow_float32);
  TERSOR_CHECK_TYPE(meta.scalar_type() == ScalarType::Int, op, ": meta must be int32, got ",
                    dtype_name(meta.scalar_type()));
  TERSOR_CHECK_VALUE(values.dim() == 3 && values.size(2) == kTileElems, op,
                     ": values must be [M/16, K/32, 256] (2:4 format v1), got shape ", sizes_str(values));
  TERSOR_CHECK_VALUE(meta.dim() == 3 && meta.size(2) == 32, op,
                     ": meta must be [M/16, K/64, 32] (2:4 format v1), got shape ", sizes_str(meta));
  Shape s;
  s.M = values.size(0) * kRowAlign;
  s.K = values.size(1) * kTileK;
  TERSOR_CHECK_VALUE(s.M > 0 && s.K > 0 && s.K % kColAlign == 0, op,
                     ": values must hold a positive number of 16-row blocks and an even number of 32-column "
                     "k-tiles (K % 64 == 0), got shape ", sizes_str(values));
  TERSOR_CHECK_VALUE(meta.size(0) == values.size(0) && meta.size(1) * kColAlign == s.K, op, ": meta shape ",
                     sizes_str(meta), " does not match values shape ", sizes_str(values), " (expected [",
                     values.size(0), ", ", s.K / kColAlign, ", 32])");
  TERSOR_CHECK_VALUE(values.device() == meta.device(), op, ": values and meta must be on the same device, got ",
               device_str(values), " and ", device_str(meta));
  TERSOR_CHECK_VALUE(s.K < (int64_t{1} << 31) && s.M < (int64_t{1} << 31), op, ": weight too large");
  return s;
}

// Checks x [..., K] (values' dtype, same device) and bias [M] and returns y's shape [..., M].
inline std::vector<int64_t> check_linear_inputs(const Tensor& x, const std::optional<Tensor>& bias,
                                                const Tensor& values, const Shape& s, const char* op) {
  TERSOR_CHECK_TYPE(x.scalar_type() == values.scalar_type(), op, ": x must have the weight's dtype ",
                    dtype_name(values.scalar_type()), ", got ", dtype_name(x.scalar_type()));
  TERSOR_CHECK_VALUE(x.device() == values.device(), op, ": x must be on the weight's device ", device_str(values),
               ", got ", device_str(x));
  TERSOR_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == s.K, op, ": x's last dim must be in_features = ", s.K,
                     ", got shape ", sizes_str(x));
  if (bias.has_value()) {
    TERSOR_CHECK_TYPE(bias->scalar_type() == values.scalar_type(), op, ": bias must have the weight's dtype ",
                      dtype_name(values.scalar_type()), ", got ", dtype_name(bias->scalar_type()));
    TERSOR_CHECK_VALUE(bias->device() == values.device(), op, ": bias must be on the weight's device");
    TERSOR_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == s.M, op, ": bias must be [out_features = ", s.M,
                       "], got shape ", sizes_str(*bias));
  }
  std::vector<int64_t> out = sizes_vec(x);
  out.back() = s.M;
  return out;
}

// Whether a value's bit pattern (uint16_t or uint32_t) counts as a non-zero of its chunk: any but +-0.0.
template <typename Bits>
constexpr bool nonzero_bits(Bits b) {
  return (b & (static_cast<Bits>(~Bits{0}) >> 1)) != 0;  // every bit but the sign
}

// The error for a weight that is not 2:4: names the first chunk of 4 along K (row-major order) holding more
// than 2 non-zeros (bit patterns w [M, K], uint16_t or uint32_t, row-major, on the host; -0.0 counts as
// zero). Serial: compress runs it only once its parallel pass (CPU) or kernel (CUDA) has found a bad chunk.
template <typename Bits>
inline void throw_first_bad_chunk(const Bits* w, int64_t M, int64_t K) {
  const int64_t chunks = K / 4;
  for (int64_t i = 0; i < M * chunks; ++i) {
    const Bits* c = w + (i / chunks) * K + 4 * (i % chunks);
    int n = 0;
    for (int j = 0; j < 4; ++j) n += nonzero_bits(c[j]);
    TERSOR_CHECK_VALUE(n <= 2, "sparse24_compress: the weight is not 2:4 sparse: row ", i / chunks, ", columns ",
                       4 * (i % chunks), "..", 4 * (i % chunks) + 3, " hold ", n,
                       " non-zeros (at most 2 of every 4 along K are allowed; prune with tersor.sparse.prune_2_4)");
  }
}

}  // namespace tersor::sparse24
