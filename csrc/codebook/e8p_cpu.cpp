// CPU implementation of the E8P12 (QuIP#) ops: the packed table, decode, and the lookup GEMV that is
// both the CPU fallback and the reference the CUDA kernels are judged against.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/div.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <optional>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define TERSOR_X86 1
#endif

#include "codebook/codebook_glue.h"
#include "codebook/e81b_table.h"
#include "codebook/e8p_format.h"

namespace tersor::codebook {
namespace {

// ---------------------------------------------------------------- decode
void e8p_decode_rows(const E8PCall& c, const int64_t* q, int64_t I, float* out) {
  const int64_t n = c.n, S = n / 32;
  const uint8_t* qbytes = reinterpret_cast<const uint8_t*>(q);
  E8PWordCursor cur{16 * I, 0, S};
  for (int64_t t = 0; t < n / 2; ++t, cur.advance(1)) {
    const int64_t J = t / 32;
    const int lane = static_cast<int>(t % 32);
    const uint64_t w1 = static_cast<uint64_t>(q[cur.offset(c.row_words, 0)]);
    const uint64_t w2 = c.bits == 4 ? static_cast<uint64_t>(q[cur.offset(c.row_words, 1)]) : 0;
    for (int slot = 0; slot < 4; ++slot) {
      const E8PSlotPos pos = e8p_slot_pos(I, J, lane, slot);
      float v[8];
      e8p_decode_code(e8p_slot_code(w1, slot), kE8PTables.signed_abs, v);
      if (c.bits == 4) {
        float v2[8];
        e8p_decode_code(e8p_slot_code(w2, slot), kE8PTables.signed_abs, v2);
        for (int k = 0; k < 8; ++k) v[k] = v[k] + v2[k] / c.resid_scale;
      } else if (c.bits == 3) {
        const uint8_t code = qbytes[e81b_byte_index(pos.row, pos.col / 8, n)];
        for (int k = 0; k < 8; ++k) v[k] = v[k] + kE81BTable.value[code][k] / c.resid_scale;
      }
      std::memcpy(out + pos.row * n + pos.col, v, sizeof v);
    }
  }
}

at::Tensor e8p_packed_abs_table() {
  at::Tensor t = at::empty({256}, at::TensorOptions().dtype(at::kInt));
  std::memcpy(t.mutable_data_ptr<int32_t>(), kE8PTables.packed_abs, sizeof kE8PTables.packed_abs);
  return t;
}

at::Tensor e8p_decode_cpu(const at::Tensor& qidxs, int64_t in_features, std::optional<double> resid_scale,
                          std::optional<c10::ScalarType> dtype) {
  constexpr const char* op = "e8p_decode";
  const E8PCall c = check_e8p_call(qidxs, in_features, resid_scale, op);
  const c10::ScalarType out_t = dtype.value_or(at::kFloat);
  TORCH_CHECK_TYPE(out_t == at::kFloat || out_t == at::kHalf || out_t == at::kBFloat16, op,
                   ": dtype must be float32, float16 or bfloat16, got ", out_t);
  const at::Tensor q = qidxs.contiguous();
  at::Tensor out = at::empty({c.m, c.n}, q.options().dtype(at::kFloat));
  const int64_t* qp = q.const_data_ptr<int64_t>();
  float* op_ = out.mutable_data_ptr<float>();
  at::parallel_for(0, c.m / 16, 1, [&](int64_t b, int64_t e) {
    for (int64_t I = b; I < e; ++I) e8p_decode_rows(c, qp, I, op_);
  });
  return out_t == at::kFloat ? out : out.to(out_t);
}

// ---------------------------------------------------------------- lookup GEMV
// z[b, r] = sum_k x[b, k] W^[r, k] for <= kLutBatch rows of x, decoding each code once and using it for
// every row of x. Work unit: a row pair (R0, R1) = (16I + 2g, +1) of row block I, whose words are
// (J, lane 4g + q) for all J, q: the 2 rows' accumulators stay in registers for the whole K loop.
constexpr int64_t kLutBatch = 16;

struct GemvArgs {
  const E8PCall* c;
  const int64_t* q;
  const float* x;   // [B, n] fp32
  const float* x2;  // x / resid_scale (RVQ stage 2), or nullptr
  int64_t B;
  float* z;         // [B, m]
};

template <int NB>
void gemv_rowpair_scalar(const GemvArgs& a, int64_t I, int g, int64_t b0) {
  const E8PCall& c = *a.c;
  const int64_t n = c.n;
  const uint8_t* qbytes = reinterpret_cast<const uint8_t*>(a.q);
  float acc[2][NB] = {};
  E8PWordCursor cur{16 * I, 0, n / 32};
  cur.advance(4 * g);
  for (int64_t J = 0; J < n / 64; ++J, cur.advance(32)) {
    for (int qq = 0; qq < 4; ++qq) {
      E8PWordCursor cq = cur;
      cq.advance(qq);
      const int lane = 4 * g + qq;
      const uint64_t w1 = static_cast<uint64_t>(a.q[cq.offset(c.row_words, 0)]);
      const uint64_t w2 = c.bits == 4 ? static_cast<uint64_t>(a.q[cq.offset(c.row_words, 1)]) : 0;
      for (int slot = 0; slot < 4; ++slot) {
        const E8PSlotPos pos = e8p_slot_pos(I, J, lane, slot);
        float v[8], v2[8] = {};
        e8p_decode_code(e8p_slot_code(w1, slot), kE8PTables.signed_abs, v);
        if (c.bits == 4) e8p_decode_code(e8p_slot_code(w2, slot), kE8PTables.signed_abs, v2);
        if (c.bits == 3) std::memcpy(v2, kE81BTable.value[qbytes[e81b_byte_index(pos.row, pos.col / 8, n)]], sizeof v2);
        for (int b = 0; b < NB; ++b) {
          const float* xr = a.x + (b0 + b) * n + pos.col;
          float s = 0.f;
          for (int k = 0; k < 8; ++k) s += v[k] * xr[k];
          if (c.bits > 2) {
            const float* x2r = a.x2 + (b0 + b) * n + pos.col;
            for (int k = 0; k < 8; ++k) s += v2[k] * x2r[k];
          }
          acc[slot & 1][b] += s;
        }
      }
    }
  }
  for (int r = 0; r < 2; ++r)
    for (int b = 0; b < NB; ++b) a.z[(b0 + b) * c.m + 16 * I + 2 * g + r] = acc[r][b];
}

#if TERSOR_X86
// AVX2: a code's 8 values are signed_abs[a] with sign bits XORed in and +-1/4 added. The sign bits of
// slot i sit at bits 4j + i of the word's high half (j = sign bit index, coordinate kPerm[j]): one
// variable shift per lane of the broadcast high half moves each coordinate's bit to the float sign.
__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

struct SlotDecoder {
  __m256i shift[4];
  __m256i sign_bit;
  __m256 quarter[2];
  __attribute__((target("avx2,fma"))) SlotDecoder() {
    constexpr int kBitOfCoord[8] = {0, 4, 1, 5, 2, 6, 3, 7};  // inverse of kPerm
    for (int i = 0; i < 4; ++i) {
      alignas(32) int32_t s[8];
      for (int cc = 0; cc < 8; ++cc) s[cc] = 31 - (4 * kBitOfCoord[cc] + i);
      shift[i] = _mm256_load_si256(reinterpret_cast<const __m256i*>(s));
    }
    sign_bit = _mm256_set1_epi32(static_cast<int>(0x80000000u));
    quarter[0] = _mm256_set1_ps(0.25f);
    quarter[1] = _mm256_set1_ps(-0.25f);
  }
  // The 4 slots of one word.
  __attribute__((target("avx2,fma"))) inline void decode(uint64_t word, __m256 v[4]) const {
    const uint32_t lo = static_cast<uint32_t>(word);
    uint32_t hi = static_cast<uint32_t>(word >> 32);
    uint32_t par = hi ^ (hi >> 16);
    par ^= par >> 8;
    par ^= par >> 4;
    par &= 0xfu;
    hi ^= par;
    const __m256i hib = _mm256_set1_epi32(static_cast<int>(hi));
    for (int i = 0; i < 4; ++i) {
      const __m256 absv = _mm256_loadu_ps(kE8PTables.signed_abs[(lo >> (8 * i)) & 0xffu]);
      const __m256i sb = _mm256_and_si256(_mm256_sllv_epi32(hib, shift[i]), sign_bit);
      v[i] = _mm256_add_ps(_mm256_xor_ps(absv, _mm256_castsi256_ps(sb)), quarter[(par >> i) & 1u]);
    }
  }
};

template <int NB>
__attribute__((target("avx2,fma"))) void gemv_rowpair_avx2(const GemvArgs& a, const SlotDecoder& dec, int64_t I,
                                                           int g, int64_t b0) {
  const E8PCall& c = *a.c;
  const int64_t n = c.n;
  const uint8_t* qbytes = reinterpret_cast<const uint8_t*>(a.q);
  __m256 acc[2][NB];
  for (int r = 0; r < 2; ++r)
    for (int b = 0; b < NB; ++b) acc[r][b] = _mm256_setzero_ps();
  E8PWordCursor cur{16 * I, 0, n / 32};
  cur.advance(4 * g);
  const int64_t R0 = 16 * I + 2 * g;
  for (int64_t J = 0; J < n / 64; ++J, cur.advance(32)) {
    for (int qq = 0; qq < 4; ++qq) {
      E8PWordCursor cq = cur;
      cq.advance(qq);
      __m256 v[4];
      dec.decode(static_cast<uint64_t>(a.q[cq.offset(c.row_words, 0)]), v);
      const int64_t col0 = 64 * J + 16 * qq;
      for (int slot = 0; slot < 4; ++slot) {
        const int64_t col = col0 + 8 * (slot >> 1);
        for (int b = 0; b < NB; ++b)
          acc[slot & 1][b] = _mm256_fmadd_ps(v[slot], _mm256_loadu_ps(a.x + (b0 + b) * n + col), acc[slot & 1][b]);
      }
      if (c.bits == 2) continue;
      if (c.bits == 4) {
        dec.decode(static_cast<uint64_t>(a.q[cq.offset(c.row_words, 1)]), v);
      } else {
        for (int slot = 0; slot < 4; ++slot) {
          const int64_t col = col0 + 8 * (slot >> 1);
          v[slot] = _mm256_loadu_ps(kE81BTable.value[qbytes[e81b_byte_index(R0 + (slot & 1), col / 8, n)]]);
        }
      }
      for (int slot = 0; slot < 4; ++slot) {
        const int64_t col = col0 + 8 * (slot >> 1);
        for (int b = 0; b < NB; ++b)
          acc[slot & 1][b] = _mm256_fmadd_ps(v[slot], _mm256_loadu_ps(a.x2 + (b0 + b) * n + col), acc[slot & 1][b]);
      }
    }
  }
  for (int r = 0; r < 2; ++r)
    for (int b = 0; b < NB; ++b) a.z[(b0 + b) * c.m + R0 + r] = hsum256(acc[r][b]);
}

bool cpu_has_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#endif

template <int NB>
void gemv_rowpair(const GemvArgs& a, const void* dec, int64_t I, int g, int64_t b0) {
#if TERSOR_X86
  if (dec) return gemv_rowpair_avx2<NB>(a, *static_cast<const SlotDecoder*>(dec), I, g, b0);
#endif
  gemv_rowpair_scalar<NB>(a, I, g, b0);
}

at::Tensor e8p_linear_cpu(const at::Tensor& x, const at::Tensor& qidxs, int64_t in_features,
                          std::optional<double> resid_scale) {
  constexpr const char* op = "e8p_linear";
  const E8PCall c = check_e8p_call(qidxs, in_features, resid_scale, op);
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
                   op, ": x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == c.n, op, ": x must be [..., ", c.n, "], got shape ", x.sizes());
  TORCH_CHECK(x.device() == qidxs.device(), op, ": x is on ", x.device(), ", Qidxs on ", qidxs.device());
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = c.m;
  const at::Tensor xf = x.reshape({-1, c.n}).to(at::kFloat).contiguous();
  const int64_t B = xf.size(0);
  if (B == 0) return at::empty(out_shape, x.options().dtype(at::kFloat));
  if (B > kLutBatch) {
    // Decoding once and a BLAS matmul win when the weight is reused by many rows.
    return at::matmul(xf, e8p_decode_cpu(qidxs, in_features, resid_scale, at::kFloat).t()).reshape(out_shape);
  }
  const at::Tensor q = qidxs.contiguous();
  at::Tensor x2;
  if (c.bits > 2) x2 = at::div(xf, static_cast<double>(c.resid_scale)).contiguous();
  at::Tensor z = at::empty({B, c.m}, xf.options());
  GemvArgs a{&c, q.const_data_ptr<int64_t>(), xf.const_data_ptr<float>(),
             c.bits > 2 ? x2.const_data_ptr<float>() : nullptr, B, z.mutable_data_ptr<float>()};
  const void* dec = nullptr;
#if TERSOR_X86
  static const SlotDecoder* decoder = cpu_has_avx2_fma() ? new SlotDecoder() : nullptr;
  dec = decoder;
#endif
  // Rows of x are taken 4 at a time: 2 weight rows x 4 batch rows = 8 vector accumulators.
  at::parallel_for(0, c.m / 2, 4, [&](int64_t pb, int64_t pe) {
    for (int64_t p = pb; p < pe; ++p) {
      const int64_t I = p / 8;
      const int g = static_cast<int>(p % 8);
      int64_t b0 = 0;
      for (; b0 + 4 <= B; b0 += 4) gemv_rowpair<4>(a, dec, I, g, b0);
      switch (B - b0) {
        case 3: gemv_rowpair<3>(a, dec, I, g, b0); break;
        case 2: gemv_rowpair<2>(a, dec, I, g, b0); break;
        case 1: gemv_rowpair<1>(a, dec, I, g, b0); break;
        default: break;
      }
    }
  });
  return z.reshape(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(tersor, CPU, m) {
  m.impl("e8p_decode", &e8p_decode_cpu);
  m.impl("e8p_linear", &e8p_linear_cpu);
}

TORCH_LIBRARY_IMPL(tersor, CompositeExplicitAutograd, m) { m.impl("_e8p_packed_abs_table", &e8p_packed_abs_table); }

}  // namespace tersor::codebook
