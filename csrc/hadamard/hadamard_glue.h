// Argument checking shared by the CPU and CUDA implementations of hadamard_transform (torch glue).
#pragma once

#include <cmath>
#include <optional>
#include <sstream>

#include "common/torch_glue.h"
#include "hadamard/hadamard_plan.h"

namespace tersor::hadamard {

inline std::string supported_sizes_message() {
  std::ostringstream os;
  os << "supported sizes are n = 2^k (1 <= n <= " << (1 << kMaxLogN) << ") or n = K * 2^k with 2^k <= "
     << (1 << kMaxLogN) << " and K in {";
  for (int i = 0; i < kNumHadamardKs; ++i) os << (i ? ", " : "") << kHadamardKs[i];
  os << "}";
  return os.str();
}

inline FactoredSize factor_or_throw(int64_t n, const char* op) {
  FactoredSize f;
  TERSOR_CHECK_VALUE(factor_size(n, &f), op, ": unsupported size n=", n, " of the last dimension; ",
                    supported_sizes_message());
  return f;
}

struct HadamardCall {
  int64_t n = 0;
  int64_t rows = 0;
  FactoredSize size;
  float scale = 1.f;
  DType dtype = DType::kFloat32;
};

inline HadamardCall check_hadamard_call(const Tensor& x, std::optional<double> scale, const char* op) {
  TERSOR_CHECK_VALUE(x.dim() >= 1, op, ": expected a tensor with at least one dimension, got a 0-d tensor");
  HadamardCall c;
  c.dtype = to_kernel_dtype(x.scalar_type(), op);
  c.n = x.size(-1);
  c.size = factor_or_throw(c.n, op);
  c.rows = x.numel() / c.n;  // n >= 1 once factored
  const double s = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(c.n));
  TERSOR_CHECK_VALUE(std::isfinite(s), op, ": scale must be finite, got ", s);
  c.scale = static_cast<float>(s);
  return c;
}

}  // namespace tersor::hadamard
