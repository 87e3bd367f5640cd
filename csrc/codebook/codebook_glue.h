// Argument checking shared by the codebook family's CPU and CUDA torch glue (host C++ only).
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "common/torch_glue.h"

namespace tersor::codebook {


inline bool same_device(const Tensor& a, const Tensor& b) { return a.device() == b.device(); }

inline bool is_float_dtype(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::Half || t == ScalarType::BFloat16;
}

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
inline E8PCall check_e8p_call(const Tensor& qidxs, int64_t n, const std::optional<double>& resid_scale,
                              const char* op) {
  TERSOR_CHECK_TYPE(qidxs.scalar_type() == ScalarType::Long, op, ": Qidxs must be int64 (QuIP#'s packed codes), got ",
                    dtype_name(qidxs.scalar_type()));
  TERSOR_CHECK_VALUE(qidxs.dim() == 2, op, ": Qidxs must be 2-d [out_features, words], got shape ", sizes_str(qidxs));
  TERSOR_CHECK_VALUE(n > 0 && n % 64 == 0, op, ": in_features must be a positive multiple of 64 (QuIP#'s E8P layout), got ",
                     n);
  TERSOR_CHECK_VALUE(n < (int64_t{1} << 31), op, ": in_features too large: ", n);
  E8PCall c;
  c.m = qidxs.size(0);
  c.n = n;
  c.row_words = qidxs.size(1);
  TERSOR_CHECK_VALUE(c.m > 0 && c.m % 16 == 0, op, ": out_features (rows of Qidxs) must be a positive multiple of 16, got ",
                     c.m);
  if (c.row_words == n / 32) {
    c.bits = 2;
  } else if (c.row_words == 3 * n / 64) {
    c.bits = 3;
  } else if (c.row_words == n / 16) {
    c.bits = 4;
  } else {
    TERSOR_CHECK_VALUE(false, op, ": Qidxs has ", c.row_words, " words per row; for in_features = ", n,
                       " that must be ", n / 32, " (2 bits), ", 3 * n / 64, " (3 bits) or ", n / 16, " (4 bits)");
  }
  const double rs = resid_scale.value_or(c.bits == 3 ? kResidScale3 : kResidScale4);
  // The kernels divide by it as a float32: a double outside float32's normal range would become 0 or inf
  // there (and the conversion of an out-of-range double to float is undefined behaviour).
  TERSOR_CHECK_VALUE(rs >= static_cast<double>(FLT_MIN) && rs <= static_cast<double>(FLT_MAX), op,
                     ": resid_scale must be positive, finite and a normal float32, got ", rs);
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
inline AQLMCall check_aqlm_call(const Tensor& codes, const Tensor& codebooks, const Tensor& scales,
                                const char* op) {
  TERSOR_CHECK_TYPE(codes.scalar_type() == ScalarType::Char || codes.scalar_type() == ScalarType::Short, op,
                    ": codes must be int8 (codebooks of <= 256 entries) or int16 (<= 65536), got ",
                    dtype_name(codes.scalar_type()));
  TERSOR_CHECK_TYPE(is_float_dtype(codebooks.scalar_type()), op, ": codebooks must be float32, float16 or bfloat16, got ",
                    dtype_name(codebooks.scalar_type()));
  TERSOR_CHECK_TYPE(is_float_dtype(scales.scalar_type()), op, ": scales must be float32, float16 or bfloat16, got ",
                    dtype_name(scales.scalar_type()));
  TERSOR_CHECK_VALUE(codes.dim() == 3, op, ": codes must be [out/out_group, in/in_group, num_codebooks], got shape ",
                     sizes_str(codes));
  TERSOR_CHECK_VALUE(codebooks.dim() == 4, op,
                     ": codebooks must be [num_codebooks, 2^nbits, out_group, in_group], got shape ",
                     sizes_str(codebooks));
  TERSOR_CHECK_VALUE(codebooks.size(2) == 1 && codebooks.size(3) == 8, op,
                     ": the kernels support out_group_size 1 and in_group_size 8 (AQLM 1x16, 2x8); got codebooks ",
                     sizes_str(codebooks), " (tersor.quant.aqlm_dequantize_reference handles any group size)");
  AQLMCall c;
  c.num_codebooks = static_cast<int>(codebooks.size(0));
  const int64_t entries = codebooks.size(1);
  TERSOR_CHECK_VALUE(c.num_codebooks >= 1 && c.num_codebooks <= 8, op, ": 1 to 8 codebooks supported, got ",
                     codebooks.size(0));
  TERSOR_CHECK_VALUE(entries >= 2 && (entries & (entries - 1)) == 0 && entries <= 65536, op,
                     ": codebook size must be a power of two in [2, 65536], got ", entries);
  c.nbits = 0;
  while ((int64_t{1} << c.nbits) < entries) ++c.nbits;
  c.index_mask = static_cast<uint32_t>(entries - 1);
  const int code_bits = codes.scalar_type() == ScalarType::Char ? 8 : 16;
  TERSOR_CHECK_TYPE(c.nbits <= code_bits && (code_bits == 8 || c.nbits > 8), op, ": ", entries,
                    "-entry codebooks are stored as ", c.nbits <= 8 ? "int8" : "int16", " codes, got ",
                    dtype_name(codes.scalar_type()));
  TERSOR_CHECK_VALUE(codes.size(2) == c.num_codebooks, op, ": codes has ", codes.size(2), " codebook columns, codebooks has ",
                     c.num_codebooks);
  c.out = codes.size(0);
  c.groups = codes.size(1);
  c.in = c.groups * 8;
  TERSOR_CHECK_VALUE(c.out > 0 && c.groups > 0, op, ": empty weight: codes shape ", sizes_str(codes));
  TERSOR_CHECK_VALUE(scales.numel() == c.out && scales.dim() == 4 && scales.size(0) == c.out, op,
                     ": scales must be [out_features, 1, 1, 1] = [", c.out, ", 1, 1, 1], got ", sizes_str(scales));
  TERSOR_CHECK_VALUE(same_device(codes, codebooks) && same_device(codes, scales), op,
                     ": codes, codebooks and scales must be on one device, got ", device_str(codes), ", ",
                     device_str(codebooks), ", ", device_str(scales));
  return c;
}

// The output dtype of a *_decode op: `dtype`, or `fallback` when it is None; float32/float16/bfloat16.
inline ScalarType decode_dtype(std::optional<ScalarType> dtype, ScalarType fallback, const char* op) {
  const ScalarType t = dtype.value_or(fallback);
  TERSOR_CHECK_TYPE(is_float_dtype(t), op, ": dtype must be float32, float16 or bfloat16, got ", dtype_name(t));
  return t;
}

// The activation (and bias) of a *_linear op: a float x [..., in_features] on the weight's device, a
// bias [out_features] beside it. Returns the output shape [..., out_features].
inline std::vector<int64_t> check_linear_inputs(const Tensor& x, const std::optional<Tensor>& bias,
                                                const Tensor& weight, int64_t in_features, int64_t out_features,
                                                const char* op) {
  TERSOR_CHECK_TYPE(is_float_dtype(x.scalar_type()), op, ": x must be float32, float16 or bfloat16, got ",
                    dtype_name(x.scalar_type()));
  TERSOR_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == in_features, op, ": x must be [..., ", in_features, "], got shape ",
                     sizes_str(x));
  TERSOR_CHECK_VALUE(same_device(x, weight), op, ": x is on ", device_str(x), ", the weight on ", device_str(weight));
  if (bias) {
    TERSOR_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == out_features, op, ": bias must be [", out_features,
                       "], got ", sizes_str(*bias));
    TERSOR_CHECK_VALUE(same_device(*bias, x), op, ": bias is on ", device_str(*bias), ", x on ", device_str(x));
  }
  std::vector<int64_t> out_shape = sizes_vec(x);
  out_shape.back() = out_features;
  return out_shape;
}

}  // namespace tersor::codebook
