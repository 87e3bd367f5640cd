// CPU implementations of the 2:4 ops: compress (dense -> format v1), decompress, and the linear
// y = x @ W^T + bias (fp32 accumulation, rounded once). The reference the CUDA kernels are judged against.
// float32 values (CPU-only) take the same paths with 4-byte elements: an exact fp32 2:4 layer.
#include <algorithm>
#include <atomic>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/torch_glue.h"
#include "sparse/sparse24_format.h"
#include "sparse/sparse24_glue.h"
#include "sparse/sparse24_route.h"

namespace tersor::sparse24 {
namespace {

// Rows of x up to which the linear runs the direct sparse loop; beyond, the product is compute-bound
// and decompressing once to fp32 + the BLAS GEMM (aten::linear) is the faster route on a CPU.
constexpr int64_t kDirectMaxRows = 16;

// The bit pattern of a stored value (uint16_t for float16/bfloat16, uint32_t for float32): the format
// moves values as opaque patterns, so packing and unpacking are exact for every value, NaN included.
template <typename T>
using BitsOf = std::conditional_t<sizeof(T) == 2, uint16_t, uint32_t>;

template <typename T>
BitsOf<T> bits_of(T v) {
  BitsOf<T> b;
  std::memcpy(&b, &v, sizeof b);
  return b;
}


// The dense 4-element chunk (16-bit patterns, lowest address in the low bits) holding kept values v0, v1
// at positions idx0, idx1 of nibble `nib`: built in a register (the GPU decompress kernel does the same)
// rather than through an indexed array, which stalls on store-to-load forwarding.
inline uint64_t dense_chunk_bits(uint32_t nib, uint16_t v0, uint16_t v1) {
  return (static_cast<uint64_t>(v0) << (16 * nibble_idx0(nib))) | (static_cast<uint64_t>(v1) << (16 * nibble_idx1(nib)));
}

// The dense chunk of 32-bit patterns: four scalar stores of one 16-byte chunk (float32 values).
inline void store_dense_chunk(uint32_t* dst, uint32_t nib, uint32_t v0, uint32_t v1) {
  uint32_t c[4] = {0, 0, 0, 0};
  c[nibble_idx0(nib)] = v0;
  c[nibble_idx1(nib)] = v1;
  std::memcpy(dst, c, sizeof c);
}
inline void store_dense_chunk(uint16_t* dst, uint32_t nib, uint16_t v0, uint16_t v1) {
  const uint64_t chunk = dense_chunk_bits(nib, v0, v1);
  std::memcpy(dst, &chunk, 8);
}

// Decodes row block rb (all k-tiles) into 16 dense rows of bit patterns at w (row stride K).
template <typename U>
void decode_row_block(const U* values, const uint32_t* meta, int64_t K, int64_t rb, U* w) {
  for (int64_t kt = 0; kt < K / kTileK; ++kt) {
    const U* tile = values + tile_offset(K, rb, kt);
    const uint32_t* words = meta + (rb * (K / kColAlign) + kt / 2) * 32;
    for (int lane = 0; lane < 32; ++lane) {
      const U* src = tile + lane * 8;
      // Slots (2j, 2j + 1) are both kept values of one chunk (tile_row_col): written as one dense chunk.
      for (int j = 0; j < 4; ++j) {
        const RowCol rc = tile_row_col(lane, 2 * j);
        const int ct = rc.kc >> 1, cip = static_cast<int>(kt & 1) * 8 + ct;
        const uint32_t nib = (words[meta_lane(rc.r, cip)] >> meta_shift(rc.r, cip)) & 0xfu;
        store_dense_chunk(w + rc.r * K + kt * kTileK + 4 * ct, nib, src[2 * j], src[2 * j + 1]);
      }
    }
  }
}

template <typename T>
std::tuple<Tensor, Tensor> compress_impl(const Tensor& weight) {
  const Tensor W = as_contiguous(weight);
  const int64_t M = W.size(0), K = W.size(1), chunks = K / 4;
  Tensor values = empty({M / kRowAlign, K / kTileK, kTileElems}, W.scalar_type(), W.device());
  Tensor meta = zeros({M / kRowAlign, K / kColAlign, 32}, ScalarType::Int, W.device());
  const T* w = W.const_data_ptr<T>();
  T* v = values.mutable_data_ptr<T>();
  uint32_t* mw = reinterpret_cast<uint32_t*>(meta.mutable_data_ptr<int32_t>());
  std::atomic<bool> bad{false};
  tersor::parallel_for(0, M / kRowAlign, 1, [&](int64_t b, int64_t e) {
    for (int64_t rb = b; rb < e; ++rb)
      for (int64_t row = rb * kRowAlign; row < (rb + 1) * kRowAlign; ++row)
        for (int64_t ch = 0; ch < chunks; ++ch) {
          const T* c = w + row * K + 4 * ch;
          uint32_t mask = 0;
          for (int i = 0; i < 4; ++i) mask |= uint32_t{nonzero_bits(bits_of(c[i]))} << i;  // -0.0 counts as 0
          const int nib = chunk_nibble_from_mask(mask);
          if (nib < 0) {
            bad.store(true, std::memory_order_relaxed);
            continue;
          }
          v[value_offset(K, row, 2 * ch)] = c[nibble_idx0(nib)];
          v[value_offset(K, row, 2 * ch + 1)] = c[nibble_idx1(nib)];
          const MetaPos mp = meta_pos(K, row, ch);
          mw[mp.word] |= static_cast<uint32_t>(nib) << mp.shift;
        }
  });
  // Names the first offending chunk (a serial rescan: errors are the rare path).
  if (bad.load()) throw_first_bad_chunk(reinterpret_cast<const BitsOf<T>*>(w), M, K);
  return {values, meta};
}

std::tuple<Tensor, Tensor> compress_cpu(const Tensor& weight) {
  constexpr const char* op = "sparse24_compress";
  check_value_dtype(weight.scalar_type(), op, "weight", /*allow_float32=*/true);
  TERSOR_CHECK_VALUE(weight.dim() == 2, op, ": weight must be 2-d [out_features, in_features], got shape ",
                     sizes_str(weight));
  TERSOR_CHECK_VALUE(weight.size(0) > 0 && weight.size(0) % kRowAlign == 0 && weight.size(1) > 0 &&
                         weight.size(1) % kColAlign == 0,
                     op, ": weight [M, K] needs M a positive multiple of ", kRowAlign,
                     " and K a positive multiple of ", kColAlign, " (format v1 tiles), got shape ", sizes_str(weight));
  if (weight.scalar_type() == ScalarType::Half) return compress_impl<Half>(weight);
  if (weight.scalar_type() == ScalarType::Float) return compress_impl<float>(weight);
  return compress_impl<BFloat16>(weight);
}

template <typename U>
void decompress_into(const Tensor& values, const Tensor& meta, const Shape& s, U* out) {
  const U* v = reinterpret_cast<const U*>(values.const_data_ptr());
  const uint32_t* mw = reinterpret_cast<const uint32_t*>(meta.const_data_ptr<int32_t>());
  tersor::parallel_for(0, s.M / kRowAlign, 1, [&](int64_t b, int64_t e) {
    for (int64_t rb = b; rb < e; ++rb) decode_row_block(v, mw, s.K, rb, out + rb * kRowAlign * s.K);
  });
}

// values' dtype decides the element width; out is a contiguous [M, K] tensor of that dtype.
void decompress_into(const Tensor& values, const Tensor& meta, const Shape& s, Tensor& out) {
  if (values.scalar_type() == ScalarType::Float)
    decompress_into(values, meta, s, reinterpret_cast<uint32_t*>(out.mutable_data_ptr()));
  else
    decompress_into(values, meta, s, reinterpret_cast<uint16_t*>(out.mutable_data_ptr()));
}

Tensor decompress_cpu(const Tensor& values_in, const Tensor& meta_in) {
  const Shape s = check_packed(values_in, meta_in, "sparse24_decompress", /*allow_float32=*/true);
  const Tensor values = as_contiguous(values_in), meta = as_contiguous(meta_in);
  Tensor out = empty({s.M, s.K}, values.scalar_type(), values.device());
  decompress_into(values, meta, s, out);
  return out;
}

// A tile's stored values widened to fp32 in one contiguous loop before the scatter-multiply. bfloat16 is a
// shift (vectorizes with SSE2). float16 uses the F16C conversion instruction when the CPU has it (x86-64
// since 2012; this file is built for baseline x86-64, so the instruction is enabled per function and chosen
// at run time), else the exact scalar conversion of torch's header-only Half. The F16C form was 2x faster for the whole op at batch 1.
inline void widen_tile(const BFloat16* src, float* dst) {
  for (int i = 0; i < kTileElems; ++i) dst[i] = __builtin_bit_cast(float, static_cast<uint32_t>(src[i].x) << 16);
}
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target("avx,f16c"))) void widen_tile_f16c(const Half* src, float* dst) {
  for (int i = 0; i < kTileElems; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
}
const bool kCpuHasF16c = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");
#else
constexpr bool kCpuHasF16c = false;
void widen_tile_f16c(const Half*, float*) {}
#endif
inline void widen_tile(const Half* src, float* dst) {
  if (kCpuHasF16c) return widen_tile_f16c(src, dst);
  for (int i = 0; i < kTileElems; ++i) dst[i] = static_cast<float>(src[i]);
}
inline void widen_tile(const float* src, float* dst) { std::memcpy(dst, src, kTileElems * sizeof(float)); }

// The direct loop below hoists the format's per-lane maps (tile_row_col, meta_lane, meta_shift) into
// closed forms; this proves at compile time that they are the same maps for every lane, pair and k-tile parity.
constexpr bool hoisted_maps_match_format() {
  for (int lane = 0; lane < 32; ++lane)
    for (int j = 0; j < 4; ++j)
      for (int odd = 0; odd < 2; ++odd) {
        const RowCol rc = tile_row_col(lane, 2 * j);
        const int gq = lane >> 2, tq = lane & 3, ct = tq + 4 * (j >> 1), cip = odd * 8 + rc.kc / 2;
        if (rc.r != gq + 8 * (j & 1) || rc.kc / 2 != ct || rc.kc % 2 != 0) return false;
        if (meta_lane(rc.r, cip) != 4 * gq + 2 * odd + (j >> 1)) return false;
        if (meta_shift(rc.r, cip) != 16 * (j & 1) + 4 * tq) return false;
      }
  return true;
}
static_assert(hoisted_maps_match_format(), "linear_direct's hoisted lane maps diverged from sparse24_format.h");

// y[n][row] for <= kDirectMaxRows rows of x, straight from the packed tiles: each kept value multiplies
// the x entries its metadata points at (half the multiplies of a dense row, no dense weight
// materialized). x is transposed to xt[k][kB] (rows padded with zeros to the bucket size kB, a
// compile-time constant) so the update of one chunk is a contiguous kB-wide multiply-add that
// vectorizes; the 16 x kB fp32 accumulators of a row block stay in L1.
template <typename T, int kB>
void linear_direct(const Tensor& values, const Tensor& meta, const Shape& s, const float* xt, int64_t B,
                   const float* bias, T* y) {
  const int64_t K = s.K, ktiles = K / kTileK;
  const T* v = values.const_data_ptr<T>();
  const uint32_t* mw = reinterpret_cast<const uint32_t*>(meta.const_data_ptr<int32_t>());
  tersor::parallel_for(0, s.M / kRowAlign, 1, [&](int64_t b, int64_t e) {
    alignas(64) float acc[kRowAlign][kB];
    for (int64_t rb = b; rb < e; ++rb) {
      std::fill(&acc[0][0], &acc[0][0] + kRowAlign * kB, 0.f);
      for (int64_t kt = 0; kt < ktiles; ++kt) {
        // The tile's 256 values widened in one contiguous loop (vectorizes), not one by one in the scatter.
        const T* tile = v + tile_offset(K, rb, kt);
        alignas(64) float vf[kTileElems];
        widen_tile(tile, vf);
        // Lane L's metadata words for this k-tile: its pairs j = 0, 1 in one word, j = 2, 3 in the next
        // (meta_lane / meta_shift with r = L/4 + 8 (j & 1), chunk-in-pair 8 (kt & 1) + L % 4 + 4 (j >> 1)).
        const uint32_t* words = mw + (rb * (K / kColAlign) + kt / 2) * 32 + 2 * (kt & 1);
        const float* xk = xt + kt * kTileK * kB;
        for (int lane = 0; lane < 32; ++lane) {
          const int gq = lane >> 2, tq = lane & 3;
          const uint32_t w01 = words[4 * gq], w23 = words[4 * gq + 1];
          const float* src = vf + lane * 8;
#pragma GCC unroll 4
          for (int j = 0; j < 4; ++j) {
            const uint32_t nib = ((j >> 1 ? w23 : w01) >> (16 * (j & 1) + 4 * tq)) & 0xfu;
            const int ct = tq + 4 * (j >> 1);
            const float v0 = src[2 * j], v1 = src[2 * j + 1];
            const float* x0 = xk + (4 * ct + nibble_idx0(nib)) * kB;
            const float* x1 = xk + (4 * ct + nibble_idx1(nib)) * kB;
            float* a = acc[gq + 8 * (j & 1)];
            for (int n = 0; n < kB; ++n) a[n] += v0 * x0[n] + v1 * x1[n];
          }
        }
      }
      for (int64_t n = 0; n < B; ++n)
        for (int r = 0; r < kRowAlign; ++r) {
          const int64_t row = rb * kRowAlign + r;
          y[n * s.M + row] = static_cast<T>(acc[r][n] + (bias ? bias[row] : 0.f));
        }
    }
  });
}

template <typename T>
void linear_direct_dispatch(const Tensor& values, const Tensor& meta, const Shape& s, const Tensor& xf,
                            const float* bias, T* y) {
  const int64_t B = xf.size(0);
  const int64_t kb = B <= 1 ? 1 : B <= 4 ? 4 : B <= 8 ? 8 : 16;
  Tensor xt = zeros({s.K, kb}, ScalarType::Float, xf.device());
  Tensor xt_cols = torch::stable::narrow(xt, 1, 0, B);
  torch::stable::copy_(xt_cols, torch::stable::transpose(xf, 0, 1));
  const float* xp = xt.const_data_ptr<float>();
  switch (kb) {
    case 1: return linear_direct<T, 1>(values, meta, s, xp, B, bias, y);
    case 4: return linear_direct<T, 4>(values, meta, s, xp, B, bias, y);
    case 8: return linear_direct<T, 8>(values, meta, s, xp, B, bias, y);
    default: return linear_direct<T, 16>(values, meta, s, xp, B, bias, y);
  }
}

// `path` names a CUDA kernel (auto | gemv | gemm | sm90): the CPU checks it as the CUDA op does (a known
// name; gemv only up to its row limit) and computes the same product whichever is named.
Tensor linear_cpu(const Tensor& x, const Tensor& values_in, const Tensor& meta_in, const std::optional<Tensor>& bias,
                  std::string path) {
  constexpr const char* op = "sparse24_linear";
  const Shape s = check_packed(values_in, meta_in, op, /*allow_float32=*/true);
  const std::vector<int64_t> out_shape = check_linear_inputs(x, bias, values_in, s, op);
  parse_path(path, x.numel() / s.K, op);
  const Tensor values = as_contiguous(values_in), meta = as_contiguous(meta_in);
  const Tensor xf = as_contiguous(as_dtype(torch::stable::reshape(x, {-1, s.K}), ScalarType::Float));
  const int64_t B = xf.size(0);
  if (B == 0) return empty(out_shape, x.scalar_type(), x.device());
  const std::optional<Tensor> bf =
      bias.has_value() ? std::optional<Tensor>(as_contiguous(as_dtype(*bias, ScalarType::Float))) : std::nullopt;
  if (B > kDirectMaxRows) {
    Tensor w = empty({s.M, s.K}, values.scalar_type(), values.device());
    decompress_into(values, meta, s, w);
    const Tensor wf = as_dtype(w, ScalarType::Float);  // exact widening; the fp32 GEMM accumulates in fp32
    return torch::stable::reshape(as_dtype(linear(xf, wf, bf), x.scalar_type()), out_shape);
  }
  Tensor y = empty({B, s.M}, x.scalar_type(), x.device());
  const float* bp = bf.has_value() ? bf->const_data_ptr<float>() : nullptr;
  if (values.scalar_type() == ScalarType::Half)
    linear_direct_dispatch<Half>(values, meta, s, xf, bp, y.mutable_data_ptr<Half>());
  else if (values.scalar_type() == ScalarType::Float)
    linear_direct_dispatch<float>(values, meta, s, xf, bp, y.mutable_data_ptr<float>());
  else
    linear_direct_dispatch<BFloat16>(values, meta, s, xf, bp, y.mutable_data_ptr<BFloat16>());
  return torch::stable::reshape(y, out_shape);
}

// The CUDA routing table (sparse24_route.h) for any compute capability, on any machine: the kernel name
// sparse24_linear runs for `rows` rows of x with argument `path`; has_sm90_cubin defaults to this build's.
std::string route(int64_t cc, int64_t rows, std::string path, std::optional<bool> has_sm90_cubin) {
  return kernel_name(route_linear(cc, rows, path, has_sm90_cubin.value_or(kBuildHasSm90Cubin), "_sparse24_route"));
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(tersor, CPU, m) {
  m.impl("sparse24_compress", TORCH_BOX(&compress_cpu));
  m.impl("sparse24_decompress", TORCH_BOX(&decompress_cpu));
  m.impl("sparse24_linear", TORCH_BOX(&linear_cpu));
}

// Tensor-free: no backend to dispatch on, so it registers for every key.
STABLE_TORCH_LIBRARY_IMPL(tersor, CompositeExplicitAutograd, m) { m.impl("_sparse24_route", TORCH_BOX(&route)); }

}  // namespace tersor::sparse24
