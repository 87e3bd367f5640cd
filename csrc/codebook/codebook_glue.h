// Argument checking shared by the codebook family's CPU and CUDA torch glue (host C++ only).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cmath>
#include <optional>
#include <vector>

namespace tersor::codebook {

// Default residual scales of QuIP#'s RVQ (W^ = D(q1) + D2(q2) / resid_scale); a checkpoint's
// quip_params.resid_scale_override replaces them.
inline constexpr double kResidScale4 = 3.45;
inline constexpr double kResidScale3 = 2.04;

struct E8PCall {
  int64_t m = 0, n = 0;
  int bits = 2;
  int64_t row_words = 0;  // int64 words per row of Qidxs
  float resid_scale = 1.0f;
};

// Validates QuIP#-layout Qidxs for `in_features` = n and returns the geometry; the bit width follows
// from the width of Qidxs: n/32 (2 bits), 3n/64 (3 bits, E8P + E81B), n/16 (4 bits, two E8P stages).
inline E8PCall check_e8p_call(const at::Tensor& qidxs, int64_t n, const std::optional<double>& resid_scale,
                              const char* op) {
  TORCH_CHECK_TYPE(qidxs.scalar_type() == at::kLong, op, ": Qidxs must be int64 (QuIP#'s packed codes), got ",
                   qidxs.scalar_type());
  TORCH_CHECK_VALUE(qidxs.dim() == 2, op, ": Qidxs must be 2-d [out_features, words], got shape ", qidxs.sizes());
  TORCH_CHECK_VALUE(n > 0 && n % 64 == 0, op, ": in_features must be a positive multiple of 64 (QuIP#'s E8P layout), got ",
                    n);
  TORCH_CHECK_VALUE(n < (int64_t{1} << 31), op, ": in_features too large: ", n);
  E8PCall c;
  c.m = qidxs.size(0);
  c.n = n;
  c.row_words = qidxs.size(1);
  TORCH_CHECK_VALUE(c.m > 0 && c.m % 16 == 0, op, ": out_features (rows of Qidxs) must be a positive multiple of 16, got ",
                    c.m);
  if (c.row_words == n / 32) {
    c.bits = 2;
  } else if (c.row_words == 3 * n / 64) {
    c.bits = 3;
  } else if (c.row_words == n / 16) {
    c.bits = 4;
  } else {
    TORCH_CHECK_VALUE(false, op, ": Qidxs has ", c.row_words, " words per row; for in_features = ", n,
                      " that must be ", n / 32, " (2 bits), ", 3 * n / 64, " (3 bits) or ", n / 16, " (4 bits)");
  }
  const double rs = resid_scale.value_or(c.bits == 3 ? kResidScale3 : kResidScale4);
  TORCH_CHECK_VALUE(std::isfinite(rs) && rs > 0, op, ": resid_scale must be positive and finite, got ", rs);
  c.resid_scale = static_cast<float>(rs);
  return c;
}

struct AQLMCall {
  int64_t out = 0, in = 0, groups = 0;  // groups = in / 8 per output row
  int num_codebooks = 1, nbits = 8;
  uint32_t index_mask = 0xff;
};

// AQLM tensors as its checkpoints store them: codes [out/og, in/ig, C] (int8 for <= 8-bit codebooks,
// int16 for <= 16; stored signed, index = code mod 2^nbits), codebooks [C, 2^nbits, og, ig],
// scales [out/og, 1, 1, 1]. The kernels support out_group_size 1 and in_group_size 8 (the 1x16 and
// 2x8 configurations), up to 8 codebooks.
inline AQLMCall check_aqlm_call(const at::Tensor& codes, const at::Tensor& codebooks, const at::Tensor& scales,
                                const char* op) {
  TORCH_CHECK_TYPE(codes.scalar_type() == at::kChar || codes.scalar_type() == at::kShort, op,
                   ": codes must be int8 (codebooks of <= 256 entries) or int16 (<= 65536), got ", codes.scalar_type());
  TORCH_CHECK_TYPE(codebooks.is_floating_point() && (codebooks.scalar_type() == at::kFloat ||
                                                     codebooks.scalar_type() == at::kHalf ||
                                                     codebooks.scalar_type() == at::kBFloat16),
                   op, ": codebooks must be float32, float16 or bfloat16, got ", codebooks.scalar_type());
  TORCH_CHECK_TYPE(scales.scalar_type() == at::kFloat || scales.scalar_type() == at::kHalf ||
                       scales.scalar_type() == at::kBFloat16,
                   op, ": scales must be float32, float16 or bfloat16, got ", scales.scalar_type());
  TORCH_CHECK_VALUE(codes.dim() == 3, op, ": codes must be [out/out_group, in/in_group, num_codebooks], got shape ",
                    codes.sizes());
  TORCH_CHECK_VALUE(codebooks.dim() == 4, op,
                    ": codebooks must be [num_codebooks, 2^nbits, out_group, in_group], got shape ", codebooks.sizes());
  TORCH_CHECK_VALUE(codebooks.size(2) == 1 && codebooks.size(3) == 8, op,
                    ": the kernels support out_group_size 1 and in_group_size 8 (AQLM 1x16, 2x8); got codebooks ",
                    codebooks.sizes(), " (tersor.quant.aqlm_dequantize_reference handles any group size)");
  AQLMCall c;
  c.num_codebooks = static_cast<int>(codebooks.size(0));
  const int64_t entries = codebooks.size(1);
  TORCH_CHECK_VALUE(c.num_codebooks >= 1 && c.num_codebooks <= 8, op, ": 1 to 8 codebooks supported, got ",
                    codebooks.size(0));
  TORCH_CHECK_VALUE(entries >= 2 && (entries & (entries - 1)) == 0 && entries <= 65536, op,
                    ": codebook size must be a power of two in [2, 65536], got ", entries);
  c.nbits = 0;
  while ((int64_t{1} << c.nbits) < entries) ++c.nbits;
  c.index_mask = static_cast<uint32_t>(entries - 1);
  const int code_bits = codes.scalar_type() == at::kChar ? 8 : 16;
  TORCH_CHECK_TYPE(c.nbits <= code_bits && (code_bits == 8 || c.nbits > 8), op, ": ", entries,
                   "-entry codebooks are stored as ", c.nbits <= 8 ? "int8" : "int16", " codes, got ",
                   codes.scalar_type());
  TORCH_CHECK_VALUE(codes.size(2) == c.num_codebooks, op, ": codes has ", codes.size(2), " codebook columns, codebooks has ",
                    c.num_codebooks);
  c.out = codes.size(0);
  c.groups = codes.size(1);
  c.in = c.groups * 8;
  TORCH_CHECK_VALUE(c.out > 0 && c.groups > 0, op, ": empty weight: codes shape ", codes.sizes());
  TORCH_CHECK_VALUE(scales.numel() == c.out && scales.dim() == 4 && scales.size(0) == c.out, op,
                    ": scales must be [out_features, 1, 1, 1] = [", c.out, ", 1, 1, 1], got ", scales.sizes());
  TORCH_CHECK_VALUE(codes.device() == codebooks.device() && codes.device() == scales.device(), op,
                    ": codes, codebooks and scales must be on one device, got ", codes.device(), ", ",
                    codebooks.device(), ", ", scales.device());
  return c;
}

// The output dtype of a *_decode op: `dtype`, or `fallback` when it is None; float32/float16/bfloat16.
inline c10::ScalarType decode_dtype(std::optional<c10::ScalarType> dtype, c10::ScalarType fallback, const char* op) {
  const c10::ScalarType t = dtype.value_or(fallback);
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, op,
                   ": dtype must be float32, float16 or bfloat16, got ", t);
  return t;
}

// The activation (and bias) of a *_linear op: a float x [..., in_features] on the weight's device, a
// bias [out_features] beside it. Returns the output shape [..., out_features].
inline std::vector<int64_t> check_linear_inputs(const at::Tensor& x, const std::optional<at::Tensor>& bias,
                                                const at::Tensor& weight, int64_t in_features, int64_t out_features,
                                                const char* op) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
                   op, ": x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == in_features, op, ": x must be [..., ", in_features, "], got shape ",
                    x.sizes());
  TORCH_CHECK(x.device() == weight.device(), op, ": x is on ", x.device(), ", the weight on ", weight.device());
  if (bias) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == out_features, op, ": bias must be [", out_features,
                      "], got ", bias->sizes());
    TORCH_CHECK(bias->device() == x.device(), op, ": bias is on ", bias->device(), ", x on ", x.device());
  }
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = out_features;
  return out_shape;
}

}  // namespace tersor::codebook
