// Argument checking shared by the 2:4 family's CPU ops, CUDA glue and CPU replay (host C++ only).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "sparse/sparse24_format.h"

namespace tersor::sparse24 {

struct Shape {
  int64_t M = 0, K = 0;
};

inline void check_value_dtype(c10::ScalarType t, const char* op, const char* what) {
  TORCH_CHECK_TYPE(t == at::kHalf || t == at::kBFloat16, op, ": ", what, " must be float16 or bfloat16, got ", t);
}

// The weight's geometry from values [M/16, K/32, 256] and meta [M/16, K/64, 32] (format v1), with
// every shape/dtype/device rule checked; contents are validated by tersor.sparse.load_2_4.
inline Shape check_packed(const at::Tensor& values, const at::Tensor& meta, const char* op) {
  check_value_dtype(values.scalar_type(), op, "values");
  TORCH_CHECK_TYPE(meta.scalar_type() == at::kInt, op, ": meta must be int32, got ", meta.scalar_type());
  TORCH_CHECK_VALUE(values.dim() == 3 && values.size(2) == kTileElems, op,
                    ": values must be [M/16, K/32, 256] (2:4 format v1), got shape ", values.sizes());
  TORCH_CHECK_VALUE(meta.dim() == 3 && meta.size(2) == 32, op,
                    ": meta must be [M/16, K/64, 32] (2:4 format v1), got shape ", meta.sizes());
  Shape s;
  s.M = values.size(0) * kRowAlign;
  s.K = values.size(1) * kTileK;
  TORCH_CHECK_VALUE(s.M > 0 && s.K > 0 && s.K % kColAlign == 0, op,
                    ": values must hold a positive number of 16-row blocks and an even number of 32-column k-tiles "
                    "(K % 64 == 0), got shape ", values.sizes());
  TORCH_CHECK_VALUE(meta.size(0) == values.size(0) && meta.size(1) * kColAlign == s.K, op, ": meta shape ",
                    meta.sizes(), " does not match values shape ", values.sizes(), " (expected [", values.size(0), ", ",
                    s.K / kColAlign, ", 32])");
  TORCH_CHECK(values.device() == meta.device(), op, ": values and meta must be on the same device, got ",
              values.device(), " and ", meta.device());
  TORCH_CHECK_VALUE(s.K < (int64_t{1} << 31) && s.M < (int64_t{1} << 31), op, ": weight too large");
  return s;
}

// Checks x [..., K] (values' dtype, same device) and bias [M] and returns y's shape [..., M].
inline std::vector<int64_t> check_linear_inputs(const at::Tensor& x, const std::optional<at::Tensor>& bias,
                                                const at::Tensor& values, const Shape& s, const char* op) {
  TORCH_CHECK_TYPE(x.scalar_type() == values.scalar_type(), op, ": x must have the weight's dtype ",
                   values.scalar_type(), ", got ", x.scalar_type());
  TORCH_CHECK(x.device() == values.device(), op, ": x must be on the weight's device ", values.device(), ", got ",
              x.device());
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == s.K, op, ": x's last dim must be in_features = ", s.K,
                    ", got shape ", x.sizes());
  if (bias.has_value()) {
    TORCH_CHECK_TYPE(bias->scalar_type() == values.scalar_type(), op, ": bias must have the weight's dtype ",
                     values.scalar_type(), ", got ", bias->scalar_type());
    TORCH_CHECK(bias->device() == values.device(), op, ": bias must be on the weight's device");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == s.M, op, ": bias must be [out_features = ", s.M,
                      "], got shape ", bias->sizes());
  }
  std::vector<int64_t> out(x.sizes().begin(), x.sizes().end());
  out.back() = s.M;
  return out;
}

}  // namespace tersor::sparse24
