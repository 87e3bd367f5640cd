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
// Dense columns decoded at a time per 16-row block: 16 x 256 fp32 = 16 KiB stays in L1.
constexpr int kDecodeTiles = 8;

template <typename T>
uint16_t bits16(T v) {
  uint16_t b;
  std::memcpy(&b, &v, 2);
  return b;
}

// Decodes k-tiles [kt0, kt0 + ntiles) of row block rb into dense rows w[16][ldw] (column 0 = dense
// column 32 * kt0); pruned positions are zero.
template <typename T, typename Out>
void decode_tiles(const T* values, const uint32_t* meta, int64_t K, int64_t rb, int64_t kt0, int ntiles, Out* w,
                  int64_t ldw) {
  for (int r = 0; r < kRowAlign; ++r) std::fill(w + r * ldw, w + r * ldw + ntiles * kTileK, Out(0.f));
  for (int t = 0; t < ntiles; ++t) {
    const int64_t kt = kt0 + t;
    const T* tile = values + tile_offset(K, rb, kt);
    const uint32_t* words = meta + (rb * (K / kColAlign) + kt / 2) * 32;
    for (int lane = 0; lane < 32; ++lane)
      for (int slot = 0; slot < 8; ++slot) {
        const RowCol rc = tile_row_col(lane, slot);
        const int ct = rc.kc >> 1, cip = static_cast<int>(kt & 1) * 8 + ct;
        const uint32_t nib = (words[meta_lane(rc.r, cip)] >> meta_shift(rc.r, cip)) & 0xfu;
        const int idx = (rc.kc & 1) ? nibble_idx1(nib) : nibble_idx0(nib);
        w[rc.r * ldw + t * kTileK + 4 * ct + idx] = static_cast<Out>(tile[lane * 8 + slot]);
      }
  }
}

// Sum of a[i] * b[i] for n a multiple of 8, in 8 independent fp32 lanes (so the loop vectorizes).
inline float dot8(const float* a, const float* b, int n) {
  float p[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int i = 0; i < n; i += 8)
    for (int j = 0; j < 8; ++j) p[j] += a[i + j] * b[i + j];
  return ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
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

template <typename T, typename Out>
void decompress_into(const at::Tensor& values, const at::Tensor& meta, const Shape& s, Out* out) {
  const T* v = values.const_data_ptr<T>();
  const uint32_t* mw = reinterpret_cast<const uint32_t*>(meta.const_data_ptr<int32_t>());
  at::parallel_for(0, s.M / kRowAlign, 1, [&](int64_t b, int64_t e) {
    for (int64_t rb = b; rb < e; ++rb) decode_tiles<T, Out>(v, mw, s.K, rb, 0, static_cast<int>(s.K / kTileK),
                                                            out + rb * kRowAlign * s.K, s.K);
  });
}

at::Tensor decompress_cpu(const at::Tensor& values_in, const at::Tensor& meta_in) {
  const Shape s = check_packed(values_in, meta_in, "sparse24_decompress");
  const at::Tensor values = values_in.contiguous(), meta = meta_in.contiguous();
  at::Tensor out = at::empty({s.M, s.K}, values.options());
  if (values.scalar_type() == at::kHalf)
    decompress_into<c10::Half, c10::Half>(values, meta, s, out.mutable_data_ptr<c10::Half>());
  else
    decompress_into<c10::BFloat16, c10::BFloat16>(values, meta, s, out.mutable_data_ptr<c10::BFloat16>());
  return out;
}

template <typename T>
void linear_direct(const at::Tensor& values, const at::Tensor& meta, const Shape& s, const at::Tensor& xf,
                   const float* bias, T* y) {
  const int64_t B = xf.size(0), K = s.K, ktiles = K / kTileK;
  const T* v = values.const_data_ptr<T>();
  const uint32_t* mw = reinterpret_cast<const uint32_t*>(meta.const_data_ptr<int32_t>());
  const float* x = xf.const_data_ptr<float>();
  at::parallel_for(0, s.M / kRowAlign, 1, [&](int64_t b, int64_t e) {
    std::vector<float> w(kRowAlign * kDecodeTiles * kTileK);
    std::vector<float> acc(kRowAlign * B);
    for (int64_t rb = b; rb < e; ++rb) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t kt0 = 0; kt0 < ktiles; kt0 += kDecodeTiles) {
        const int nt = static_cast<int>(std::min<int64_t>(kDecodeTiles, ktiles - kt0));
        decode_tiles<T, float>(v, mw, K, rb, kt0, nt, w.data(), kDecodeTiles * kTileK);
        for (int64_t n = 0; n < B; ++n) {
          const float* xr = x + n * K + kt0 * kTileK;
          for (int r = 0; r < kRowAlign; ++r)
            acc[r * B + n] += dot8(w.data() + r * kDecodeTiles * kTileK, xr, nt * kTileK);
        }
      }
      for (int64_t n = 0; n < B; ++n)
        for (int r = 0; r < kRowAlign; ++r) {
          const int64_t row = rb * kRowAlign + r;
          y[n * s.M + row] = static_cast<T>(acc[r * B + n] + (bias ? bias[row] : 0.f));
        }
    }
  });
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
    at::Tensor wf = at::empty({s.M, s.K}, values.options().dtype(at::kFloat));
    if (values.scalar_type() == at::kHalf)
      decompress_into<c10::Half, float>(values, meta, s, wf.mutable_data_ptr<float>());
    else
      decompress_into<c10::BFloat16, float>(values, meta, s, wf.mutable_data_ptr<float>());
    return at::linear(xf, wf, bf).to(x.scalar_type()).reshape(out_shape);
  }
  at::Tensor y = at::empty({B, s.M}, x.options());
  const float* bp = bf.has_value() ? bf->const_data_ptr<float>() : nullptr;
  if (values.scalar_type() == at::kHalf)
    linear_direct<c10::Half>(values, meta, s, xf, bp, y.mutable_data_ptr<c10::Half>());
  else
    linear_direct<c10::BFloat16>(values, meta, s, xf, bp, y.mutable_data_ptr<c10::BFloat16>());
  return y.reshape(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(tersor, CPU, m) {
  m.impl("sparse24_compress", &compress_cpu);
  m.impl("sparse24_decompress", &decompress_cpu);
  m.impl("sparse24_linear", &linear_cpu);
}

}  // namespace tersor::sparse24
