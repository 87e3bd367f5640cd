// QuIP#'s E8P12 codebook and its packed code layout ("Qidxs"): the tables and the small pieces of
// arithmetic shared by the CPU kernels, the CUDA kernels and the CPU tests of the CUDA fragment code.
// Facts and sources: docs/research/e8p12.md; byte layout: docs/formats.md ("E8P12 Qidxs").
// Torch-free so kernel sources can include it.
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace tersor::codebook {

// ---- the 256 abs vectors, built at compile time ----
// Bit b of a code's sign byte negates coordinate kPerm[b] (QuIP#'s order: it puts coordinates 2j and
// 2j+1 in nibbles j and j+4 of the packed table, so one shift yields an fp16x2 pair).
inline constexpr int kPerm[8] = {0, 2, 4, 6, 1, 3, 5, 7};
// kPerm[b] as arithmetic (device code cannot read a host constexpr array).
TERSOR_HD constexpr int e8p_perm(int b) { return 2 * (b & 3) + (b >> 2); }
static_assert(e8p_perm(0) == 0 && e8p_perm(3) == 6 && e8p_perm(4) == 1 && e8p_perm(7) == 7);

struct E8PTables {
  // twice[a][c] = 2|A[a]_c| (1, 3 or 5): the abs vectors, index order of QuIP#.
  uint8_t twice[256][8];
  // odd[a]: sum(A[a]) is odd, so a signed copy needs an odd number of negatives (QuIP# pre-negates
  // coordinate 7 of such entries so that the sign bits alone select an even number of flips).
  uint8_t odd[256];
  // signed_abs[a][c] = A[a]_c with coordinate 7 negated when odd[a]: the value a code with all sign
  // bits clear decodes to, before the +-1/4 shift (fp32, coordinate order).
  float signed_abs[256][8];
  // QuIP#'s 1 KiB "grid_packed_abs": nibble j = 2 * signed_abs[a][kPerm[j]] + 8 (an odd number 3..13).
  uint32_t packed_abs[256];
};

namespace detail {
// QuIP#'s 29 norm^2-12 abs vectors (values x 2), indices 227..255, in their order.
inline constexpr char kNorm12Twice[29][9] = {
    "31113333", "13113333", "11313333", "11133333", "33313311", "33313131", "33311331", "33313113",
    "33311313", "33311133", "33133311", "33133131", "33131331", "33133113", "33131313", "33131133",
    "31333311", "31333131", "31331331", "31333113", "31331313", "13331133", "13333311", "13333131",
    "13331331", "13333113", "13331313", "11331333", "33113331"};

constexpr E8PTables make_e8p_tables() {
  E8PTables t{};
  int k = 0;
  // {1/2, 3/2, 5/2}^8 with |u|^2 <= 10 (in units of 1/2: sum of squares <= 40), enumerated with
  // coordinate 0 as the most significant digit, which is ascending lexicographic order.
  for (int i = 0; i < 6561; ++i) {
    int d[8] = {};
    int r = i, norm4 = 0;
    for (int c = 7; c >= 0; --c) { d[c] = 2 * (r % 3) + 1; r /= 3; }
    for (int c = 0; c < 8; ++c) norm4 += d[c] * d[c];
    if (norm4 > 40) continue;
    for (int c = 0; c < 8; ++c) t.twice[k][c] = static_cast<uint8_t>(d[c]);
    ++k;
  }
  for (int e = 0; e < 29; ++e, ++k)
    for (int c = 0; c < 8; ++c) t.twice[k][c] = static_cast<uint8_t>(kNorm12Twice[e][c] - '0');
  for (int a = 0; a < 256; ++a) {
    int sum2 = 0;
    for (int c = 0; c < 8; ++c) sum2 += t.twice[a][c];
    t.odd[a] = static_cast<uint8_t>((sum2 / 2) % 2);  // sum of 8 half-integers is an integer
    uint32_t packed = 0;
    for (int c = 0; c < 8; ++c) {
      const int v2 = (c == 7 && t.odd[a]) ? -t.twice[a][c] : t.twice[a][c];
      t.signed_abs[a][c] = 0.5f * static_cast<float>(v2);
    }
    for (int j = 0; j < 8; ++j) {
      const int c = kPerm[j];
      const int v2 = (c == 7 && t.odd[a]) ? -t.twice[a][c] : t.twice[a][c];
      packed |= static_cast<uint32_t>(v2 + 8) << (4 * j);
    }
    t.packed_abs[a] = packed;
  }
  return t;
}
}  // namespace detail

inline constexpr E8PTables kE8PTables = detail::make_e8p_tables();

// ---- one 16-bit code -> 8 values ----
// code = (abs index << 8) | sign byte s. p = parity(s) selects the shift (-1/4 when odd) and flips
// bit 0 back, so the applied flips have even weight; bit b of (s ^ p) negates coordinate kPerm[b].
TERSOR_HD inline void e8p_decode_code(uint32_t code, const float (*signed_abs)[8], float out[8]) {
  const uint32_t a = (code >> 8) & 0xffu;
  uint32_t s = code & 0xffu;
  uint32_t p = s ^ (s >> 4);
  p ^= p >> 2;
  p ^= p >> 1;
  p &= 1u;
  s ^= p;
  const float shift = p ? -0.25f : 0.25f;
  for (int b = 0; b < 8; ++b) {
    const float v = signed_abs[a][e8p_perm(b)];
    out[e8p_perm(b)] = ((s >> b) & 1u ? -v : v) + shift;
  }
}

// ---- QuIP#'s packed layout of an [m, n] code matrix (Qidxs) ----
// One int64 word = 4 codes ("slots") of a 2-row x 16-column patch: slot i covers row r + (i & 1),
// columns c + 8 (i >> 1) .. + 7. Low 32 bits: abs byte of slot i at bits 8i..8i+7. High 32 bits: sign
// bit j of slot i at bit 4j + i (so `(hi >> i) & 0x11111111` is slot i's signs, one per nibble).
// Word order: row block I (16 rows), column block J (64 columns), lane l = 4g + q (32 words): the word
// covers rows 16I + 2g (+1) and columns 64J + 16q .. +15, at flat index I * (n/2) + 32 J + l of the
// contiguous [m, n/32] stage array. A CUDA warp reads one (I, J) block with one coalesced 256-byte load.
struct E8PSlotPos {
  int64_t row, col;  // first of the 8 columns
};
TERSOR_HD inline E8PSlotPos e8p_slot_pos(int64_t I, int64_t J, int lane, int slot) {
  return {16 * I + 2 * (lane >> 2) + (slot & 1), 64 * J + 16 * (lane & 3) + 8 * (slot >> 1)};
}
// Element offset of (row, col) in the decoded weight [m, n]: int64, m * n passes 2^31 in large layers.
TERSOR_HD inline int64_t e8p_elem_offset(int64_t row, int64_t col, int64_t n) { return row * n + col; }
// Flat word index inside one stage's [m, n/32] array.
TERSOR_HD inline int64_t e8p_word_index(int64_t I, int64_t J, int lane, int64_t n) {
  return I * (n / 2) + 32 * J + lane;
}
// The 16-bit code of one slot of a packed word.
TERSOR_HD inline uint32_t e8p_slot_code(uint64_t word, int slot) {
  const uint32_t lo = static_cast<uint32_t>(word), hi = static_cast<uint32_t>(word >> 32);
  uint32_t s = 0;
  for (int j = 0; j < 8; ++j) s |= ((hi >> (4 * j + slot)) & 1u) << j;
  return (((lo >> (8 * slot)) & 0xffu) << 8) | s;
}
// A position in one stage's flat word order, as (row, col) of its [m, n/32] array, advanced without
// divisions. A Qidxs tensor concatenates the stages (RVQ) along its last dim, `row_words` int64 per
// row, stage s starting at column s * n/32: so a word's offset depends on the row it falls in.
struct E8PWordCursor {
  int64_t row, col, stage_words;  // stage_words = n / 32
  TERSOR_HD void advance(int64_t k) {
    col += k;
    while (col >= stage_words) { col -= stage_words; ++row; }
  }
  TERSOR_HD int64_t offset(int64_t row_words, int stage) const {
    return row * row_words + stage * stage_words + col;
  }
};

// ---- bits of the RVQ layouts ----
// 3 bits: stage 2 is one E81B byte per code, row-major after stage 1's n/32 words of each row:
// byte (n/32) * 8 + k of the row is the code of columns 8k .. 8k+7.
TERSOR_HD inline int64_t e81b_byte_index(int64_t row, int64_t code_col, int64_t n) {
  return row * (3 * n / 64) * 8 + (n / 32) * 8 + code_col;
}

// ---- the CUDA GEMV's decode of one word into fp16x2 pairs (QuIP#'s bit trick, our own code) ----
// A nibble v (the packed table holds 2u + 8 for a signed value u) lands in the mantissa of an fp16
// 32 + v/2 + 1/4 = 36.25 + u by (w & 0x00f000f0) | 0x50085008 after a shift; subtracting 36 (even
// parity) or 36.5 (odd parity: the -1/4 coset) leaves exactly u +- 1/4 (fp16 is exact for all of it:
// ulp 1/32 on [32, 64)). Negation is v -> 16 - v, which for odd v is v ^ 14: the sign bits of a slot
// (one per nibble at 4j + i) times 14 are that XOR mask. Output: half2 bit patterns pair[slot][p]
// holding coordinates (2p, 2p+1) of the slot (low half = even coordinate), and per slot the half2
// bit pattern to subtract. Integer-only, so the CPU replays it exactly.
struct E8PHalfWord {
  uint32_t pair[4][4];
  uint32_t bias[4];
};
inline constexpr uint32_t kE8PHalfMask = 0x00f000f0u;
inline constexpr uint32_t kE8PHalfMagic = 0x50085008u;  // fp16x2 (32.25, 32.25) with an empty mantissa slot
inline constexpr uint32_t kE8PBiasEven = 0x50805080u;   // fp16x2 (36.0, 36.0)
inline constexpr uint32_t kE8PBiasOdd = 0x50905090u;    // fp16x2 (36.5, 36.5)

TERSOR_HD inline E8PHalfWord e8p_word_to_halves(uint64_t word, const uint32_t* packed_abs) {
  E8PHalfWord h{};
  const uint32_t lo = static_cast<uint32_t>(word);
  uint32_t hi = static_cast<uint32_t>(word >> 32);
  // Parity of each slot's 8 sign bits, folded into bits 0..3 (slot i's bits are i, 4+i, ..., 28+i).
  uint32_t par = hi ^ (hi >> 16);
  par ^= par >> 8;
  par ^= par >> 4;
  par &= 0xfu;
  hi ^= par;  // flips bit 0 (coordinate 0) of each odd slot: the applied flips then have even weight
  for (int i = 0; i < 4; ++i) {
    const uint32_t w = packed_abs[(lo >> (8 * i)) & 0xffu] ^ (((hi >> i) & 0x11111111u) * 14u);
    h.pair[i][0] = ((w << 4) & kE8PHalfMask) | kE8PHalfMagic;
    h.pair[i][1] = (w & kE8PHalfMask) | kE8PHalfMagic;
    h.pair[i][2] = ((w >> 4) & kE8PHalfMask) | kE8PHalfMagic;
    h.pair[i][3] = ((w >> 8) & kE8PHalfMask) | kE8PHalfMagic;
    h.bias[i] = (par >> i) & 1u ? kE8PBiasOdd : kE8PBiasEven;
  }
  return h;
}

// ---- the GEMV's mma.m16n8k16 mapping (row-major A = weights, B = x^T, fp32 C) ----
// Lane (g, q) = (lane >> 2, lane & 3) decodes the word of rows R0 = 16I + 2g, R1 = R0 + 1 and columns
// 64J + 16q .. +15. For the t-th of the four k16 MMAs of the block it feeds A registers
// {a0a1, a2a3, a4a5, a6a7} = {slot0, slot1, slot2, slot3} pair t: MMA row g is weight row R0 and MMA
// row g+8 is R1, and MMA k index kk is the weight column returned below. The B fragment of that MMA
// (b0b1: k = 2q, 2q+1; b2b3: k = 2q+8, 2q+9; n = g) is then x[batch g] at exactly those columns, so a
// lane loads x[g][64J + 16q .. +15] once for all four MMAs. C rows g / g+8 are again R0 / R1.
TERSOR_HD inline int64_t e8p_mma_col(int64_t J, int t, int kk) {
  // kk = 2q + e (slots 0/1, pair t) or 2q + 8 + e (slots 2/3, pair t) of the lanes with that q.
  const int q = (kk & 7) >> 1, e = kk & 1, hi8 = kk & 8;
  return 64 * J + 16 * q + hi8 + 2 * t + e;
}

// A registers {a0a1, a2a3, a4a5, a6a7} of MMA t and the fp16x2 to subtract from each (see above).
TERSOR_HD inline void e8p_a_frag(const E8PHalfWord& h, int t, uint32_t a[4], uint32_t bias[4]) {
  for (int r = 0; r < 4; ++r) {
    a[r] = h.pair[r][t];
    bias[r] = h.bias[r];
  }
}
// The 3-bit residual's A registers of MMA t: E81B codes of (R0, first 8 columns), (R0, second 8),
// (R1, first 8), (R1, second 8), in the same slot order as the E8P stage (values exact, no bias).
TERSOR_HD inline void e81b_a_frag(const uint32_t (*e81b_half2)[4], uint32_t r0_codes, uint32_t r1_codes, int t,
                                  uint32_t a[4]) {
  a[0] = e81b_half2[r0_codes & 0xffu][t];
  a[1] = e81b_half2[r1_codes & 0xffu][t];
  a[2] = e81b_half2[(r0_codes >> 8) & 0xffu][t];
  a[3] = e81b_half2[(r1_codes >> 8) & 0xffu][t];
}
// The 16 x columns lane q multiplies in column block J: x[g][e8p_lane_x_col(J, q) .. +15]. B registers
// of MMA t: 32-bit word t of the first 8 (b0b1) and of the second 8 (b2b3).
TERSOR_HD inline int64_t e8p_lane_x_col(int64_t J, int q) { return 64 * J + 16 * q; }
// Weight row of accumulator row r (0..15) of row block I: C rows g / g + 8 are R0 / R1 of lane group g.
TERSOR_HD inline int64_t e8p_c_row(int64_t I, int r) { return 16 * I + (r < 8 ? 2 * r : 2 * (r - 8) + 1); }

}  // namespace tersor::codebook
