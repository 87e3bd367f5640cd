// CPU implementation of hadamard_transform: the reference the CUDA kernels are judged against and the
// fallback users get. Per row: widen to fp32, in-place radix-2 butterflies on each of the K sub-rows
// (the inner loop is contiguous, so it vectorizes for spans >= 8), then the K x K mix, then scale.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "hadamard/hadamard_glue.h"
#include "hadamard/hadamard_k.h"

namespace tersor::hadamard {
namespace {

void fwht_inplace(float* a, int64_t n) {
  for (int64_t h = 1; h < n; h <<= 1) {
    for (int64_t i = 0; i < n; i += 2 * h) {
      float* lo = a + i;
      float* hi = a + i + h;
      for (int64_t j = 0; j < h; ++j) {
        const float u = lo[j], v = hi[j];
        lo[j] = u + v;
        hi[j] = u - v;
      }
    }
  }
}

// out = H_K t (or H_K^T t), t and out viewed as K x m row-major.
void kmix(const float* t, float* out, int k, int64_t m, bool transpose) {
  const unsigned long long* bits = host_k_bits(k);
  for (int a = 0; a < k; ++a) {
    float* dst = out + a * m;
    for (int64_t j = 0; j < m; ++j) dst[j] = 0.f;
    for (int b = 0; b < k; ++b) {
      const unsigned neg = transpose ? k_sign_bit(bits, k, b, a) : k_sign_bit(bits, k, a, b);
      const float* src = t + b * m;
      if (neg) {
        for (int64_t j = 0; j < m; ++j) dst[j] -= src[j];
      } else {
        for (int64_t j = 0; j < m; ++j) dst[j] += src[j];
      }
    }
  }
}

template <typename scalar_t>
void hadamard_rows(const scalar_t* x, scalar_t* y, const HadamardCall& c, bool transpose) {
  const int64_t n = c.n;
  const int k = c.size.k;
  const int64_t m = int64_t{1} << c.size.log_n;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / n);
  at::parallel_for(0, c.rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(k > 1 ? 2 * n : n);
    float* t = buf.data();
    float* mixed = k > 1 ? t + n : t;
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* src = x + r * n;
      for (int64_t j = 0; j < n; ++j) t[j] = static_cast<float>(src[j]);
      for (int a = 0; a < k; ++a) fwht_inplace(t + a * m, m);
      if (k > 1) kmix(t, mixed, k, m, transpose);
      scalar_t* dst = y + r * n;
      for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<scalar_t>(mixed[j] * c.scale);
    }
  });
}

at::Tensor hadamard_transform_cpu(const at::Tensor& x, std::optional<double> scale, bool transpose) {
  TORCH_CHECK(x.device().is_cpu(), "hadamard_transform (CPU kernel): expected a CPU tensor, got ", x.device());
  const HadamardCall c = check_hadamard_call(x, scale, "hadamard_transform");
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (c.rows == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hadamard_transform_cpu", [&] {
    hadamard_rows<scalar_t>(xc.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), c, transpose);
  });
  return y;
}

std::vector<int64_t> hadamard_k_sizes() { return {std::begin(kHadamardKs), std::end(kHadamardKs)}; }

std::vector<int64_t> hadamard_factor(int64_t n) {
  const FactoredSize f = factor_or_throw(n, "hadamard_transform");
  return {f.k, f.log_n};
}

std::vector<int64_t> hadamard_plan(int64_t log_n, int64_t elem_bytes) {
  const Pow2Plan p = make_pow2_plan(static_cast<int>(log_n), static_cast<int>(elem_bytes));
  TORCH_CHECK_VALUE(p.ok, "_hadamard_plan: no plan for log_n=", log_n, " elem_bytes=", elem_bytes);
  return {p.log_n, p.n, p.elem_bytes, p.ept, p.vec_bytes, p.tpr, p.wpr, p.lane_bits, p.rows_per_block,
          p.block_threads, p.rounds, p.ept_round, p.groups, p.smem_bytes};
}

std::vector<int64_t> hadamard_smem_index(std::vector<int64_t> j) {
  for (auto& v : j) {
    TORCH_CHECK_VALUE(v >= 0 && v < (int64_t{1} << 20), "_hadamard_smem_index: index out of range: ", v);
    v = smem_index(static_cast<int>(v));
  }
  return j;
}

}  // namespace

TORCH_LIBRARY_IMPL(tersor, CPU, m) { m.impl("hadamard_transform", &hadamard_transform_cpu); }

// Tensor-free helpers: no backend to dispatch on, so they register for every key.
TORCH_LIBRARY_IMPL(tersor, CompositeExplicitAutograd, m) {
  m.impl("_hadamard_k_sizes", &hadamard_k_sizes);
  m.impl("_hadamard_factor", &hadamard_factor);
  m.impl("_hadamard_plan", &hadamard_plan);
  m.impl("_hadamard_smem_index", &hadamard_smem_index);
}

}  // namespace tersor::hadamard
