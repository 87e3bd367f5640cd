// Test-only ops of the attention family (tersor._C_testing, namespace tersor_testing): the shared e4m3 and
// integer rounding of sage_format.h, the kernels' quantization-group and FP8 V^T maps, and the CUDA routing
// table of sage_route.h for an explicit set of cubins (the shipped _sage_route answers for this build's).
#include <string>
#include <vector>

#include "attention/sage_cuda_layout.h"
#include "attention/sage_format.h"
#include "attention/xattn_format.h"
#include "attention/sage_glue.h"
#include "attention/sage_route.h"
#include "attention/sage_sm90_layout.h"
#include "common/torch_glue.h"

namespace tersor::attention {
namespace {

Tensor sage_float_to_e4m3(const Tensor& x) {
  TERSOR_CHECK_TYPE(x.scalar_type() == ScalarType::Float, "_sage_float_to_e4m3: expected float32, got ",
                    dtype_name(x.scalar_type()));
  const Tensor xc = as_contiguous(x);
  Tensor out = empty(xc.sizes(), ScalarType::Byte, xc.device());
  const float* src = xc.const_data_ptr<float>();
  uint8_t* dst = out.mutable_data_ptr<uint8_t>();
  tersor::parallel_for(0, xc.numel(), 1 << 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) dst[i] = float_to_e4m3(src[i]);
  });
  return out;
}

Tensor sage_e4m3_to_float(const Tensor& x) {
  TERSOR_CHECK_TYPE(x.scalar_type() == ScalarType::Byte, "_sage_e4m3_to_float: expected uint8, got ",
                    dtype_name(x.scalar_type()));
  const Tensor xc = as_contiguous(x);
  Tensor out = empty(xc.sizes(), ScalarType::Float, xc.device());
  const uint8_t* src = xc.const_data_ptr<uint8_t>();
  float* dst = out.mutable_data_ptr<float>();
  for (int64_t i = 0; i < xc.numel(); ++i) dst[i] = e4m3_to_float(src[i]);
  return out;
}

// Symmetric integer codes of x (float32, any shape) with one given scale reciprocal: the kernels' rounding.
Tensor sage_quantize_int(const Tensor& x, double inv_scale, int64_t bits) {
  TERSOR_CHECK_TYPE(x.scalar_type() == ScalarType::Float, "_sage_quantize_int: expected float32, got ",
                    dtype_name(x.scalar_type()));
  TERSOR_CHECK_VALUE(bits == 4 || bits == 8, "_sage_quantize_int: bits must be 4 or 8, got ", bits);
  const Tensor xc = as_contiguous(x);
  Tensor out = empty(xc.sizes(), ScalarType::Char, xc.device());
  const float* src = xc.const_data_ptr<float>();
  int8_t* dst = out.mutable_data_ptr<int8_t>();
  const float inv = static_cast<float>(inv_scale);
  for (int64_t i = 0; i < xc.numel(); ++i) dst[i] = static_cast<int8_t>(quantize_int(src[i], inv, static_cast<int>(bits)));
  return out;
}

// [q_group of each row < len_q, k_group of each token < len_k] concatenated, for layout tests.
std::vector<int64_t> sage_group_maps(int64_t len_q, int64_t len_k) {
  TERSOR_CHECK_VALUE(len_q >= 0 && len_k >= 0, "_sage_group_maps: lengths must be >= 0");
  std::vector<int64_t> r;
  r.reserve(len_q + len_k);
  for (int64_t i = 0; i < len_q; ++i) r.push_back(q_group(i));
  for (int64_t j = 0; j < len_k; ++j) r.push_back(k_group(j));
  return r;
}

std::vector<int64_t> sage_v_fp8_positions(int64_t n) {
  TERSOR_CHECK_VALUE(n >= 0 && n % 16 == 0, "_sage_v_fp8_positions: n must be a non-negative multiple of 16, got ", n);
  std::vector<int64_t> r(n);
  for (int64_t p = 0; p < n; ++p) r[p] = v_fp8_position_token(p);
  return r;
}

// _sage_route for the cubins in `cubins` ("prologue=80-real,89-real;s8_f16=...", see parse_sage_cubins).
std::string sage_route_for(int64_t cc, int64_t qk_bits, std::string pv, bool smooth_q, std::string kernel,
                           std::string cubins) {
  SageCubins c;
  std::string err;
  TERSOR_CHECK_VALUE(parse_sage_cubins(cubins, &c, &err), "_sage_route_for: cubins: ", err);
  return sage_path_name(route_or_throw(static_cast<int>(cc), qk_bits, pv, smooth_q, kernel, c, "_sage_route_for").path);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(tersor_testing, CPU, m) {
  m.impl("_sage_float_to_e4m3", TORCH_BOX(&sage_float_to_e4m3));
  m.impl("_sage_e4m3_to_float", TORCH_BOX(&sage_e4m3_to_float));
  m.impl("_sage_quantize_int", TORCH_BOX(&sage_quantize_int));
}

// Tensor-free helpers: no backend to dispatch on, so they register for every key.
namespace {

// The CUDA path's 64-bit index functions (sage_cuda_layout.h, sage_sm90_layout.h) evaluated on the host, so
// tests can check them at sizes past 2^31 without allocating anything.
std::vector<int64_t> sage_index(std::string fn, std::vector<int64_t> a) {
  auto need = [&](size_t n) {
    TERSOR_CHECK_VALUE(a.size() == n, "_sage_index: ", fn, " takes ", n, " arguments, got ", a.size());
  };
  auto i32 = [](int64_t v) { return static_cast<int>(v); };
  if (fn == "qk_row_offset") {  // [bh, len_pad, row, row_bytes]
    need(4);
    return {qk_row_offset(a[0], a[1], a[2], i32(a[3]))};
  }
  if (fn == "v_t_offset") {  // [bkv, head_dim, len_k_pad, c, p, elem_bytes]
    need(6);
    return {v_t_offset(a[0], i32(a[1]), a[2], i32(a[3]), a[4], i32(a[5]))};
  }
  if (fn == "out_row_offset") {  // [bh, len_q, row, head_dim]
    need(4);
    return {out_row_offset(a[0], a[1], a[2], i32(a[3]))};
  }
  if (fn == "q_scale_index") {  // [bh, len_q_pad, row, g]
    need(4);
    return {q_scale_index(a[0], a[1], a[2], i32(a[3]))};
  }
  if (fn == "k_scale_index") {  // [bkv, len_k_pad, tile, t]
    need(4);
    return {k_scale_index(a[0], a[1], a[2], i32(a[3]))};
  }
  if (fn == "q_bias_index") {  // [bh, len_q_pad, len_k_pad, row, token]
    need(5);
    return {q_bias_index(a[0], a[1], a[2], a[3], a[4])};
  }
  if (fn == "cuda_max_len") {
    need(0);
    return {kSageCudaMaxLen};
  }
  if (fn == "sm90_tile_base") {  // [bkv, len_k_pad, tile, head_dim]
    need(4);
    return {sm90_tile_base(a[0], a[1], a[2], i32(a[3]))};
  }
  // Block sparsity (sage_format.h) and XAttention scoring (xattn_format.h).
  if (fn == "block_mask_row_offset") {  // [b, h, qb, mask_heads, q_blocks, k_blocks]
    need(6);
    return {block_mask_row_offset(a[0], a[1], a[2], a[3], a[4], a[5])};
  }
  if (fn == "live_tiles") {  // [n_tiles, tile_keys, mask row bytes...]: the tiles a kernel walks, in order
    TERSOR_CHECK_VALUE(a.size() >= 2, "_sage_index: live_tiles takes n_tiles, tile_keys and the mask row");
    const std::vector<uint8_t> row(a.begin() + 2, a.end());
    const int n_tiles = i32(a[0]), tile_keys = i32(a[1]);
    TERSOR_CHECK_VALUE(static_cast<int64_t>(row.size()) * kSparseBlockK >= static_cast<int64_t>(n_tiles) * tile_keys,
                       "_sage_index: live_tiles: the mask row is shorter than the tiles");
    std::vector<int64_t> out;
    for (int t = next_live_tile(row.data(), 0, n_tiles, tile_keys); t < n_tiles;
         t = next_live_tile(row.data(), t + 1, n_tiles, tile_keys))
      out.push_back(t);
    return out;
  }
  // Causal / sliding-window visibility (sage_format.h).
  if (fn == "visible_keys") {  // [row, len_q, len_k, causal, left, right] -> [lo, hi]
    need(6);
    const KeySpan k = visible_keys(KeyMask{a[3] != 0, a[4], a[5]}, a[0], a[1], a[2]);
    return {k.lo, k.hi};
  }
  if (fn == "visible_tiles") {  // [r0, r_last, len_q, len_k, causal, left, right, tile_keys] -> [first, end]
    need(8);
    const TileSpan t = visible_tiles(KeyMask{a[4] != 0, a[5], a[6]}, a[0], a[1], a[2], a[3], i32(a[7]));
    return {t.first, t.end};
  }
  if (fn == "xattn_rows") {  // [i, s, stride]: (query row, key row) at position s of reduced query / key i
    need(3);
    return {xattn_query_row(a[0], a[1], a[2]), xattn_key_row(a[0], a[1], a[2])};
  }
  if (fn == "xattn_visible_reduced_keys") {  // [i, stride, len_q, len_k, causal]
    need(5);
    return {xattn_visible_reduced_keys(a[0], a[1], a[2], a[3], a[4] != 0)};
  }
  if (fn == "xattn_causal_visible") {  // [i, j, stride, len_q, len_k]
    need(5);
    return {xattn_causal_visible(a[0], a[1], a[2], a[3], a[4]) ? 1 : 0};
  }
  if (fn == "xattn_diagonal_block") {  // [qb, block, len_q, len_k]
    need(4);
    return {xattn_diagonal_block(a[0], a[1], a[2], a[3])};
  }
  TERSOR_CHECK_VALUE(false, "_sage_index: unknown function ", fn);
  return {};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(tersor_testing, CompositeExplicitAutograd, m) {
  m.impl("_sage_index", TORCH_BOX(&sage_index));
  m.impl("_sage_group_maps", TORCH_BOX(&sage_group_maps));
  m.impl("_sage_v_fp8_positions", TORCH_BOX(&sage_v_fp8_positions));
  m.impl("_sage_route_for", TORCH_BOX(&sage_route_for));
}

}  // namespace tersor::attention
