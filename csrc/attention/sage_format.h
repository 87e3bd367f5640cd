// SageAttention2-style quantized attention: the numerics and quantization-group maps shared by the CPU
// twin (sage_cpu.cpp), the CUDA kernels (later stages) and the CPU tests (through _sage_* ops).
// Torch-free so kernel sources can include it. Design and what differs from thu-ml/SageAttention:
// docs/research/sage_attention.md.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/macros.h"

namespace tersor::attention {

// ---- tiles ----
// sm80 / sm89 mma.sync kernel: a CTA owns CTA_Q query rows (WARP_Q per warp) and walks the keys in
// CTA_K-token tiles. The CPU twin processes keys in the same tiles so its online softmax rescales at the
// same points as the kernel (the result depends on where the running max is taken).
struct SageTraitsSm8x {
  static constexpr int kCtaQ = 128;
  static constexpr int kCtaK = 64;
  static constexpr int kWarpQ = 32;
  static constexpr int kWarps = kCtaQ / kWarpQ;
  // Scales per warp tile of Q (one per A-fragment row class r mod 8, see q_group) and per K tile (one
  // per B-fragment column pair class, see k_group): every s32 accumulator element then needs exactly
  // one q_scale * k_scale product.
  static constexpr int kQGroupsPerWarp = 8;
  static constexpr int kKGroupsPerTile = 4;
};

// ---- quantization groups ("per-thread" granularity of the m16n8k32 fragments) ----
// In mma.m16n8k32 the A fragment of lane l holds rows (l/4) and (l/4)+8 of each 16-row m-tile; a warp's
// 32 rows are two m-tiles, so lane l touches exactly the rows r with r mod 8 == l/4. Those 4 rows share
// a scale. Group index of query row `row` (0-based in the sequence):
template <typename Traits = SageTraitsSm8x>
TERSOR_HD constexpr int64_t q_group(int64_t row) {
  return (row / Traits::kWarpQ) * Traits::kQGroupsPerWarp + (row % 8);
}
template <typename Traits = SageTraitsSm8x>
TERSOR_HD constexpr int64_t q_groups(int64_t len_q) {
  return (len_q + Traits::kWarpQ - 1) / Traits::kWarpQ * Traits::kQGroupsPerWarp;
}
// The accumulator fragment of lane l holds columns 2*(l%4) and 2*(l%4)+1 of each 8-column n-tile, so the
// key tokens {8i + 2t, 8i + 2t + 1} (i over the tile's n-tiles) share a scale: 4 groups of 16 tokens per
// 64-token tile.
template <typename Traits = SageTraitsSm8x>
TERSOR_HD constexpr int64_t k_group(int64_t token) {
  return (token / Traits::kCtaK) * Traits::kKGroupsPerTile + (token % 8) / 2;
}
template <typename Traits = SageTraitsSm8x>
TERSOR_HD constexpr int64_t k_groups(int64_t len_k) {
  return (len_k + Traits::kCtaK - 1) / Traits::kCtaK * Traits::kKGroupsPerTile;
}
// FP8 P.V: the QK accumulator gives lane (g, t) the P of tokens {8i + 2t, 8i + 2t + 1}; packed 4 per
// register they form the A fragment of mma.m16n8k32.e4m3, whose lane t holds k = 4t..4t+3 (and +16). So
// V^T is stored with MMA position p of every 16 tokens holding token 2t + j (j < 2) or 8 + 2t + (j - 2),
// p = 4t + j: the order [0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15].
TERSOR_HD constexpr int64_t v_fp8_position_token(int64_t pos) {
  const int64_t p = pos & 15, t = p >> 2, j = p & 3;
  return (pos & ~int64_t{15}) + (j < 2 ? 2 * t + j : 8 + 2 * t + (j - 2));
}

// Q smoothing (INT4 path) subtracts the mean of each warp's 32-row block.
template <typename Traits = SageTraitsSm8x>
TERSOR_HD constexpr int64_t q_smooth_block(int64_t row) {
  return row / Traits::kWarpQ;
}

// ---- visible keys: causal convention and sliding window ----
// Bottom-right aligned (FlashAttention / KV-cache): query row i of Lq sits at key position p = i + (Lk - Lq);
// causal: it sees keys j <= p. SDPA's is_causal is top-left (j <= i); both agree when Lq == Lk. A row sees
// keys [lo, hi) (none when hi <= lo: output 0, LSE -inf). A window (left, right) is
// FlashAttention's window_size: keys in [p - left, p + right], a negative side unbounded (so (-1, -1) is no
// window, and (left, 0) or causal with (left, -1) is a causal sliding window of left + 1 keys).
struct KeyMask {
  bool causal;
  int64_t left, right;
  // Varlen (packed sequences): n_seq > 0 splits the rows and the keys into sequences, sequence s being query rows
  // [cu_q[s], cu_q[s + 1]) and keys [cu_k[s], cu_k[s + 1]) (int64 arrays of n_seq + 1 rising offsets, in the
  // memory of whoever evaluates visible_keys). A row sees only its own sequence's keys, with the rule above
  // (bottom-right causal, window) applied inside the sequence.
  const int64_t* cu_q = nullptr;
  const int64_t* cu_k = nullptr;
  int64_t n_seq = 0;
};
struct KeySpan {
  int64_t lo, hi;
};
// The dense rule: keys [lo, hi) of row `row` of len_q against len_k keys.
TERSOR_HD constexpr KeySpan visible_keys_dense(const KeyMask& mk, int64_t row, int64_t len_q, int64_t len_k) {
  const int64_t p = row + (len_k - len_q);
  int64_t hi = len_k;
  if (mk.causal && p + 1 < hi) hi = p + 1;
  if (mk.right >= 0 && p + mk.right + 1 < hi) hi = p + mk.right + 1;
  int64_t lo = mk.left >= 0 ? p - mk.left : 0;
  lo = lo < 0 ? 0 : (lo > len_k ? len_k : lo);
  return {lo, hi < lo ? lo : hi};
}
// The sequence of a packed row: the last s with cu_q[s] <= row (so an empty sequence is never chosen), clamped to
// [0, n_seq - 1]. Binary search: log2(n_seq) steps.
TERSOR_HD constexpr int64_t varlen_sequence(const int64_t* cu_q, int64_t n_seq, int64_t row) {
  int64_t lo = 0, hi = n_seq - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (cu_q[mid] <= row) lo = mid; else hi = mid - 1;
  }
  return lo;
}
TERSOR_HD constexpr int64_t clamp_key(int64_t x, int64_t len_k) { return x < 0 ? 0 : (x > len_k ? len_k : x); }
TERSOR_HD constexpr KeySpan visible_keys(const KeyMask& mk, int64_t row, int64_t len_q, int64_t len_k) {
  if (mk.n_seq <= 0) return visible_keys_dense(mk, row, len_q, len_k);
  if (row >= mk.cu_q[mk.n_seq]) return {len_k, len_k};  // a padding row past the last sequence: none
  const int64_t s = varlen_sequence(mk.cu_q, mk.n_seq, row);
  // Clamped to [0, len_k], so that offsets no caller checked (a CUDA call's device arrays) never address a key
  // outside the tensor: wrong offsets give wrong rows, never out-of-bounds reads.
  const int64_t k0 = clamp_key(mk.cu_k[s], len_k), k1 = clamp_key(mk.cu_k[s + 1], len_k);
  const int64_t q0 = mk.cu_q[s], nq = mk.cu_q[s + 1] - q0, nk = k1 > k0 ? k1 - k0 : 0;
  const KeySpan local = visible_keys_dense(mk, row - q0, nq, nk);
  return {k0 + local.lo, k0 + local.hi};
}
// Both ends of the span never decrease with the row (also across packed sequences: a later sequence's keys come
// later), so rows r0..r_last (r0 <= r_last) together see keys
// [visible_keys(r0).lo, visible_keys(r_last).hi): the tiles of tile_keys keys [first, end) a CTA of those rows
// walks (first >= end: none). A tile before `first` or from `end` on has no visible key for any of its rows.
struct TileSpan {
  int first, end;
};
TERSOR_HD constexpr TileSpan visible_tiles(const KeyMask& mk, int64_t r0, int64_t r_last, int64_t len_q, int64_t len_k,
                                           int tile_keys) {
  const int64_t lo = visible_keys(mk, r0, len_q, len_k).lo, hi = visible_keys(mk, r_last, len_q, len_k).hi;
  return {static_cast<int>(lo / tile_keys), static_cast<int>(hi <= lo ? lo / tile_keys : (hi + tile_keys - 1) / tile_keys)};
}

// ---- block sparsity (block_mask) ----
// A block mask is bool [B, Hm, ceil(Lq / kSparseBlockQ), ceil(Lk / kSparseBlockK)] with Hm = 1 (shared by
// every query head) or Hq; false = the query block never sees the key block (its scores are -inf). The
// blocks are unions of whole kernel tiles -- 128 query rows = one CTA of both kernels; 128 keys = two sm8x
// 64-key tiles or one sm90a 128-key stage -- so a masked block is skipped entirely: no loads, no MMA, and the
// online softmax state is left as it was (the twin skips the same tiles, so an all-true mask is bit-identical
// to no mask). tersor.attention.BLOCK_Q / BLOCK_K are these constants.
constexpr int kSparseBlockQ = 128;
constexpr int kSparseBlockK = 128;
static_assert(kSparseBlockQ == SageTraitsSm8x::kCtaQ, "a query block is one CTA");
static_assert(kSparseBlockK % SageTraitsSm8x::kCtaK == 0, "a key block is whole sm8x tiles");

TERSOR_HD constexpr int64_t sparse_blocks(int64_t len, int64_t block) { return (len + block - 1) / block; }

// Offset of mask[b, h or 0, qb, 0] in a contiguous mask with mask_heads (1 or Hq) heads.
TERSOR_HD constexpr int64_t block_mask_row_offset(int64_t b, int64_t h, int64_t qb, int64_t mask_heads,
                                                  int64_t q_blocks, int64_t k_blocks) {
  return ((b * mask_heads + (mask_heads == 1 ? 0 : h)) * q_blocks + qb) * k_blocks;
}

// The first key tile >= tile (of tile_keys keys each, a divisor of kSparseBlockK) whose key block the mask row
// keeps, or n_tiles. mask_row == nullptr: no mask (every tile is live).
TERSOR_HD inline int next_live_tile(const uint8_t* mask_row, int tile, int n_tiles, int tile_keys) {
  if (mask_row == nullptr) return tile;
  while (tile < n_tiles && mask_row[static_cast<int64_t>(tile) * tile_keys / kSparseBlockK] == 0) ++tile;
  return tile;
}

// ---- softmax constants ----
// P~ = exp2(s - (m - log2(448))) lies in [0, 448], the e4m3 range, so the static P scale is exact and
// cancels against the row sum.
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kFp8POffset = 8.807354922057604f;  // log2(448)
constexpr float kE4M3Max = 448.f;

// ---- float <-> fp8 e4m3 (OCP "e4m3fn": bias 7, no infinities, S.1111.111 = NaN, max 448) ----
// Same result as PTX cvt.rn.satfinite.e4m3x2.f32: round to nearest even; finite values and infinities
// beyond the range saturate to +-448; NaN -> 0x7F. (torch.float8_e4m3fn agrees for |x| < 464 and gives
// NaN at and beyond 464, where satfinite gives 448.)
TERSOR_HD inline uint8_t float_to_e4m3(float x) {
  uint32_t bits;
#if defined(__CUDA_ARCH__)
  bits = __float_as_uint(x);
#else
  std::memcpy(&bits, &x, 4);
#endif
  const uint8_t sign = static_cast<uint8_t>((bits >> 24) & 0x80u);
  const uint32_t abs_bits = bits & 0x7FFFFFFFu;
  if (abs_bits > 0x7F800000u) return 0x7F;  // NaN
  if (abs_bits < 0x3C800000u) {             // |x| < 2^-6: subnormal grid step 2^-9
    float a;
#if defined(__CUDA_ARCH__)
    a = __uint_as_float(abs_bits);
    const int m = __float2int_rn(a * 512.f);
#else
    std::memcpy(&a, &abs_bits, 4);
    const int m = static_cast<int>(std::nearbyint(a * 512.f));  // exact scaling; default mode is RNE
#endif
    return static_cast<uint8_t>(sign | m);  // m == 8 is the smallest normal, 0x08: the encoding carries over
  }
  // Normal: keep 3 mantissa bits, round to nearest even on the fp32 bit pattern.
  const uint32_t lsb = (abs_bits >> 20) & 1u;
  const uint32_t rounded = abs_bits + 0x7FFFFu + lsb;
  const int exp = static_cast<int>(rounded >> 23) - 127 + 7;
  const uint32_t mant = (rounded >> 20) & 7u;
  if (exp > 15 || (exp == 15 && mant == 7)) return static_cast<uint8_t>(sign | 0x7E);  // satfinite
  return static_cast<uint8_t>(sign | (static_cast<uint32_t>(exp) << 3) | mant);
}

TERSOR_HD inline float e4m3_to_float(uint8_t b) {
  const int exp = (b >> 3) & 15;
  const int mant = b & 7;
  float mag;
  if (exp == 15 && mant == 7) {
    mag = NAN;
  } else if (exp == 0) {
    mag = static_cast<float>(mant) * (1.f / 512.f);
  } else {
    mag = ldexpf(1.f + static_cast<float>(mant) * 0.125f, exp - 7);
  }
  return (b & 0x80) ? -mag : mag;
}

// ---- symmetric integer quantization ----
// scale = amax / qmax; code = round_to_nearest_even(x * (qmax / amax)) clamped to [-qmax, qmax] (qmax = 127
// for int8, 7 for int4). RNE is what cvt.rni.sat.s8.f32 / cvt.rni.s32.f32 do; thu-ml/SageAttention rounds
// half away from zero instead. amax == 0 gives scale 0 and all-zero codes. Both the reciprocal and the
// scale are single IEEE fp32 divisions, reproducible on the GPU without fast-math.
TERSOR_HD constexpr int int_qmax(int bits) { return bits == 4 ? 7 : 127; }

struct IntQuantParams {
  float inv_scale;  // qmax / amax (0 when amax == 0)
  float scale;      // amax / qmax
};

TERSOR_HD inline IntQuantParams int_quant_params(float amax, int bits) {
  const float qmax = static_cast<float>(int_qmax(bits));
  if (!(amax > 0.f)) return {0.f, 0.f};
  return {qmax / amax, amax / qmax};
}

TERSOR_HD inline int quantize_int(float x, float inv_scale, int bits) {
  const float y = x * inv_scale;
#if defined(__CUDA_ARCH__)
  int q = __float2int_rn(y);
#else
  int q = static_cast<int>(std::nearbyint(y));
#endif
  const int qmax = int_qmax(bits);
  return q > qmax ? qmax : (q < -qmax ? -qmax : q);
}

// ---- K's channel mean (the prologue's smoothing statistic) ----
// Every implementation sums K's channel over the tokens in fp64 chunk by chunk -- each chunk of kKvStatsChunk
// tokens in token order, then the chunk sums in chunk order -- divides by Lk and rounds once to fp32. The chunks
// are what the CUDA prologue reduces in parallel (one CTA per chunk, then one pass over the chunk sums); one
// order for all keeps the twin, the replay and the kernels bit-identical. (V's channel amax is order-free.)
constexpr int64_t kKvStatsChunk = 256;
TERSOR_HD constexpr int64_t kv_stats_chunks(int64_t len_k) { return (len_k + kKvStatsChunk - 1) / kKvStatsChunk; }
// The fp32 mean of x[0], x[stride], ..., x[(len - 1) * stride] in that order (host: the twin and the replay).
inline float chunked_channel_mean(const float* x, int64_t len, int64_t stride) {
  double total = 0;
  for (int64_t c0 = 0; c0 < len; c0 += kKvStatsChunk) {
    const int64_t c1 = c0 + kKvStatsChunk < len ? c0 + kKvStatsChunk : len;
    double s = 0;
    for (int64_t j = c0; j < c1; ++j) s += x[j * stride];
    total += s;
  }
  return static_cast<float>(total / static_cast<double>(len));
}

// V: per-channel fp8 scale amax_c / 448 (codes = e4m3(v * (448 / amax_c))); the scale is applied to the
// output in the epilogue.
TERSOR_HD inline IntQuantParams fp8_channel_params(float amax) {
  if (!(amax > 0.f)) return {0.f, 0.f};
  return {kE4M3Max / amax, amax / kE4M3Max};
}

}  // namespace tersor::attention
