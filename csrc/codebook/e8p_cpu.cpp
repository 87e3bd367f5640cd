// CPU implementation of the E8P12 (QuIP#) ops: the packed table, decode, and the lookup GEMV that is
// both the CPU fallback and the reference the CUDA kernels are judged against.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <vector>

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
      std::memcpy(out + e8p_elem_offset(pos.row, pos.col, n), v, sizeof v);
    }
  }
}

Tensor e8p_decode_cpu(const Tensor& qidxs, int64_t in_features, std::optional<double> resid_scale,
                      std::optional<ScalarType> dtype) {
  constexpr const char* op = "e8p_decode";
  const E8PCall c = check_e8p_call(qidxs, in_features, resid_scale, op);
  const ScalarType out_t = decode_dtype(dtype, ScalarType::Float, op);
  const Tensor q = as_contiguous(qidxs);
  Tensor out = empty({c.m, c.n}, ScalarType::Float, q.device());
  const int64_t* qp = q.const_data_ptr<int64_t>();
  float* op_ = out.mutable_data_ptr<float>();
  tersor::parallel_for(0, c.m / 16, 1, [&](int64_t b, int64_t e) {
    for (int64_t I = b; I < e; ++I) e8p_decode_rows(c, qp, I, op_);
  });
  return out_t == ScalarType::Float ? out : as_dtype(out, out_t);
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
// ---- AVX2 lookup GEMV ----
// Shaped by Zen 1, where a 256-bit op is two 128-bit halves, vpsllvd is slow, pext is microcoded, and an
// FMA takes two of the four FP pipes: the loop is bound by FP-pipe slots and by the latency of the per-word
// sign preparation, so everything is 128-bit and a slot costs 4 cheap decode ops besides its 2 FMAs.
//  * Signs: slot i's sign bits are bit i of the 8 nibbles of the word's high half. One pshufb per word
//    spreads the (parity-fixed) nibbles into the high bytes of 8 bf16 lanes; per slot, a pshufb with a
//    16-entry table (nibble -> 0x80 if bit i) then yields its 8 sign bits in place.
//  * Values: signed_abs in bf16 (exact), 16 bytes per abs index; XOR the signs in, widen to fp32 by a
//    shift (even coordinates) and a mask (odd ones). x is permuted per call to match (kPerm per block).
//  * +-1/4: sum_c (v_c + t) x_c = <v, x> + t sum(x_block). At batch 1 one 128-bit xor + add per word
//    covers the 4 slots, from per-call block sums of x; with more rows of x, t is added to the values.
//  * The sign preparation of 4 words (parity, nibbles, routing) runs one column block ahead, staged in a
//    small buffer: its load -> parity -> shuffle chain would otherwise stall every block.
#define TERSOR_AVX2 __attribute__((target("avx2,fma")))
// For the helpers of the hot loop: a call would spill every accumulator (all xmm registers are caller-saved).
#define TERSOR_AVX2_INLINE __attribute__((target("avx2,fma"), always_inline)) inline

constexpr uint16_t bf16_bits(float v) { return static_cast<uint16_t>(__builtin_bit_cast(uint32_t, v) >> 16); }

// The two per-code tables are separate objects, each at offset 0, so that a scaled index addresses a row
// without an extra add (GCC folds a member offset into the index instead).
struct alignas(64) AbsBf16Table {
  uint16_t row[256][8];  // signed_abs[a] in bf16 (exact: +-1/2, 3/2, 5/2), coordinate order
};
struct alignas(64) E81BTableEo {
  float row[256][8];  // E81B values, coordinates in kPerm order (even ones, then odd ones)
};
struct alignas(64) Avx2Tables {
  float quarter[16][4][4];       // [parity bits][slot]: the slot's +-1/4 in all lanes
  uint32_t quarter_sign[16][4];  // [parity bits]: lane i = sign bit where slot i is odd (its shift is -1/4)
  uint8_t sign_of_bit[4][16];    // [i][nibble] = 0x80 if bit i of the nibble is set
  uint8_t route[2][16];          // pshufb: nibble j of word w & 1 -> high byte of coordinate kPerm[j]'s lane
  uint8_t low4[16];
  uint32_t par_mask[4];
};

constexpr AbsBf16Table make_abs_bf16() {
  AbsBf16Table t{};
  for (int a = 0; a < 256; ++a)
    for (int c = 0; c < 8; ++c) t.row[a][c] = bf16_bits(kE8PTables.signed_abs[a][c]);
  return t;
}
constexpr E81BTableEo make_e81b_eo() {
  E81BTableEo t{};
  for (int a = 0; a < 256; ++a)
    for (int c = 0; c < 8; ++c) t.row[a][c] = kE81BTable.value[a][kPerm[c]];
  return t;
}
constexpr Avx2Tables make_avx2_tables() {
  Avx2Tables t{};
  for (int p = 0; p < 16; ++p)
    for (int i = 0; i < 4; ++i) {
      const bool odd = (p >> i) & 1;
      for (int l = 0; l < 4; ++l) t.quarter[p][i][l] = odd ? -0.25f : 0.25f;
      t.quarter_sign[p][i] = odd ? 0x80000000u : 0u;
    }
  for (int i = 0; i < 4; ++i)
    for (int v = 0; v < 16; ++v) t.sign_of_bit[i][v] = ((v >> i) & 1) ? 0x80 : 0;
  for (int w = 0; w < 2; ++w) {
    for (int b = 0; b < 16; ++b) t.route[w][b] = 0x80;  // zero: the low byte of each bf16 lane
    for (int j = 0; j < 8; ++j) t.route[w][2 * kPerm[j] + 1] = static_cast<uint8_t>(8 * w + j);
  }
  for (int b = 0; b < 16; ++b) t.low4[b] = 0x0f;
  for (int l = 0; l < 4; ++l) t.par_mask[l] = 0xf;
  return t;
}
inline constexpr AbsBf16Table kAbsBf16 = make_abs_bf16();
inline constexpr E81BTableEo kE81BEo = make_e81b_eo();
inline constexpr Avx2Tables kAvx2 = make_avx2_tables();

TERSOR_AVX2_INLINE __m128i load128(const void* p) { return _mm_load_si128(static_cast<const __m128i*>(p)); }

// The sign lanes of 4 consecutive words of a row pair (one column block), prepared a block ahead.
struct alignas(16) GroupSigns {
  __m128i route[4];   // per word: its sign nibbles, parity-fixed, in the high byte of each coordinate's lane
  uint32_t par16[4];  // per word: 16 * parity bits of its slots (bit i: slot i is odd), a byte offset
};

struct SlotDecoder {
  __m128i sign_of_bit[4];
  __m128i odd_lanes;  // the high 16 bits of each 32-bit lane
  TERSOR_AVX2 SlotDecoder() {
    for (int i = 0; i < 4; ++i) sign_of_bit[i] = load128(kAvx2.sign_of_bit[i]);
    odd_lanes = _mm_set1_epi32(static_cast<int>(0xffff0000u));
  }

  // Parity of each slot = XOR of the 8 nibbles of the high half; XORing it into nibble 0 flips the sign of
  // coordinate 0 of each odd slot, as e8p_decode_code does.
  TERSOR_AVX2_INLINE static void prepare(const uint64_t* w, GroupSigns& gs) {
    const __m128 w01 = _mm_castsi128_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
    const __m128 w23 = _mm_castsi128_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 2)));
    __m128i hi = _mm_castps_si128(_mm_shuffle_ps(w01, w23, _MM_SHUFFLE(3, 1, 3, 1)));
    __m128i par = _mm_xor_si128(hi, _mm_srli_epi32(hi, 16));
    par = _mm_xor_si128(par, _mm_srli_epi32(par, 8));
    par = _mm_and_si128(_mm_xor_si128(par, _mm_srli_epi32(par, 4)), load128(kAvx2.par_mask));
    hi = _mm_xor_si128(hi, par);
    _mm_store_si128(reinterpret_cast<__m128i*>(gs.par16), _mm_slli_epi32(par, 4));
    // Byte j of nib01 = nibble j of word 0 (j < 8) or of word 1 (j >= 8); the same for words 2, 3.
    const __m128i hi4 = _mm_srli_epi16(hi, 4), low4 = load128(kAvx2.low4);
    const __m128i nib01 = _mm_and_si128(_mm_unpacklo_epi8(hi, hi4), low4);
    const __m128i nib23 = _mm_and_si128(_mm_unpackhi_epi8(hi, hi4), low4);
    const __m128i route0 = load128(kAvx2.route[0]), route1 = load128(kAvx2.route[1]);
    gs.route[0] = _mm_shuffle_epi8(nib01, route0);
    gs.route[1] = _mm_shuffle_epi8(nib01, route1);
    gs.route[2] = _mm_shuffle_epi8(nib23, route0);
    gs.route[3] = _mm_shuffle_epi8(nib23, route1);
  }

  // Slot s of a word (low half `lo`), without its +-1/4: even coordinates, odd coordinates.
  TERSOR_AVX2_INLINE void values(int s, uint32_t lo, __m128i route, __m128& even, __m128& odd) const {
    const __m128i v = _mm_xor_si128(_mm_shuffle_epi8(sign_of_bit[s], route),
                                    load128(kAbsBf16.row[(lo >> (8 * s)) & 0xffu]));
    even = _mm_castsi128_ps(_mm_slli_epi32(v, 16));
    odd = _mm_castsi128_ps(_mm_and_si128(v, odd_lanes));
  }
};

// Per-call operands of the AVX2 GEMV. x rows are permuted per 8-column block into kPerm order.
struct Avx2Gemv {
  const int64_t* stage[2];  // E8P stages as [m, row_words] arrays (stage s starts at word s * n/32 of a row)
  int64_t row_words;
  const int32_t* block_off; // [8][n/64 + 1]: word offset of lanes 4g .. 4g+3 of column block J in a row block
  const uint8_t* qbytes;    // Qidxs as bytes (the 3-bit E81B codes)
  int64_t n, m;
  const float* x;   // [B, n]
  const float* x2;  // x / resid_scale (3 and 4 bits)
  const float* xq;  // [B, n/4]: per word position k, 0.25 * sums of column blocks (2k, 2k, 2k+1, 2k+1)
  const float* xq2; // the same for x2 (4 bits)
  float* z;         // [B, m]
};

// The accumulators of a row pair for NB rows of x. Each (row, x row) cycles over kRot registers so that
// no FMA chain bounds the loop: at batch 1 a row gets 4 FMAs per word, 16 per block (6, 5, 5 per register).
template <int NB>
struct RowPairAcc {
  static constexpr int kRot = NB == 1 ? 3 : NB == 2 ? 2 : 1;
  __m128 v[2][NB][kRot];
  __m128 quarter;  // batch 1: lanes (R0, R1, R0, R1) of the +-1/4 terms

  // Slot s of word w in its block (both compile-time after unrolling) against x at its 8 columns.
  TERSOR_AVX2_INLINE void fma(int w, int s, __m128 even, __m128 odd, const float* x, int64_t x_stride) {
    const int r = s & 1, k = 4 * w + 2 * (s >> 1);
    for (int b = 0; b < NB; ++b) {
      __m128& ae = v[r][b][k % kRot];
      ae = _mm_fmadd_ps(even, _mm_loadu_ps(x + b * x_stride), ae);
      __m128& ao = v[r][b][(k + 1) % kRot];
      ao = _mm_fmadd_ps(odd, _mm_loadu_ps(x + b * x_stride + 4), ao);
    }
  }
};

// One E8P word (w-th of its block) of a row pair; x and xq point at the word's 16 columns.
template <int NB>
TERSOR_AVX2_INLINE void e8p_word(const SlotDecoder& d, int w, uint32_t lo, const GroupSigns& gs, const float* x,
                                 const float* xq, int64_t n, RowPairAcc<NB>& acc) {
#pragma GCC unroll 4
  for (int s = 0; s < 4; ++s) {
    __m128 even, odd;
    d.values(s, lo, gs.route[w], even, odd);
    if constexpr (NB > 1) {  // 4 * par16 = 64 * parity bits: the row of `quarter`
      const __m128 t = _mm_load_ps(reinterpret_cast<const float*>(
          reinterpret_cast<const char*>(kAvx2.quarter) + 4 * gs.par16[w] + 16 * s));
      even = _mm_add_ps(even, t);
      odd = _mm_add_ps(odd, t);
    }
    acc.fma(w, s, even, odd, x + 8 * (s >> 1), n);
  }
  if constexpr (NB == 1) {
    const __m128 sign = _mm_load_ps(
        reinterpret_cast<const float*>(reinterpret_cast<const char*>(kAvx2.quarter_sign) + gs.par16[w]));
    acc.quarter = _mm_add_ps(acc.quarter, _mm_xor_ps(_mm_load_ps(xq), sign));
  }
}

// The 3-bit residual of word w: E81B codes of (R0, R1) x (first, second 8 columns), one byte each.
template <int NB>
TERSOR_AVX2_INLINE void e81b_word(int w, const uint64_t codes[2], const float* x2, int64_t n, RowPairAcc<NB>& acc) {
  if constexpr (NB == 1) {
    // Both rows share x2: keep it in registers and take the table rows as the FMAs' memory operands.
    const __m128 xs[4] = {_mm_loadu_ps(x2), _mm_loadu_ps(x2 + 4), _mm_loadu_ps(x2 + 8), _mm_loadu_ps(x2 + 12)};
#pragma GCC unroll 4
    for (int s = 0; s < 4; ++s) {
      const float* v = kE81BEo.row[(codes[s & 1] >> (8 * (2 * w + (s >> 1)))) & 0xffu];
      const int r = s & 1, k = 4 * w + 2 * (s >> 1), kRot = RowPairAcc<1>::kRot;
      __m128& ae = acc.v[r][0][k % kRot];
      ae = _mm_fmadd_ps(_mm_load_ps(v), xs[2 * (s >> 1)], ae);
      __m128& ao = acc.v[r][0][(k + 1) % kRot];
      ao = _mm_fmadd_ps(_mm_load_ps(v + 4), xs[2 * (s >> 1) + 1], ao);
    }
  } else {
#pragma GCC unroll 4
    for (int s = 0; s < 4; ++s) {
      const float* v = kE81BEo.row[(codes[s & 1] >> (8 * (2 * w + (s >> 1)))) & 0xffu];
      acc.fma(w, s, _mm_load_ps(v), _mm_load_ps(v + 4), x2 + 8 * (s >> 1), n);
    }
  }
}

// One row pair (R0, R1) against NB rows of x: the block loop's operands and accumulators.
template <int NB, int kBits>
struct RowPairGemv {
  static constexpr int kStages = kBits == 4 ? 2 : 1;
  const SlotDecoder& d;
  int64_t n;
  const int32_t* off;                // block J's words sit at base[stage] + off[J]; off[nJ] repeats off[nJ - 1]
  const int64_t* base[kStages];
  const uint8_t* e81b[2];            // the two rows' E81B codes (3 bits)
  const float *x, *x2, *xq, *xq2;
  const char* prefetch;
  RowPairAcc<NB> acc;

  // Block J (64 columns, 4 words per stage), whose signs are in `cur`. The signs of block J + 1 are
  // prepared first, into `next`, so that their load -> parity -> shuffle chain overlaps this block's work;
  // for the last block that re-reads block J (the padded offset), which is harmless.
  TERSOR_AVX2_INLINE void block(int64_t J, const GroupSigns (&cur)[kStages], GroupSigns (&next)[kStages]) {
    // Qidxs rows hold both stages (and the E81B bytes), so a row pair's words are not a regular stream for
    // the hardware prefetcher: each row pair walks its two rows of the next row block, a line per block.
    _mm_prefetch(prefetch + 64 * J, _MM_HINT_T0);
    const uint64_t* words[kStages];
    for (int st = 0; st < kStages; ++st) {
      SlotDecoder::prepare(reinterpret_cast<const uint64_t*>(base[st] + off[J + 1]), next[st]);
      words[st] = reinterpret_cast<const uint64_t*>(base[st] + off[J]);
    }
    uint64_t codes[2];
    if constexpr (kBits == 3)
      for (int r = 0; r < 2; ++r) std::memcpy(&codes[r], e81b[r] + 8 * J, 8);
#pragma GCC unroll 4
    for (int w = 0; w < 4; ++w) {
      const int64_t col = 64 * J + 16 * w, q = 16 * J + 4 * w;
      e8p_word<NB>(d, w, static_cast<uint32_t>(words[0][w]), cur[0], x + col, xq + q, n, acc);
      if constexpr (kBits == 4)
        e8p_word<NB>(d, w, static_cast<uint32_t>(words[1][w]), cur[1], x2 + col, xq2 + q, n, acc);
      if constexpr (kBits == 3) e81b_word<NB>(w, codes, x2 + col, n, acc);
    }
  }
};

template <int NB, int kBits>
TERSOR_AVX2 void gemv_rowpair_avx2(const Avx2Gemv& a, const SlotDecoder& d, int64_t I, int g, int64_t b0) {
  const int64_t n = a.n, nJ = n / 64, R0 = 16 * I + 2 * g;
  RowPairGemv<NB, kBits> p{d, n, a.block_off + g * (nJ + 1)};
  for (int st = 0; st < p.kStages; ++st) p.base[st] = a.stage[st] + 16 * I * a.row_words;
  if constexpr (kBits == 3)
    for (int r = 0; r < 2; ++r) p.e81b[r] = a.qbytes + e81b_byte_index(R0 + r, 0, n);
  p.x = a.x + b0 * n;
  p.x2 = kBits > 2 ? a.x2 + b0 * n : nullptr;
  p.xq = a.xq + b0 * (n / 4);
  p.xq2 = kBits == 4 ? a.xq2 + b0 * (n / 4) : nullptr;
  const int64_t next_block = std::min(I + 1, a.m / 16 - 1);  // the last one re-touches itself
  p.prefetch = reinterpret_cast<const char*>(a.stage[0] + (16 * next_block + 2 * g) * a.row_words);
  for (auto& r : p.acc.v)
    for (auto& b : r)
      for (auto& k : b) k = _mm_setzero_ps();
  p.acc.quarter = _mm_setzero_ps();

  using Signs = GroupSigns[p.kStages];
  Signs gs0, gs1;
  Signs *cur = &gs0, *next = &gs1;
  for (int st = 0; st < p.kStages; ++st)
    SlotDecoder::prepare(reinterpret_cast<const uint64_t*>(p.base[st] + p.off[0]), gs0[st]);
  for (int64_t J = 0; J < nJ; ++J) {
    p.block(J, *cur, *next);
    std::swap(cur, next);
  }

  alignas(16) float quarter[4];
  _mm_store_ps(quarter, p.acc.quarter);
  for (int r = 0; r < 2; ++r)
    for (int b = 0; b < NB; ++b) {
      __m128 s = p.acc.v[r][b][0];
      for (int k = 1; k < RowPairAcc<NB>::kRot; ++k) s = _mm_add_ps(s, p.acc.v[r][b][k]);
      s = _mm_add_ps(s, _mm_movehl_ps(s, s));
      s = _mm_add_ss(s, _mm_movehdup_ps(s));
      float y = _mm_cvtss_f32(s);
      if constexpr (NB == 1) y += quarter[r] + quarter[r + 2];
      a.z[(b0 + b) * a.m + R0 + r] = y;
    }
}

template <int kBits>
TERSOR_AVX2 void gemv_avx2(const Avx2Gemv& a, int64_t B) {
  const SlotDecoder d;
  // Rows of x are taken 4 at a time (2 weight rows x 4 = 8 accumulators), the rest at once.
  tersor::parallel_for(0, a.m / 2, 4, [&](int64_t pb, int64_t pe) {
    for (int64_t p = pb; p < pe; ++p) {
      const int64_t I = p / 8;
      const int g = static_cast<int>(p % 8);
      int64_t b0 = 0;
      for (; b0 + 4 <= B; b0 += 4) gemv_rowpair_avx2<4, kBits>(a, d, I, g, b0);
      switch (B - b0) {
        case 3: gemv_rowpair_avx2<3, kBits>(a, d, I, g, b0); break;
        case 2: gemv_rowpair_avx2<2, kBits>(a, d, I, g, b0); break;
        case 1: gemv_rowpair_avx2<1, kBits>(a, d, I, g, b0); break;
        default: break;
      }
    }
  });
}

// Where each block's 4 words sit. They are consecutive when n/32 is a multiple of 4 or there is one stage
// per row (2 bits); otherwise (3 and 4 bits, n = 64 mod 128) the E8P stages are copied out flat first.
void layout_words(const E8PCall& c, const int64_t* q, std::vector<int64_t>& repacked, std::vector<int32_t>& block_off,
                  Avx2Gemv& a) {
  const int64_t S = c.n / 32, nJ = c.n / 64;
  a.qbytes = reinterpret_cast<const uint8_t*>(q);
  a.row_words = c.row_words;
  a.stage[0] = q;
  a.stage[1] = q + S;
  if (c.bits > 2 && S % 4 != 0) {
    const int64_t stages = c.bits == 4 ? 2 : 1;
    repacked.resize(static_cast<size_t>(stages * c.m * S));
    for (int64_t st = 0; st < stages; ++st)
      for (int64_t r = 0; r < c.m; ++r)
        std::memcpy(repacked.data() + (st * c.m + r) * S, q + r * c.row_words + st * S, S * sizeof(int64_t));
    a.row_words = S;
    a.stage[0] = repacked.data();
    a.stage[1] = repacked.data() + c.m * S;
  }
  block_off.resize(static_cast<size_t>(8 * (nJ + 1)));
  for (int g = 0; g < 8; ++g)
    for (int64_t J = 0; J <= nJ; ++J) {
      const int64_t t = 32 * std::min(J, nJ - 1) + 4 * g;  // flat word index in the row block's [16, S] stage array
      block_off[g * (nJ + 1) + J] = static_cast<int32_t>((t / S) * a.row_words + t % S);
    }
  a.block_off = block_off.data();
}

// x (and x / resid_scale) in kPerm order per 8-column block, plus the 1/4-scaled block sums.
void prepare_x(const E8PCall& c, const float* x, int64_t B, std::vector<float>& ws, Avx2Gemv& a) {
  const int64_t n = c.n, stages = c.bits > 2 ? 2 : 1;
  ws.resize(static_cast<size_t>(stages * B * (n + n / 4)));
  float* xs[2] = {ws.data(), ws.data() + B * n};
  float* qs[2] = {ws.data() + stages * B * n, ws.data() + stages * B * n + B * (n / 4)};
  for (int st = 0; st < stages; ++st)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t blk = 0; blk < n / 8; ++blk) {
        const float* src = x + b * n + 8 * blk;
        float* dst = xs[st] + b * n + 8 * blk;
        float sum = 0.f;
        for (int j = 0; j < 8; ++j) {
          const float v = st == 0 ? src[kPerm[j]] : src[kPerm[j]] / c.resid_scale;
          dst[j] = v;
          sum += v;
        }
        float* q = qs[st] + b * (n / 4) + 4 * (blk / 2) + 2 * (blk & 1);
        q[0] = q[1] = 0.25f * sum;
      }
  a.x = xs[0];
  a.xq = qs[0];
  a.x2 = stages == 2 ? xs[1] : nullptr;
  a.xq2 = stages == 2 ? qs[1] : nullptr;
}

bool cpu_has_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#endif

Tensor e8p_linear_cpu(const Tensor& x, const Tensor& qidxs, int64_t in_features, std::optional<double> resid_scale) {
  constexpr const char* op = "e8p_linear";
  const E8PCall c = check_e8p_call(qidxs, in_features, resid_scale, op);
  const std::vector<int64_t> out_shape = check_linear_inputs(x, std::nullopt, qidxs, c.n, c.m, op);
  const Tensor xf = as_contiguous(as_dtype(torch::stable::reshape(x, {-1, c.n}), ScalarType::Float));
  const int64_t B = xf.size(0);
  if (B == 0) return empty(out_shape, ScalarType::Float, x.device());
  if (B > kLutBatch) {
    // Decoding once and a BLAS matmul win when the weight is reused by many rows.
    const Tensor w = e8p_decode_cpu(qidxs, in_features, resid_scale, ScalarType::Float);
    return torch::stable::reshape(torch::stable::matmul(xf, torch::stable::transpose(w, 0, 1)), out_shape);
  }
  const Tensor q = as_contiguous(qidxs);
  Tensor z = empty({B, c.m}, ScalarType::Float, xf.device());
#if TERSOR_X86
  if (cpu_has_avx2_fma()) {
    Avx2Gemv a{};
    std::vector<int64_t> repacked;
    std::vector<int32_t> block_off;
    layout_words(c, q.const_data_ptr<int64_t>(), repacked, block_off, a);
    a.n = c.n;
    a.m = c.m;
    a.z = z.mutable_data_ptr<float>();
    std::vector<float> ws;
    prepare_x(c, xf.const_data_ptr<float>(), B, ws, a);
    switch (c.bits) {
      case 2: gemv_avx2<2>(a, B); break;
      case 3: gemv_avx2<3>(a, B); break;
      default: gemv_avx2<4>(a, B); break;
    }
    return torch::stable::reshape(z, out_shape);
  }
#endif
  // x / resid_scale (RVQ stage 2): float32 x divided by the fp32 scale, as aten::div by a Python float does.
  std::vector<float> x2;
  if (c.bits > 2) {
    const float* xp = xf.const_data_ptr<float>();
    const float rs = c.resid_scale;
    x2.resize(static_cast<size_t>(B * c.n));
    for (size_t i = 0; i < x2.size(); ++i) x2[i] = xp[i] / rs;
  }
  GemvArgs a{&c, q.const_data_ptr<int64_t>(), xf.const_data_ptr<float>(), c.bits > 2 ? x2.data() : nullptr, B,
             z.mutable_data_ptr<float>()};
  tersor::parallel_for(0, c.m / 2, 4, [&](int64_t pb, int64_t pe) {
    for (int64_t p = pb; p < pe; ++p) {
      const int64_t I = p / 8;
      const int g = static_cast<int>(p % 8);
      int64_t b0 = 0;
      for (; b0 + 4 <= B; b0 += 4) gemv_rowpair_scalar<4>(a, I, g, b0);
      switch (B - b0) {
        case 3: gemv_rowpair_scalar<3>(a, I, g, b0); break;
        case 2: gemv_rowpair_scalar<2>(a, I, g, b0); break;
        case 1: gemv_rowpair_scalar<1>(a, I, g, b0); break;
        default: break;
      }
    }
  });
  return torch::stable::reshape(z, out_shape);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(tersor, CPU, m) {
  m.impl("e8p_decode", TORCH_BOX(&e8p_decode_cpu));
  m.impl("e8p_linear", TORCH_BOX(&e8p_linear_cpu));
}

}  // namespace tersor::codebook
