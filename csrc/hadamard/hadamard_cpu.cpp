// CPU implementation of hadamard_transform: the reference the CUDA kernels are judged against and the
// fallback users get. Per row: widen to fp32, in-place radix-2 butterflies on each of the K sub-rows
// (the inner loop is contiguous, so it vectorizes for spans >= 8), then the K x K mix, then scale and
// round once to the output dtype.
#include <algorithm>
#include <vector>

#include "hadamard/hadamard_glue.h"
#include "hadamard/hadamard_k.h"

namespace tersor::hadamard {
namespace {

// Radix-2 butterflies in natural order. The first three stages (spans 1, 2, 4) are fused into one
// 8-point transform per block: their inner loops are too short to vectorize and three passes over the
// row become one. Later spans have contiguous inner loops of >= 8 floats, which compilers vectorize.
void fwht_inplace(float* a, int64_t n) {
  int64_t h = 1;
  if (n >= 8) {
    for (int64_t i = 0; i < n; i += 8) {
      float* p = a + i;
      const float s0 = p[0] + p[1], d0 = p[0] - p[1], s1 = p[2] + p[3], d1 = p[2] - p[3];
      const float s2 = p[4] + p[5], d2 = p[4] - p[5], s3 = p[6] + p[7], d3 = p[6] - p[7];
      const float t0 = s0 + s1, t1 = d0 + d1, t2 = s0 - s1, t3 = d0 - d1;
      const float t4 = s2 + s3, t5 = d2 + d3, t6 = s2 - s3, t7 = d2 - d3;
      p[0] = t0 + t4; p[1] = t1 + t5; p[2] = t2 + t6; p[3] = t3 + t7;
      p[4] = t0 - t4; p[5] = t1 - t5; p[6] = t2 - t6; p[7] = t3 - t7;
    }
    h = 8;
  }
  for (; h < n; h <<= 1) {
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

// Rows per parallel_for task: about 32K elements, so short rows are batched and long rows split evenly.
int64_t row_grain(int64_t n) { return std::max<int64_t>(1, (int64_t{1} << 15) / n); }

// Widens one row (n = k * m elements of x) to fp32 in t and transforms its k sub-rows in place.
template <typename scalar_t>
void load_and_fwht_subrows(const scalar_t* x, float* t, int64_t n, int k, int64_t m) {
  for (int64_t j = 0; j < n; ++j) t[j] = static_cast<float>(x[j]);
  for (int a = 0; a < k; ++a) fwht_inplace(t + a * m, m);
}

// K = 1: one pass per row, fp32 buffer per thread, scale and round once.
template <typename scalar_t>
void hadamard_pow2_rows(const scalar_t* x, scalar_t* y, const HadamardCall& c) {
  const int64_t n = c.n;
  tersor::parallel_for(0, c.rows, row_grain(n), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(n);
    for (int64_t r = begin; r < end; ++r) {
      load_and_fwht_subrows(x + r * n, buf.data(), n, 1, n);
      scalar_t* dst = y + r * n;
      for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<scalar_t>(buf[j] * c.scale);
    }
  });
}

// K > 1: sub-row transforms into an fp32 [rows, K, m] scratch, then the K x K mix as one batched
// sgemm (H_K has +-1 entries, so every product is exact and only the sums round, as in the kernel),
// then scale and round once into y.
template <typename scalar_t>
void hadamard_k_rows(const scalar_t* x, scalar_t* y, const HadamardCall& c, bool transpose) {
  const int k = c.size.k;
  const int64_t m = int64_t{1} << c.size.log_n;
  const Device cpu(DeviceType::CPU);
  Tensor t = empty({c.rows, k, m}, ScalarType::Float, cpu);
  float* tp = t.mutable_data_ptr<float>();
  tersor::parallel_for(0, c.rows, row_grain(c.n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) load_and_fwht_subrows(x + r * c.n, tp + r * c.n, c.n, k, m);
  });
  Tensor hk = empty({k, k}, ScalarType::Float, cpu);
  const unsigned long long* bits = host_k_bits(k);
  float* hp = hk.mutable_data_ptr<float>();
  for (int a = 0; a < k; ++a)
    for (int b = 0; b < k; ++b)
      hp[a * k + b] = (transpose ? k_sign_bit(bits, k, b, a) : k_sign_bit(bits, k, a, b)) ? -1.f : 1.f;
  const Tensor mixed = torch::stable::matmul(hk, t);  // contiguous [rows, K, m]
  const float* mp = mixed.const_data_ptr<float>();
  tersor::parallel_for(0, c.rows, row_grain(c.n), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin * c.n; i < end * c.n; ++i) y[i] = static_cast<scalar_t>(mp[i] * c.scale);
  });
}

Tensor hadamard_transform_cpu(const Tensor& x, std::optional<double> scale, bool transpose) {
  TERSOR_CHECK(x.is_cpu(), "hadamard_transform (CPU kernel): expected a CPU tensor, got ", device_str(x));
  const HadamardCall c = check_hadamard_call(x, scale, "hadamard_transform");
  const Tensor xc = as_contiguous(x);
  Tensor y = empty(x.sizes(), x.scalar_type(), x.device());
  if (c.rows == 0) return y;
  dispatch_float(x.scalar_type(), "hadamard_transform", [&](auto tag) {
    using scalar_t = decltype(tag);
    if (c.size.k == 1) {
      hadamard_pow2_rows<scalar_t>(xc.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), c);
    } else {
      hadamard_k_rows<scalar_t>(xc.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), c, transpose);
    }
  });
  return y;
}

std::vector<int64_t> hadamard_k_sizes() { return {std::begin(kHadamardKs), std::end(kHadamardKs)}; }

std::vector<int64_t> hadamard_factor(int64_t n) {
  const FactoredSize f = factor_or_throw(n, "hadamard_transform");
  return {f.k, f.log_n};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(tersor, CPU, m) { m.impl("hadamard_transform", TORCH_BOX(&hadamard_transform_cpu)); }

// Tensor-free helpers: no backend to dispatch on, so they register for every key.
STABLE_TORCH_LIBRARY_IMPL(tersor, CompositeExplicitAutograd, m) {
  m.impl("_hadamard_k_sizes", TORCH_BOX(&hadamard_k_sizes));
  m.impl("_hadamard_factor", TORCH_BOX(&hadamard_factor));
}

}  // namespace tersor::hadamard
