// CPU implementation of the AQLM ops (additive codebooks, out_group 1, in_group 8): decode, and the
// GEMV that is the CPU fallback and the reference of the CUDA kernels.
//
// Numerics (both devices): a group's 8 weights are (sum over codebooks c = 0.. of codebook[c][index_c])
// in fp32, in that order, times the row's scale in fp32; decode rounds that once to the output dtype.
// AQLM's own PyTorch dequantization rounds in the codebooks' dtype after each step; docs/ops.md.
#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

#include "codebook/aqlm_format.h"
#include "codebook/codebook_glue.h"

namespace tersor::codebook {
namespace {

// The codebooks as fp32 [C, entries, 8] and the scales as fp32 [out].
struct AQLMHostTensors {
  Tensor codes, codebooks, scales;
};

AQLMHostTensors host_tensors(const Tensor& codes, const Tensor& codebooks, const Tensor& scales) {
  return {as_contiguous(codes), as_contiguous(as_dtype(codebooks, ScalarType::Float)),
          as_contiguous(torch::stable::reshape(as_dtype(scales, ScalarType::Float), {-1}))};
}

template <typename CodeT>
void decode_rows(const AQLMCall& c, const CodeT* codes, const float* cb, const float* scales, int64_t o_begin,
                 int64_t o_end, float* out) {
  const int64_t entries = int64_t{1} << c.nbits;
  for (int64_t o = o_begin; o < o_end; ++o) {
    for (int64_t j = 0; j < c.groups; ++j) {
      float v[8];
      aqlm_group_values(codes + aqlm_code_offset(o, j, c.groups, c.num_codebooks), c.num_codebooks, c.index_mask, cb,
                        entries, v);
      float* w = out + aqlm_weight_offset(o, j, c.in);
      for (int k = 0; k < 8; ++k) w[k] = v[k] * scales[o];
    }
  }
}

Tensor decode_fp32(const AQLMCall& c, const AQLMHostTensors& t) {
  Tensor out = empty({c.out, c.in}, ScalarType::Float, t.codebooks.device());
  const float* cb = t.codebooks.const_data_ptr<float>();
  const float* sc = t.scales.const_data_ptr<float>();
  float* o = out.mutable_data_ptr<float>();
  tersor::parallel_for(0, c.out, 16, [&](int64_t b, int64_t e) {
    if (t.codes.scalar_type() == ScalarType::Char)
      decode_rows(c, t.codes.const_data_ptr<int8_t>(), cb, sc, b, e, o);
    else
      decode_rows(c, t.codes.const_data_ptr<int16_t>(), cb, sc, b, e, o);
  });
  return out;
}

Tensor aqlm_decode_cpu(const Tensor& codes, const Tensor& codebooks, const Tensor& scales,
                       std::optional<ScalarType> dtype) {
  const AQLMCall c = check_aqlm_call(codes, codebooks, scales, "aqlm_decode");
  const ScalarType out_t = decode_dtype(dtype, codebooks.scalar_type(), "aqlm_decode");
  const Tensor w = decode_fp32(c, host_tensors(codes, codebooks, scales));
  return out_t == ScalarType::Float ? w : as_dtype(w, out_t);
}

// ---- GEMV kernels ----
// Plain C++ and GCC vector extensions, written once and compiled twice: with AVX2 + FMA (chosen at run time)
// and for the baseline target. Tuned on Zen 1 (L1d 32 KiB, L2 512 KiB).
typedef float v8sf __attribute__((vector_size(32)));
typedef float v8sf_u __attribute__((vector_size(32), aligned(4)));  // x rows and codebook rows: any alignment

#define TERSOR_KERNEL __attribute__((always_inline)) inline

// 8 consecutive floats, any alignment (no helper returning a vector: its ABI differs with and without AVX).
#define TERSOR_LOAD8(p) (*reinterpret_cast<const v8sf_u*>(p))

struct GemvArgs {
  const AQLMCall* c;
  const float* cb;      // fp32 [C, entries, 8]
  const float* cbT;     // fp32 [C, 8, entries] (lookup tables only)
  const float* scales;  // fp32 [out]
  const float* x;       // [B, in]
  int64_t B;
  float* y;             // [B, out]
};

// GEMV by lookup tables (codebooks of <= 256 entries, int8 codes): for 8 columns j and codebook c, lut[e] =
// <codebook[c][e], x[8j .. 8j+8]>, after which an output is sum_j sum_c lut[j][c][code] -- C loads and adds
// per 8 weights. The whole table (in/8 x C x 256 fp32: 1 MiB for 2x8) would miss L2 on most lookups, so it is
// built a chunk of groups at a time and each chunk sweeps all outputs with partial sums in y. A chunk of
// 32 KiB (16 groups of 2x8) measured best on Zen 1: smaller ones pay more per-row overhead.
constexpr int64_t kLutChunkFloats = 8192;

// One row of x: lut[jj][c][e], scalar lookups. kE: the codebook size when it is 256 (constant table strides,
// and a byte needs no mask), else 0.
template <int kE>
TERSOR_KERNEL void lut_gemv_row(const GemvArgs& a, const int8_t* codes, int64_t ob, int64_t oe) {
  const AQLMCall& c = *a.c;
  const int64_t E = kE ? kE : int64_t{1} << c.nbits, C = c.num_codebooks, G = c.groups;
  const int64_t chunk = std::max<int64_t>(1, kLutChunkFloats / (C * E));
  const uint32_t mask = kE ? 0xffu : c.index_mask;
  std::vector<float> lut(static_cast<size_t>(chunk * C * E));
  std::fill(a.y + ob, a.y + oe, 0.f);
  for (int64_t j0 = 0; j0 < G; j0 += chunk) {
    const int64_t n_look = std::min(chunk, G - j0) * C;
    for (int64_t t = 0; t < n_look; ++t) {  // table t: group j0 + t / C, codebook t % C
      float* l = lut.data() + t * E;
      const float* xj = a.x + 8 * (j0 + t / C);
      const float* cbT = a.cbT + (t % C) * 8 * E;
      for (int64_t e = 0; e < E; ++e) l[e] = cbT[e] * xj[0];
      for (int k = 1; k < 8; ++k)  // the transposed codebook vectorizes over entries
        for (int64_t e = 0; e < E; ++e) l[e] += cbT[k * E + e] * xj[k];
    }
    // A row's codes for the chunk are consecutive bytes, code t indexing table t: 4 come in one load (bytes
    // 0 and 1 of a register are one movzx each). Two output rows per step and four partial sums each keep
    // many independent lookups in flight. Rows of codes are G * C bytes apart, too far for the hardware
    // prefetcher, hence the explicit prefetch a few rows ahead.
    int64_t o = ob;
    for (; o + 2 <= oe; o += 2) {
      const int8_t* code = codes + (o * G + j0) * C;
      __builtin_prefetch(code + 8 * G * C);
      __builtin_prefetch(code + 9 * G * C);
      const float* l = lut.data();
      float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f, r0 = 0.f, r1 = 0.f, r2 = 0.f, r3 = 0.f;
      int64_t t = 0;
      for (; t + 4 <= n_look; t += 4, l += 4 * E) {
        uint32_t v, w;
        std::memcpy(&v, code + t, 4);
        std::memcpy(&w, code + G * C + t, 4);
        s0 += l[0 * E + (v & mask)];
        r0 += l[0 * E + (w & mask)];
        s1 += l[1 * E + ((v >> 8) & mask)];
        r1 += l[1 * E + ((w >> 8) & mask)];
        v >>= 16;
        w >>= 16;
        s2 += l[2 * E + (v & mask)];
        r2 += l[2 * E + (w & mask)];
        s3 += l[3 * E + ((v >> 8) & mask)];
        r3 += l[3 * E + ((w >> 8) & mask)];
      }
      for (; t < n_look; ++t, l += E) {
        s0 += l[static_cast<uint8_t>(code[t]) & mask];
        r0 += l[static_cast<uint8_t>(code[G * C + t]) & mask];
      }
      a.y[o] += (s0 + s1) + (s2 + s3);
      a.y[o + 1] += (r0 + r1) + (r2 + r3);
    }
    for (; o < oe; ++o) {
      const int8_t* code = codes + (o * G + j0) * C;
      const float* l = lut.data();
      float s0 = 0.f;
      for (int64_t t = 0; t < n_look; ++t, l += E) s0 += l[static_cast<uint8_t>(code[t]) & mask];
      a.y[o] += s0;
    }
  }
  for (int64_t o = ob; o < oe; ++o) a.y[o] *= a.scales[o];
}

// Up to 4 rows of x at once: lut[jj][c][e] holds the rows' values side by side, so one 16-byte load serves all
// of them; same 32 KiB chunks (4 groups of 2x8). 8 lanes measured no faster at batch 8 (its tables are twice
// as big, so a chunk holds half the groups and the per-output sums and code lines cost twice the L2 traffic)
// and twice as slow at batches 2 to 4.
typedef float v4sf __attribute__((vector_size(16)));
template <int kE>
TERSOR_KERNEL void lut_gemv_rows4(const GemvArgs& a, const int8_t* codes, int64_t b0, int64_t ob, int64_t oe) {
  const AQLMCall& c = *a.c;
  const int64_t E = kE ? kE : int64_t{1} << c.nbits, C = c.num_codebooks, G = c.groups;
  const int64_t nb = std::min<int64_t>(4, a.B - b0), chunk = std::max<int64_t>(1, kLutChunkFloats / (4 * C * E));
  const uint32_t mask = kE ? 0xffu : c.index_mask;
  std::vector<v4sf> lut(static_cast<size_t>(chunk * C * E)), acc(static_cast<size_t>(oe - ob), v4sf{});
  for (int64_t j0 = 0; j0 < G; j0 += chunk) {
    const int64_t n_look = std::min(chunk, G - j0) * C;
    for (int64_t jj = 0; jj < n_look / C; ++jj) {
      v4sf xk[8];  // column 8 (j0 + jj) + k of the rows of x
      for (int k = 0; k < 8; ++k) {
        xk[k] = v4sf{};
        for (int64_t r = 0; r < nb; ++r) xk[k][r] = a.x[(b0 + r) * c.in + 8 * (j0 + jj) + k];
      }
      for (int64_t t = 0; t < C * E; ++t) {
        const float* w = a.cb + t * 8;
        v4sf v = w[0] * xk[0];
        for (int k = 1; k < 8; ++k) v += w[k] * xk[k];
        lut[jj * C * E + t] = v;
      }
    }
    for (int64_t o = ob; o < oe; ++o) {
      const int8_t* code = codes + (o * G + j0) * C;
      __builtin_prefetch(code + 8 * G * C);
      const v4sf* l = lut.data();
      v4sf s0 = acc[o - ob], s1 = v4sf{};
      int64_t t = 0;
      for (; t + 4 <= n_look; t += 4, l += 4 * E) {
        uint32_t v;
        std::memcpy(&v, code + t, 4);
        s0 += l[0 * E + (v & mask)];
        s1 += l[1 * E + ((v >> 8) & mask)];
        v >>= 16;
        s0 += l[2 * E + (v & mask)];
        s1 += l[3 * E + ((v >> 8) & mask)];
      }
      for (; t < n_look; ++t, l += E) s0 += l[static_cast<uint8_t>(code[t]) & mask];
      acc[o - ob] = s0 + s1;
    }
  }
  for (int64_t r = 0; r < nb; ++r)
    for (int64_t o = ob; o < oe; ++o) a.y[(b0 + r) * c.out + o] = acc[o - ob][r] * a.scales[o];
}

// GEMV by direct decoding (large codebooks, e.g. 1x16): each group's 8 weights are decoded once for up to 4
// rows of x. Bound by fetching random codebook rows from L3 (2 MiB for 1x16); software prefetch did not help.
template <typename CodeT>
TERSOR_KERNEL void direct_gemv(const GemvArgs& a, const CodeT* codes, int64_t ob, int64_t oe) {
  const AQLMCall& c = *a.c;
  const int64_t E = int64_t{1} << c.nbits, C = c.num_codebooks, G = c.groups;
  for (int64_t o = ob; o < oe; ++o) {
    const CodeT* row = codes + o * G * C;
    for (int64_t b0 = 0; b0 < a.B; b0 += 4) {
      const int64_t nb = std::min<int64_t>(4, a.B - b0);
      v8sf acc[4] = {};
      for (int64_t j = 0; j < G; ++j) {
        v8sf v = TERSOR_LOAD8(a.cb + aqlm_index(row[j * C], c.index_mask) * 8);
        for (int64_t cc = 1; cc < C; ++cc)
          v += TERSOR_LOAD8(a.cb + (cc * E + aqlm_index(row[j * C + cc], c.index_mask)) * 8);
        for (int64_t r = 0; r < nb; ++r) acc[r] += v * TERSOR_LOAD8(a.x + (b0 + r) * c.in + 8 * j);
      }
      for (int64_t r = 0; r < nb; ++r) {
        const v8sf s = acc[r];
        a.y[(b0 + r) * c.out + o] = (((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]))) * a.scales[o];
      }
    }
  }
}

// Outputs [ob, oe) for all rows of x. Codebooks of <= 256 entries come with int8 codes, larger ones int16.
TERSOR_KERNEL void gemv_impl(const GemvArgs& a, const void* codes, int64_t ob, int64_t oe) {
  if (a.c->nbits <= 8) {
    const int8_t* codes8 = static_cast<const int8_t*>(codes);
    const bool e256 = a.c->nbits == 8;
    if (a.B == 1)
      e256 ? lut_gemv_row<256>(a, codes8, ob, oe) : lut_gemv_row<0>(a, codes8, ob, oe);
    else
      for (int64_t b0 = 0; b0 < a.B; b0 += 4)
        e256 ? lut_gemv_rows4<256>(a, codes8, b0, ob, oe) : lut_gemv_rows4<0>(a, codes8, b0, ob, oe);
  } else {
    direct_gemv(a, static_cast<const int16_t*>(codes), ob, oe);
  }
}

#if defined(__x86_64__) || defined(_M_X64)
__attribute__((target("avx2,fma"))) void gemv_avx2(const GemvArgs& a, const void* codes, int64_t ob, int64_t oe) {
  gemv_impl(a, codes, ob, oe);
}
bool cpu_has_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#endif
void gemv_default(const GemvArgs& a, const void* codes, int64_t ob, int64_t oe) { gemv_impl(a, codes, ob, oe); }

void gemv(const GemvArgs& a, const void* codes) {
  // Each thread takes one contiguous range of outputs (and builds its own tables), so that every lookup
  // table is built as few times as possible.
  const int64_t threads = static_cast<int64_t>(torch::stable::get_num_threads());
  const int64_t grain = std::max<int64_t>(64, a.c->out / std::max<int64_t>(1, threads));
  tersor::parallel_for(0, a.c->out, grain, [&](int64_t ob, int64_t oe) {
#if defined(__x86_64__) || defined(_M_X64)
    if (cpu_has_avx2_fma()) return gemv_avx2(a, codes, ob, oe);
#endif
    gemv_default(a, codes, ob, oe);
  });
}

constexpr int64_t kGemvMaxBatch = 16;

Tensor aqlm_linear_cpu(const Tensor& x, const Tensor& codes, const Tensor& codebooks, const Tensor& scales,
                       const std::optional<Tensor>& bias) {
  constexpr const char* op = "aqlm_linear";
  const AQLMCall c = check_aqlm_call(codes, codebooks, scales, op);
  const std::vector<int64_t> out_shape = check_linear_inputs(x, bias, codes, c.in, c.out, op);
  const Tensor xf = as_contiguous(as_dtype(torch::stable::reshape(x, {-1, c.in}), ScalarType::Float));
  const int64_t B = xf.size(0);
  const AQLMHostTensors t = host_tensors(codes, codebooks, scales);
  std::optional<Tensor> bias_f;
  if (bias) bias_f = as_dtype(*bias, ScalarType::Float);
  Tensor y;
  if (B > kGemvMaxBatch) {
    y = linear(xf, decode_fp32(c, t), bias_f);
  } else {
    y = empty({B, c.out}, ScalarType::Float, xf.device());
    Tensor cbT;  // lookup tables are built over entries: the codebooks transposed to [C, 8, entries]
    if (c.nbits <= 8) {
      cbT = as_contiguous(torch::stable::transpose(torch::stable::reshape(t.codebooks, {c.num_codebooks, -1, 8}), 1, 2));
    }
    const GemvArgs a{&c,
                     t.codebooks.const_data_ptr<float>(),
                     c.nbits <= 8 ? cbT.const_data_ptr<float>() : nullptr,
                     t.scales.const_data_ptr<float>(),
                     xf.const_data_ptr<float>(),
                     B,
                     y.mutable_data_ptr<float>()};
    gemv(a, t.codes.const_data_ptr());
    if (bias_f) {  // y += bias (fp32), as aten::add_ of the fp32 bias does
      const Tensor bc = as_contiguous(*bias_f);
      const float* bp = bc.const_data_ptr<float>();
      float* yp = y.mutable_data_ptr<float>();
      for (int64_t r = 0; r < B; ++r)
        for (int64_t o = 0; o < c.out; ++o) yp[r * c.out + o] += bp[o];
    }
  }
  return torch::stable::reshape(as_dtype(y, x.scalar_type()), out_shape);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(tersor, CPU, m) {
  m.impl("aqlm_decode", TORCH_BOX(&aqlm_decode_cpu));
  m.impl("aqlm_linear", TORCH_BOX(&aqlm_linear_cpu));
}

}  // namespace tersor::codebook
