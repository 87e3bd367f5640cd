// CPU implementation of bsr_linear: y = x @ W^T (+ bias) for a BSR weight (docs/formats.md, BSR v1).
// fp32 accumulation, one rounding at the end (16-bit types); the reference the CUDA kernel is judged
// against. Parallel over (block row, token tile); each weight block is widened to fp32 once per token
// tile and its rows are dotted with the x rows in 8 independent lanes (vectorizes without reassociation).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <vector>

#include "sparse/bsr_format.h"
#include "sparse/bsr_glue.h"

namespace tersor::sparse {
namespace {

constexpr int64_t kCpuTokenTile = 32;

// sum_k a[k] b[k] over n (a multiple of 16) in 8 lanes, lanes summed in a fixed order.
inline float dot_lanes(const float* __restrict__ a, const float* __restrict__ b, int64_t n) {
  float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t k = 0; k < n; k += 8)
    for (int l = 0; l < 8; ++l) lane[l] += a[k + l] * b[k + l];
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

template <typename T>
void bsr_linear_kernel(const BsrCall& c, const float* x32, const T* values, const int32_t* crow, const int32_t* col,
                       const T* bias, T* y) {
  const int64_t bs = c.bs, T_ = c.tokens, K = c.in_features, N = c.out_features;
  const int64_t n_tt = (T_ + kCpuTokenTile - 1) / kCpuTokenTile;
  at::parallel_for(0, c.mb * n_tt, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> wblock(bs * bs), acc(kCpuTokenTile * bs);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / n_tt, t0 = (task % n_tt) * kCpuTokenTile;
      const int64_t nt = std::min(kCpuTokenTile, T_ - t0);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = crow[r]; j < crow[r + 1]; ++j) {
        const T* v = values + j * bs * bs;
        const float* w;
        if constexpr (std::is_same_v<T, float>) {
          w = v;
        } else {
          for (int64_t e = 0; e < bs * bs; ++e) wblock[e] = static_cast<float>(v[e]);
          w = wblock.data();
        }
        const float* xcol = x32 + static_cast<int64_t>(col[j]) * bs;
        for (int64_t t = 0; t < nt; ++t) {
          const float* xs = xcol + (t0 + t) * K;
          float* a = acc.data() + t * bs;
          for (int64_t m = 0; m < bs; ++m) a[m] += dot_lanes(w + m * bs, xs, bs);
        }
      }
      for (int64_t t = 0; t < nt; ++t)
        for (int64_t m = 0; m < bs; ++m) {
          float s = acc[t * bs + m];
          if (bias) s += static_cast<float>(bias[r * bs + m]);
          y[(t0 + t) * N + r * bs + m] = static_cast<T>(s);
        }
    }
  });
}

at::Tensor bsr_linear_cpu(const at::Tensor& x, const at::Tensor& crow_indices, const at::Tensor& col_indices,
                          const at::Tensor& values, const at::Tensor& schedule, int64_t in_features,
                          const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "bsr_linear";
  const BsrCall c = check_bsr_call(x, crow_indices, col_indices, values, schedule, in_features, bias, op);
  const at::Tensor crow = crow_indices.contiguous(), col = col_indices.contiguous();
  check_bsr_indices_cpu(c, crow, col, op);
  at::Tensor y = at::empty({c.tokens, c.out_features}, x.options());
  if (c.tokens == 0) return y.reshape(c.out_shape);
  const at::Tensor x32 = x.reshape({c.tokens, c.in_features}).to(at::kFloat).contiguous();
  const at::Tensor v = values.contiguous();
  std::optional<at::Tensor> b;
  if (bias) b = bias->contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bsr_linear_cpu", [&] {
    bsr_linear_kernel<scalar_t>(c, x32.const_data_ptr<float>(), v.const_data_ptr<scalar_t>(),
                                crow.const_data_ptr<int32_t>(), col.const_data_ptr<int32_t>(),
                                b ? b->const_data_ptr<scalar_t>() : nullptr, y.mutable_data_ptr<scalar_t>());
  });
  return y.reshape(c.out_shape);
}

// Validates a schedule (and the index arrays) against the format; returns [version, bs, Mb, S, n_partials].
std::vector<int64_t> bsr_check_cpu(const at::Tensor& crow_indices, const at::Tensor& col_indices,
                                   const at::Tensor& values, const at::Tensor& schedule, int64_t in_features) {
  constexpr const char* op = "_bsr_check";
  TORCH_CHECK(crow_indices.device().is_cpu(), op, ": expects CPU tensors");
  const at::Tensor x = at::empty({0, in_features}, values.options());
  const BsrCall c = check_bsr_call(x, crow_indices, col_indices, values, schedule, in_features, std::nullopt, op);
  const at::Tensor crow = crow_indices.contiguous(), sched = schedule.contiguous();
  check_bsr_indices_cpu(c, crow, col_indices.contiguous(), op);
  check_bsr_schedule_cpu(c, crow, sched, op);
  const int64_t n_partials = sched.const_data_ptr<int32_t>()[bsr_partial_ptr_offset(c.mb, c.n_split) + c.mb];
  return {kBsrFormatVersion, c.bs, c.mb, c.n_split, n_partials};
}

}  // namespace

TORCH_LIBRARY_IMPL(tersor, CPU, m) {
  m.impl("bsr_linear", &bsr_linear_cpu);
  m.impl("_bsr_check", &bsr_check_cpu);
}

}  // namespace tersor::sparse
