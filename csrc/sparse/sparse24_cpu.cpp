// CPU implementations of the 2:4 ops: compress (dense -> format v1), decompress, and the linear
// y = x @ W^T + bias (fp32 accumulation, rounded once). The reference the CUDA kernels are judged against.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <bit>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "sparse/sparse24_format.h"
#include "sparse/sparse24_glue.h"

namespace tersor::sparse24 {
namespace {

// Rows of x up to which the linear runs the direct sparse loop; beyond, the product is compute-bound
// and decompressing once to fp32 + the BLAS GEMM (at::linear) is the faster route on a CPU.
constexpr int64_t kDirectMaxRows = 16;

template <typename T>
uint16_t bits16(T v) {
  uint16_t b;
  std::memcpy(&b, &v, 2);
  return b;
}

// The dense 4-element chunk (16-bit patterns, lowest address in the low bits) holding kept values v0, v1
// at positions idx0, idx1 of nibble `nib`: built in a register (the GPU decompress kernel does the same)
// rather than through an indexed array, which stalls on store-to-load forwarding.
inline uint64_t dense_chunk_bits(uint32_t nib, uint16_t v0, uint16_t v1) {
  return (static_cast<uint64_t>(v0) << (16 * nibble_idx0(nib))) | (static_cast<uint64_t>(v1) << (16 * nibble_idx1(nib)));
}

// Decodes row block rb (all k-tiles) into 16 dense rows of 16-bit patterns at w (row stride K).
void decode_row_block(const uint16_t* values, const uint32_t* meta, int64_t K, int64_t rb, uint16_t* w) {
  for (int64_t kt = 0; kt < K / kTileK; ++kt) {
    const uint16_t* tile = values + tile_offset(K, rb, kt);
    const uint32_t* words = meta + (rb * (K / kColAlign) + kt / 2) * 32;
    for (int lane = 0; lane < 32; ++lane) {
      const uint16_t* src = tile + lane * 8;
      // Slots (2j, 2j + 1) are both kept values of one chunk (tile_row_col): written as one 8-byte chunk.
      for (int j = 0; j < 4; ++j) {
        const RowCol rc = tile_row_col(lane, 2 * j);
        const int ct = rc.kc >> 1, cip = static_cast<int>(kt & 1) * 8 + ct;
        const uint32_t nib = (words[meta_lane(rc.r, cip)] >> meta_shift(rc.r, cip)) & 0xfu;
        const uint64_t chunk = dense_chunk_bits(nib, src[2 * j], src[2 * j + 1]);
        std::memcpy(w + rc.r * K + kt * kTileK + 4 * ct, &chunk, 8);
      }
    }
  }
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> compress_impl(const at::Tensor& weight) {
  const at::Tensor W = weight.contiguous();
  const int64_t M = W.size(0), K = W.size(1), chunks = K / 4;
  at::Tensor values = at::empty({M / kRowAlign, K / kTileK, kTileElems}, W.options());
  at::Tensor meta = at::zeros({M / kRowAlign, K / kColAlign, 32}, W.options().dtype(at::kInt));
  const T* w = W.const_data_ptr<T>();
  T* v = values.mutable_data_ptr<T>();
  uint32_t* mw = reinterpret_cast<uint32_t*>(meta.mutable_data_ptr<int32_t>());
  std::atomic<bool> bad{false};
  at::parallel_for(0, M / kRowAlign, 1, [&](int64_t b, int64_t e) {
    for (int64_t rb = b; rb < e; ++rb)
      for (int64_t row = rb * kRowAlign; row < (rb + 1) * kRowAlign; ++row)
        for (int64_t ch = 0; ch < chunks; ++ch) {
          const T* c = w + row * K + 4 * ch;
          uint32_t mask = 0;
          for (int i = 0; i < 4; ++i) mask |= uint32_t{(bits16(c[i]) & 0x7fffu) != 0} << i;  // -0.0 counts as 0
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
  if (bad.load()) {  // name the first offending chunk (serial rescan: errors are the rare path)
    for (int64_t i = 0; i < M * chunks; ++i) {
      const T* c = w + (i / chunks) * K + 4 * (i % chunks);
      int n = 0;
      for (int j = 0; j < 4; ++j) n += (bits16(c[j]) & 0x7fffu) != 0;
      TORCH_CHECK_VALUE(n <= 2, "sparse24_compress: the weight is not 2:4 sparse: row ", i / chunks, ", columns ",
                        4 * (i % chunks), "..", 4 * (i % chunks) + 3, " hold ", n,
                        " non-zeros (at most 2 of every 4 along K are allowed; prune with tersor.sparse.prune_2_4)");
    }
  }
  return {values, meta};
}

std::tuple<at::Tensor, at::Tensor> compress_cpu(const at::Tensor& weight) {
  constexpr const char* op = "sparse24_compress";
  check_value_dtype(weight.scalar_type(), op, "weight");
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be 2-d [out_features, in_features], got shape ",
                    weight.sizes());
  TORCH_CHECK_VALUE(weight.size(0) > 0 && weight.size(0) % kRowAlign == 0 && weight.size(1) > 0 &&
                        weight.size(1) % kColAlign == 0,
                    op, ": weight [M, K] needs M a positive multiple of ", kRowAlign, " and K a positive multiple of ",
                    kColAlign, " (format v1 tiles), got shape ", weight.sizes());
  if (weight.scalar_type() == at::kHalf) return compress_impl<c10::Half>(weight);
  return compress_impl<c10::BFloat16>(weight);
}

void decompress_into(const at::Tensor& values, const at::Tensor& meta, const Shape& s, uint16_t* out) {
  const uint16_t* v = reinterpret_cast<const uint16_t*>(values.const_data_ptr());
  const uint32_t* mw = reinterpret_cast<const uint32_t*>(meta.const_data_ptr<int32_t>());
  at::parallel_for(0, s.M / kRowAlign, 1, [&](int64_t b, int64_t e) {
    for (int64_t rb = b; rb < e; ++rb) decode_row_block(v, mw, s.K, rb, out + rb * kRowAlign * s.K);
  });
}

at::Tensor decompress_cpu(const at::Tensor& values_in, const at::Tensor& meta_in) {
  const Shape s = check_packed(values_in, meta_in, "sparse24_decompress");
  const at::Tensor values = values_in.contiguous(), meta = meta_in.contiguous();
  at::Tensor out = at::empty({s.M, s.K}, values.options());
  decompress_into(values, meta, s, reinterpret_cast<uint16_t*>(out.mutable_data_ptr()));
  return out;
}

// A tile's stored values widened to fp32 in one contiguous loop before the scatter-multiply. bfloat16 is a
// shift (vectorizes with SSE2). float16 uses the F16C conversion instruction when the CPU has it (x86-64
// since 2012; this file is built for baseline x86-64, so the instruction is enabled per function and chosen
// at run time), else c10's exact scalar conversion. The F16C form was 2x faster for the whole op at batch 1.
inline void widen_tile(const c10::BFloat16* src, float* dst) {
  for (int i = 0; i < kTileElems; ++i) dst[i] = std::bit_cast<float>(static_cast<uint32_t>(src[i].x) << 16);
}
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target("avx,f16c"))) void widen_tile_f16c(const c10::Half* src, float* dst) {
  for (int i = 0; i < kTileElems; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
}
const bool kCpuHasF16c = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");
#else
constexpr bool kCpuHasF16c = false;
void widen_tile_f16c(const c10::Half*, float*) {}
#endif
inline void widen_tile(const c10::Half* src, float* dst) {
  if (kCpuHasF16c) return widen_tile_f16c(src, dst);
  for (int i = 0; i < kTileElems; ++i) dst[i] = static_cast<float>(src[i]);
}

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
void linear_direct(const at::Tensor& values, const at::Tensor& meta, const Shape& s, const float* xt, int64_t B,
                   const float* bias, T* y) {
  const int64_t K = s.K, ktiles = K / kTileK;
  const T* v = values.const_data_ptr<T>();
  const uint32_t* mw = reinterpret_cast<const uint32_t*>(meta.const_data_ptr<int32_t>());
  at::parallel_for(0, s.M / kRowAlign, 1, [&](int64_t b, int64_t e) {
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
void linear_direct_dispatch(const at::Tensor& values, const at::Tensor& meta, const Shape& s, const at::Tensor& xf,
                            const float* bias, T* y) {
  const int64_t B = xf.size(0);
  const int64_t kb = B <= 1 ? 1 : B <= 4 ? 4 : B <= 8 ? 8 : 16;
  at::Tensor xt = at::zeros({s.K, kb}, xf.options());
  xt.narrow(1, 0, B).copy_(xf.t());
  const float* xp = xt.const_data_ptr<float>();
  switch (kb) {
    case 1: return linear_direct<T, 1>(values, meta, s, xp, B, bias, y);
    case 4: return linear_direct<T, 4>(values, meta, s, xp, B, bias, y);
    case 8: return linear_direct<T, 8>(values, meta, s, xp, B, bias, y);
    default: return linear_direct<T, 16>(values, meta, s, xp, B, bias, y);
  }
}

at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& values_in, const at::Tensor& meta_in,
                      const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "sparse24_linear";
  const Shape s = check_packed(values_in, meta_in, op);
  const std::vector<int64_t> out_shape = check_linear_inputs(x, bias, values_in, s, op);
  const at::Tensor values = values_in.contiguous(), meta = meta_in.contiguous();
  const at::Tensor xf = x.reshape({-1, s.K}).to(at::kFloat).contiguous();
  const int64_t B = xf.size(0);
  if (B == 0) return at::empty(out_shape, x.options());
  const std::optional<at::Tensor> bf =
      bias.has_value() ? std::optional<at::Tensor>(bias->to(at::kFloat).contiguous()) : std::nullopt;
  if (B > kDirectMaxRows) {
    at::Tensor w = at::empty({s.M, s.K}, values.options());
    decompress_into(values, meta, s, reinterpret_cast<uint16_t*>(w.mutable_data_ptr()));
    const at::Tensor wf = w.to(at::kFloat);  // exact widening; the fp32 GEMM accumulates in fp32
    return at::linear(xf, wf, bf).to(x.scalar_type()).reshape(out_shape);
  }
  at::Tensor y = at::empty({B, s.M}, x.options());
  const float* bp = bf.has_value() ? bf->const_data_ptr<float>() : nullptr;
  if (values.scalar_type() == at::kHalf)
    linear_direct_dispatch<c10::Half>(values, meta, s, xf, bp, y.mutable_data_ptr<c10::Half>());
  else
    linear_direct_dispatch<c10::BFloat16>(values, meta, s, xf, bp, y.mutable_data_ptr<c10::BFloat16>());
  return y.reshape(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(tersor, CPU, m) {
  m.impl("sparse24_compress", &compress_cpu);
  m.impl("sparse24_decompress", &decompress_cpu);
  m.impl("sparse24_linear", &linear_cpu);
}

}  // namespace tersor::sparse24
