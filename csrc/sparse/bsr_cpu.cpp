// CPU implementation of bsr_linear: y = x @ W^T (+ bias) for a BSR weight (docs/formats.md, BSR v1).
// fp32 accumulation, one rounding at the end (16-bit types); the reference the CUDA kernel is judged
// against. Parallel over (block row, token tile of 32); each weight block is widened to fp32 once per
// token tile; products in block_dot / block_tile4 below.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "common/torch_glue.h"
#include "sparse/bsr_format.h"
#include "sparse/bsr_glue.h"

namespace tersor::sparse {
namespace {

constexpr int64_t kCpuTokenTile = 32;

// The block products, in two shapes (written so that the compiler vectorizes them; compiled twice, for
// the baseline ISA and for AVX2+FMA, picked at run time):
//  * per token: out[m] += <W[m, :], x> in 8 independent lanes, summed in a fixed order (no transposed copy
//    needed, so one token costs one pass over the block);
//  * 4 tokens at once: out[t][m0..m0+16) += x[t][k] W^T[k][m0..m0+16) over k, a 4 x 16 register tile
//    (8 ymm accumulators with AVX2) against the block transposed once per token tile.
#define TERSOR_BSR_KERNELS(ATTR)                                                                          \
  template <int BS>                                                                                         \
  ATTR void block_dot(const float* __restrict__ w, const float* __restrict__ x, float* __restrict__ out) { \
    for (int m = 0; m < BS; ++m) {                                                                          \
      const float* wr = w + m * BS;                                                                         \
      float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};                                                             \
      for (int k = 0; k < BS; k += 8)                                                                       \
        for (int l = 0; l < 8; ++l) lane[l] += wr[k + l] * x[k + l];                                        \
      out[m] += ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));  \
    }                                                                                                       \
  }                                                                                                         \
  template <int BS>                                                                                         \
  ATTR void block_tile4(const float* __restrict__ wt, const float* __restrict__ x, int64_t ldx,            \
                        float* __restrict__ out) {                                                          \
    for (int m0 = 0; m0 < BS; m0 += 16) {                                                                   \
      float a[4][16];                                                                                       \
      for (int t = 0; t < 4; ++t)                                                                           \
        for (int mm = 0; mm < 16; ++mm) a[t][mm] = out[t * BS + m0 + mm];                                   \
      for (int k = 0; k < BS; ++k) {                                                                        \
        const float* w = wt + k * BS + m0;                                                                  \
        for (int t = 0; t < 4; ++t) {                                                                       \
          const float xv = x[t * ldx + k];                                                                  \
          for (int mm = 0; mm < 16; ++mm) a[t][mm] += xv * w[mm];                                           \
        }                                                                                                   \
      }                                                                                                     \
      for (int t = 0; t < 4; ++t)                                                                           \
        for (int mm = 0; mm < 16; ++mm) out[t * BS + m0 + mm] = a[t][mm];                                   \
    }                                                                                                       \
  }

namespace base {
TERSOR_BSR_KERNELS()
}  // namespace base
namespace avx2 {
// Hand-written: GCC's auto-vectorization of the tile above scatters the 4 x 16 tile over xmm halves and
// the stack. Same arithmetic order as the portable version up to FMA contraction.
#define TERSOR_AVX2_FN __attribute__((target("avx2,fma")))

TERSOR_AVX2_FN inline float hsum8(__m256 v) {
  alignas(32) float l[8];
  _mm256_store_ps(l, v);
  return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

template <int BS>
TERSOR_AVX2_FN void block_dot(const float* __restrict__ w, const float* __restrict__ x, float* __restrict__ out) {
  for (int m = 0; m < BS; m += 4) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int k = 0; k < BS; k += 8) {
      const __m256 xv = _mm256_loadu_ps(x + k);
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + (m + 0) * BS + k), xv, a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + (m + 1) * BS + k), xv, a1);
      a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + (m + 2) * BS + k), xv, a2);
      a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + (m + 3) * BS + k), xv, a3);
    }
    out[m + 0] += hsum8(a0);
    out[m + 1] += hsum8(a1);
    out[m + 2] += hsum8(a2);
    out[m + 3] += hsum8(a3);
  }
}

template <int BS>
TERSOR_AVX2_FN void block_tile4(const float* __restrict__ wt, const float* __restrict__ x, int64_t ldx,
                                float* __restrict__ out) {
  for (int m0 = 0; m0 < BS; m0 += 16) {
    __m256 a[4][2];
    for (int t = 0; t < 4; ++t)
      for (int h = 0; h < 2; ++h) a[t][h] = _mm256_loadu_ps(out + t * BS + m0 + 8 * h);
    for (int k = 0; k < BS; ++k) {
      const __m256 w0 = _mm256_loadu_ps(wt + k * BS + m0), w1 = _mm256_loadu_ps(wt + k * BS + m0 + 8);
      for (int t = 0; t < 4; ++t) {
        const __m256 xv = _mm256_broadcast_ss(x + t * ldx + k);
        a[t][0] = _mm256_fmadd_ps(xv, w0, a[t][0]);
        a[t][1] = _mm256_fmadd_ps(xv, w1, a[t][1]);
      }
    }
    for (int t = 0; t < 4; ++t)
      for (int h = 0; h < 2; ++h) _mm256_storeu_ps(out + t * BS + m0 + 8 * h, a[t][h]);
  }
}
#undef TERSOR_AVX2_FN
}  // namespace avx2
#undef TERSOR_BSR_KERNELS

// Widening a 16-bit block to fp32 (once per block and token tile): bf16 is a shift (vectorizes as is);
// fp16 uses F16C where the CPU has it (Half's portable conversion costs ~20x the block's products).
void widen_bf16(const BFloat16* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = static_cast<uint32_t>(src[i].x) << 16;
    std::memcpy(dst + i, &u, 4);
  }
}
void widen_f16_portable(const Half* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
__attribute__((target("avx,f16c"))) void widen_f16_f16c(const Half* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; i += 8)  // n is a multiple of 256
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
}
void widen(const BFloat16* src, float* dst, int64_t n) { widen_bf16(src, dst, n); }
void widen(const Half* src, float* dst, int64_t n) {
  static const bool f16c = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  if (f16c)
    widen_f16_f16c(src, dst, n);
  else
    widen_f16_portable(src, dst, n);
}

bool cpu_has_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

template <int BS>
struct BlockKernels {
  void (*dot)(const float*, const float*, float*);
  void (*tile4)(const float*, const float*, int64_t, float*);
};
template <int BS>
BlockKernels<BS> block_kernels() {
  if (cpu_has_avx2_fma()) return {&avx2::block_dot<BS>, &avx2::block_tile4<BS>};
  return {&base::block_dot<BS>, &base::block_tile4<BS>};
}

template <typename T, int BS>
void bsr_linear_kernel(const BsrCall& c, const float* x32, const T* values, const int32_t* crow, const int32_t* col,
                       const T* bias, T* y) {
  const int64_t T_ = c.tokens, K = c.in_features, N = c.out_features;
  const int64_t n_tt = (T_ + kCpuTokenTile - 1) / kCpuTokenTile;
  const BlockKernels<BS> kern = block_kernels<BS>();
  tersor::parallel_for(0, c.mb * n_tt, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> wblock(BS * BS), wt(BS * BS), acc(kCpuTokenTile * BS);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / n_tt, t0 = (task % n_tt) * kCpuTokenTile;
      const int64_t nt = std::min(kCpuTokenTile, T_ - t0);
      const int64_t n4 = nt / 4 * 4;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = crow[r]; j < crow[r + 1]; ++j) {
        const T* v = values + j * BS * BS;
        const float* w;
        if constexpr (std::is_same_v<T, float>) {
          w = v;
        } else {
          widen(v, wblock.data(), BS * BS);
          w = wblock.data();
        }
        const float* xcol = x32 + static_cast<int64_t>(col[j]) * BS + t0 * K;
        if (n4 > 0) {
          for (int m = 0; m < BS; ++m)
            for (int k = 0; k < BS; ++k) wt[k * BS + m] = w[m * BS + k];
          for (int64_t t = 0; t < n4; t += 4) kern.tile4(wt.data(), xcol + t * K, K, acc.data() + t * BS);
        }
        for (int64_t t = n4; t < nt; ++t) kern.dot(w, xcol + t * K, acc.data() + t * BS);
      }
      for (int64_t t = 0; t < nt; ++t)
        for (int64_t m = 0; m < BS; ++m) {
          float s = acc[t * BS + m];
          if (bias) s += static_cast<float>(bias[r * BS + m]);
          y[(t0 + t) * N + r * BS + m] = static_cast<T>(s);
        }
    }
  });
}

template <typename T>
void bsr_linear_dispatch(const BsrCall& c, const float* x32, const T* values, const int32_t* crow,
                         const int32_t* col, const T* bias, T* y) {
  switch (c.bs) {
    case 16: return bsr_linear_kernel<T, 16>(c, x32, values, crow, col, bias, y);
    case 32: return bsr_linear_kernel<T, 32>(c, x32, values, crow, col, bias, y);
    default: return bsr_linear_kernel<T, 64>(c, x32, values, crow, col, bias, y);
  }
}

Tensor bsr_linear_cpu(const Tensor& x, const Tensor& crow_indices, const Tensor& col_indices, const Tensor& values,
                      const Tensor& schedule, int64_t in_features, const std::optional<Tensor>& bias) {
  constexpr const char* op = "bsr_linear";
  const BsrCall c = check_bsr_call(x, crow_indices, col_indices, values, schedule, in_features, bias, op);
  TERSOR_CHECK(x.is_cpu(), op, " (CPU kernel): expected CPU tensors, got ", device_str(x));
  const Tensor crow = as_contiguous(crow_indices), col = as_contiguous(col_indices);
  check_bsr_indices_cpu(c, crow, col, op);
  Tensor y = empty({c.tokens, c.out_features}, x.scalar_type(), x.device());
  if (c.tokens == 0) return torch::stable::reshape(y, c.out_shape);
  const Tensor x32 =
      as_contiguous(as_dtype(torch::stable::reshape(x, {c.tokens, c.in_features}), ScalarType::Float));
  const Tensor v = as_contiguous(values);
  std::optional<Tensor> b;
  if (bias) b = as_contiguous(*bias);
  auto run = [&](auto tag) {
    using scalar_t = decltype(tag);
    bsr_linear_dispatch<scalar_t>(c, x32.const_data_ptr<float>(), v.const_data_ptr<scalar_t>(),
                                  crow.const_data_ptr<int32_t>(), col.const_data_ptr<int32_t>(),
                                  b ? b->const_data_ptr<scalar_t>() : nullptr, y.mutable_data_ptr<scalar_t>());
  };
  switch (x.scalar_type()) {  // check_bsr_call admitted exactly these
    case ScalarType::Float: run(float{}); break;
    case ScalarType::Half: run(Half{}); break;
    default: run(BFloat16{}); break;
  }
  return torch::stable::reshape(y, c.out_shape);
}

// Validates a schedule (and the index arrays) against the format; returns [version, bs, Mb, S, n_partials].
std::vector<int64_t> bsr_check_cpu(const Tensor& crow_indices, const Tensor& col_indices, const Tensor& values,
                                   const Tensor& schedule, int64_t in_features) {
  constexpr const char* op = "_bsr_check";
  TERSOR_CHECK(crow_indices.is_cpu(), op, ": expects CPU tensors");
  TERSOR_CHECK_VALUE(in_features >= 0, op, ": in_features must be non-negative, got ", in_features);
  const Tensor x = empty({0, in_features}, values.scalar_type(), values.device());
  const BsrCall c = check_bsr_call(x, crow_indices, col_indices, values, schedule, in_features, std::nullopt, op);
  const Tensor crow = as_contiguous(crow_indices), sched = as_contiguous(schedule);
  check_bsr_indices_cpu(c, crow, as_contiguous(col_indices), op);
  check_bsr_schedule_cpu(c, crow, sched, op);
  const int64_t n_partials = sched.const_data_ptr<int32_t>()[bsr_partial_ptr_offset(c.mb, c.n_split) + c.mb];
  return {kBsrFormatVersion, c.bs, c.mb, c.n_split, n_partials};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(tersor, CPU, m) {
  m.impl("bsr_linear", TORCH_BOX(&bsr_linear_cpu));
  m.impl("_bsr_check", TORCH_BOX(&bsr_check_cpu));
}

}  // namespace tersor::sparse
