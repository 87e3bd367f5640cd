// CPU implementation of the AQLM ops (additive codebooks, out_group 1, in_group 8): decode, and the
// GEMV that is the CPU fallback and the reference of the CUDA kernels.
//
// Numerics (both devices): a group's 8 weights are (sum over codebooks c = 0.. of codebook[c][index_c])
// in fp32, in that order, times the row's scale in fp32; decode rounds that once to the output dtype.
// AQLM's own PyTorch dequantization rounds in the codebooks' dtype after each step; docs/ops.md.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <torch/library.h>

#include <cstring>
#include <optional>
#include <vector>

#include "codebook/aqlm_format.h"
#include "codebook/codebook_glue.h"

namespace tersor::codebook {
namespace {

// The codebooks as fp32 [C, entries, 8] and the scales as fp32 [out].
struct AQLMHostTensors {
  at::Tensor codes, codebooks, scales;
};

AQLMHostTensors host_tensors(const at::Tensor& codes, const at::Tensor& codebooks, const at::Tensor& scales) {
  return {codes.contiguous(), codebooks.to(at::kFloat).contiguous(), scales.to(at::kFloat).reshape({-1}).contiguous()};
}

template <typename CodeT>
void decode_rows(const AQLMCall& c, const CodeT* codes, const float* cb, const float* scales, int64_t o_begin,
                 int64_t o_end, float* out) {
  const int64_t entries = int64_t{1} << c.nbits;
  for (int64_t o = o_begin; o < o_end; ++o) {
    for (int64_t j = 0; j < c.groups; ++j) {
      float v[8];
      aqlm_group_values(codes + (o * c.groups + j) * c.num_codebooks, c.num_codebooks, c.index_mask, cb, entries, v);
      for (int k = 0; k < 8; ++k) out[o * c.in + 8 * j + k] = v[k] * scales[o];
    }
  }
}

at::Tensor decode_fp32(const AQLMCall& c, const AQLMHostTensors& t) {
  at::Tensor out = at::empty({c.out, c.in}, t.codebooks.options());
  const float* cb = t.codebooks.const_data_ptr<float>();
  const float* sc = t.scales.const_data_ptr<float>();
  float* o = out.mutable_data_ptr<float>();
  at::parallel_for(0, c.out, 16, [&](int64_t b, int64_t e) {
    if (t.codes.scalar_type() == at::kChar)
      decode_rows(c, t.codes.const_data_ptr<int8_t>(), cb, sc, b, e, o);
    else
      decode_rows(c, t.codes.const_data_ptr<int16_t>(), cb, sc, b, e, o);
  });
  return out;
}

at::Tensor aqlm_decode_cpu(const at::Tensor& codes, const at::Tensor& codebooks, const at::Tensor& scales,
                           std::optional<c10::ScalarType> dtype) {
  const AQLMCall c = check_aqlm_call(codes, codebooks, scales, "aqlm_decode");
  const c10::ScalarType out_t = dtype.value_or(codebooks.scalar_type());
  TORCH_CHECK_TYPE(out_t == at::kFloat || out_t == at::kHalf || out_t == at::kBFloat16,
                   "aqlm_decode: dtype must be float32, float16 or bfloat16, got ", out_t);
  const at::Tensor w = decode_fp32(c, host_tensors(codes, codebooks, scales));
  return out_t == at::kFloat ? w : w.to(out_t);
}

// GEMV by lookup tables (codebooks of <= 256 entries): for one row of x, lut[j][c][e] = <codebook[c][e],
// x[8j .. 8j+8]>, after which an output is sum_j sum_c lut[j][c][index] -- C loads and adds per 8
// weights instead of 8 multiply-adds, and the table (in/8 x C x 256 floats) stays in L2.
template <typename CodeT>
void lut_gemv_row(const AQLMCall& c, const CodeT* codes, const float* cb, const float* scales, const float* x,
                  std::vector<float>& lut, float* y) {
  const int64_t E = int64_t{1} << c.nbits, C = c.num_codebooks;
  lut.resize(static_cast<size_t>(c.groups * C * E));
  at::parallel_for(0, c.groups, 64, [&](int64_t jb, int64_t je) {
    for (int64_t j = jb; j < je; ++j) {
      const float* xj = x + 8 * j;
      for (int64_t cc = 0; cc < C; ++cc) {
        float* l = lut.data() + (j * C + cc) * E;
        const float* book = cb + cc * E * 8;
        for (int64_t e = 0; e < E; ++e) {
          float s = 0.f;
          for (int k = 0; k < 8; ++k) s += book[e * 8 + k] * xj[k];
          l[e] = s;
        }
      }
    }
  });
  at::parallel_for(0, c.out, 64, [&](int64_t ob, int64_t oe) {
    for (int64_t o = ob; o < oe; ++o) {
      const CodeT* code = codes + o * c.groups * C;
      float acc = 0.f;
      for (int64_t j = 0; j < c.groups; ++j)
        for (int64_t cc = 0; cc < C; ++cc)
          acc += lut[(j * C + cc) * E + (static_cast<uint32_t>(code[j * C + cc]) & c.index_mask)];
      y[o] = acc * scales[o];
    }
  });
}

// GEMV by direct decoding (large codebooks, e.g. 1x16): each group decoded once for all rows of x.
template <typename CodeT>
void direct_gemv(const AQLMCall& c, const CodeT* codes, const float* cb, const float* scales, const float* x,
                 int64_t B, float* y) {
  const int64_t E = int64_t{1} << c.nbits;
  at::parallel_for(0, c.out, 16, [&](int64_t ob, int64_t oe) {
    std::vector<float> acc(static_cast<size_t>(B));
    for (int64_t o = ob; o < oe; ++o) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < c.groups; ++j) {
        float v[8];
        aqlm_group_values(codes + (o * c.groups + j) * c.num_codebooks, c.num_codebooks, c.index_mask, cb, E, v);
        for (int64_t b = 0; b < B; ++b) {
          const float* xj = x + b * c.in + 8 * j;
          float s = 0.f;
          for (int k = 0; k < 8; ++k) s += v[k] * xj[k];
          acc[b] += s;
        }
      }
      for (int64_t b = 0; b < B; ++b) y[b * c.out + o] = acc[b] * scales[o];
    }
  });
}

constexpr int64_t kGemvMaxBatch = 16;

at::Tensor aqlm_linear_cpu(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& codebooks,
                           const at::Tensor& scales, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "aqlm_linear";
  const AQLMCall c = check_aqlm_call(codes, codebooks, scales, op);
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
                   op, ": x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == c.in, op, ": x must be [..., ", c.in, "], got shape ", x.sizes());
  TORCH_CHECK(x.device() == codes.device(), op, ": x is on ", x.device(), ", codes on ", codes.device());
  if (bias) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == c.out, op, ": bias must be [", c.out, "], got ",
                      bias->sizes());
    TORCH_CHECK(bias->device() == x.device(), op, ": bias is on ", bias->device(), ", x on ", x.device());
  }
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = c.out;
  const at::Tensor xf = x.reshape({-1, c.in}).to(at::kFloat).contiguous();
  const int64_t B = xf.size(0);
  const AQLMHostTensors t = host_tensors(codes, codebooks, scales);
  std::optional<at::Tensor> bias_f;
  if (bias) bias_f = bias->to(at::kFloat);
  at::Tensor y;
  if (B > kGemvMaxBatch) {
    y = at::linear(xf, decode_fp32(c, t), bias_f);
  } else {
    y = at::empty({B, c.out}, xf.options());
    const float* cb = t.codebooks.const_data_ptr<float>();
    const float* sc = t.scales.const_data_ptr<float>();
    const float* xp = xf.const_data_ptr<float>();
    float* yp = y.mutable_data_ptr<float>();
    const bool lut = c.nbits <= 8;
    auto run = [&](auto* codes_p) {
      if (lut) {
        std::vector<float> table;
        for (int64_t b = 0; b < B; ++b) lut_gemv_row(c, codes_p, cb, sc, xp + b * c.in, table, yp + b * c.out);
      } else {
        direct_gemv(c, codes_p, cb, sc, xp, B, yp);
      }
    };
    if (t.codes.scalar_type() == at::kChar)
      run(t.codes.const_data_ptr<int8_t>());
    else
      run(t.codes.const_data_ptr<int16_t>());
    if (bias_f) y.add_(*bias_f);
  }
  return y.to(x.scalar_type()).reshape(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(tersor, CPU, m) {
  m.impl("aqlm_decode", &aqlm_decode_cpu);
  m.impl("aqlm_linear", &aqlm_linear_cpu);
}

}  // namespace tersor::codebook
