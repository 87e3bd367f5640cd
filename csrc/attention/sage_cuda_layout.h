// Index and fragment math of the sm80/sm89 attention kernels (sage_attn_cuda.cu, sage_quant_cuda.cu),
// shared with their lane-by-lane CPU replay (sage_cuda_emulate.cpp) so the replay exercises the very
// mappings the kernels use. Torch-free, host + device. Lane l of a warp is (g, t) = (l / 4, l % 4).
// PTX rules these functions encode (PTX ISA "Matrix Fragments for mma.m16n8k32 / m16n8k16"):
//   A (row-major, 16 x 32 bytes of k): register r holds row g + 8 (r & 1), k-bytes 4t + 16 (r >> 1) .. +3
//     (8-bit: 4 k-values; 16-bit m16n8k16: 2 k-values, the same byte positions);
//   B (column-major, 32 bytes of k x 8): register j holds column g, k-bytes 4t + 16 j .. +3;
//   C/D (16 x 8 fp32/s32): element i holds row g + 8 (i >> 1), column 2t + (i & 1).
#pragma once

#include <cstdint>

#include "attention/sage_format.h"
#include "common/macros.h"

namespace tersor::attention {

TERSOR_HD constexpr int frag_a_row(int g, int r) { return g + 8 * (r & 1); }
TERSOR_HD constexpr int frag_k_byte(int t, int half) { return 4 * t + 16 * half; }  // half: A r >> 1, B j
TERSOR_HD constexpr int frag_c_row(int g, int i) { return g + 8 * (i >> 1); }
TERSOR_HD constexpr int frag_c_col(int t, int i) { return 2 * t + (i & 1); }

// INT4 (mma.m16n8k64.s4, PTX ISA "Matrix Fragments for mma.m16n8k64"): A register r of lane (g, t) holds
// row g + 8 (r & 1), k = 8t + 32 (r >> 1) .. +7; B register j holds column g, k = 8t + 32 j .. +7; C as above.
// Packed two channels per byte (channel 2i in the low nibble of byte i), k = 8t + x sits in byte 4t + x / 2:
// the same bytes as the s8 rules, so every offset below serves both widths (a k-step is 32 bytes: 32 INT8 or
// 64 INT4 channels) and the rows / columns a lane touches, hence the quantization groups, are unchanged.
TERSOR_HD constexpr uint8_t pack_int4_pair(int lo, int hi) {
  return static_cast<uint8_t>((lo & 15) | ((hi & 15) << 4));
}
// Byte of channel c in a packed Q / K row, and whether it is the high nibble.
TERSOR_HD constexpr int int4_channel_byte(int c) { return c / 2; }
TERSOR_HD constexpr int int4_channel_shift(int c) { return 4 * (c & 1); }

// Shared-memory byte offsets of the fragment words (Tr = SageAttnSm8xKernelTraits<D, FP8, BITS>), each split into
// the lane's base word (register 0) plus a compile-time delta per register, the shape the kernel uses (one
// address register per fragment, immediate offsets: fewer live registers at D = 128).
template <typename Tr>
TERSOR_HD constexpr int frag_a_delta(int r) {  // A register r relative to register 0, row stride kQKRowBytes
  return (frag_a_row(0, r) - frag_a_row(0, 0)) * Tr::kQKRowBytes + frag_k_byte(0, r >> 1);
}
TERSOR_HD constexpr int frag_b_delta(int j) { return frag_k_byte(0, j); }  // B register j relative to register 0
// Q A-fragment register r of m-tile mt, k-step kk (32 head-dim bytes per step).
template <typename Tr>
TERSOR_HD constexpr int q_frag_offset(int warp, int mt, int g, int t, int kk, int r) {
  return (warp * Tr::kWarpRows + mt * 16 + frag_a_row(g, 0)) * Tr::kQKRowBytes + kk * 32 + frag_k_byte(t, 0) +
         frag_a_delta<Tr>(r);
}
// K B-fragment register j of key n-tile nt (8 keys), k-step kk.
template <typename Tr>
TERSOR_HD constexpr int k_frag_offset(int nt, int g, int t, int kk, int j) {
  return (nt * 8 + g) * Tr::kQKRowBytes + kk * 32 + frag_k_byte(t, 0) + frag_b_delta(j);
}
// V^T B-fragment register j of channel n-tile dn, k-step kk: 32 bytes of tokens per step in both modes
// (32 e4m3 tokens or 16 16-bit tokens).
template <typename Tr>
TERSOR_HD constexpr int v_frag_offset(int dn, int g, int t, int kk, int j) {
  return (dn * 8 + g) * Tr::kVRowBytes + kk * 32 + frag_k_byte(t, 0) + frag_b_delta(j);
}

// P as the A operand of P.V, built from the QK accumulator s[mt][nt][0..3] of the same lane (no shuffle):
// A register r of k-step kk takes the accumulator pair s[nt][e], s[nt][e + 1] (C columns 2t, 2t + 1 of
// row g + 8 (r & 1)).
TERSOR_HD constexpr int p_frag_elem(int r) { return (r & 1) * 2; }
// 16-bit (k16): the pair is k = 2t, 2t + 1 (r < 2) or 2t + 8, 2t + 9 of the 16-token step: n-tile 2kk + (r >> 1).
TERSOR_HD constexpr int p16_frag_ntile(int kk, int r) { return 2 * kk + (r >> 1); }
// FP8 (k32): 4 e4m3 per register, k = 4t .. 4t + 3 (+16 for r >= 2): two pairs, from n-tiles nt and nt + 1
// with nt = 4kk (+2 for r >= 2). So MMA position 4t + j of each 16 tokens is token 2t + j (j < 2) or
// 8 + 2t + j - 2: the V^T permutation v_fp8_position_token.
TERSOR_HD constexpr int p8_frag_ntile(int kk, int r) { return 4 * kk + (r >= 2 ? 2 : 0); }

// cp.async 16-byte chunk i of a tile copy with `chunks_per_row` chunks per row.
TERSOR_HD constexpr int chunk_row(int i, int chunks_per_row) { return i / chunks_per_row; }
TERSOR_HD constexpr int chunk_col_byte(int i, int chunks_per_row) { return (i % chunks_per_row) * 16; }

// Prologue: the i-th (i < 16) token of K group t (t < 4) of the tile starting at tile0 (inverse of k_group).
TERSOR_HD constexpr int64_t k_group_token(int64_t tile0, int t, int i) { return tile0 + 8 * (i / 2) + 2 * t + (i % 2); }
// Prologue: the i-th (i < 4) row of Q group g of the 32-row block starting at row0 (inverse of q_group).
TERSOR_HD constexpr int64_t q_group_row(int64_t block0, int g, int i) { return block0 + g + 8 * i; }

// Scale indices in the kernels' scale arrays (per (batch, head) slices of q_groups / k_groups of the padded
// lengths).
TERSOR_HD constexpr int64_t q_scale_index(int64_t bh, int64_t len_q_pad, int64_t row, int g) {
  return bh * (len_q_pad / SageTraitsSm8x::kWarpQ * SageTraitsSm8x::kQGroupsPerWarp) +
         (row / SageTraitsSm8x::kWarpQ) * SageTraitsSm8x::kQGroupsPerWarp + g;
}
// K scale of group t of key tile `tile`, within one (batch, kv head) slice (32-bit: the kernel's loop index).
TERSOR_HD constexpr int k_scale_in_slice(int tile, int t) { return tile * SageTraitsSm8x::kKGroupsPerTile + t; }
TERSOR_HD constexpr int64_t k_scale_index(int64_t bkv, int64_t len_k_pad, int64_t tile, int t) {
  return bkv * (len_k_pad / SageTraitsSm8x::kCtaK * SageTraitsSm8x::kKGroupsPerTile) +
         k_scale_in_slice(static_cast<int>(tile), t);
}

// Q smoothing: the bias q_mean . K'_j of the 32-row block holding `row`, key token `token`, in the scratch
// [B, Hq, Lq_pad / 32, Lk_pad] fp32 (zero past Lk).
TERSOR_HD constexpr int64_t q_bias_index(int64_t bh, int64_t len_q_pad, int64_t len_k_pad, int64_t row, int64_t token) {
  return (bh * (len_q_pad / SageTraitsSm8x::kWarpQ) + row / SageTraitsSm8x::kWarpQ) * len_k_pad + token;
}
// Q smoothing: the per-block mean q_mean, [B, Hq, Lq_pad / 32, D] fp32.
TERSOR_HD constexpr int64_t q_mean_index(int64_t bh, int64_t len_q_pad, int64_t row, int64_t head_dim, int c) {
  return (bh * (len_q_pad / SageTraitsSm8x::kWarpQ) + row / SageTraitsSm8x::kWarpQ) * head_dim + c;
}

// Global offsets of the prologue's outputs and the sm80/sm89 kernel's operands (issue 17): int64, since
// (batch x heads x padded length) rows pass 2^31 elements long before any one dimension does. CPU tests
// evaluate them past 2^31 through tersor_testing::_sage_index.
// The kernels count keys and query rows of one (batch, head) in 32-bit registers (visible_keys, tile0, the
// tile loop): a CUDA call takes Lq, Lk <= this (Lk_pad then fits int); the glue refuses more with a ValueError.
inline constexpr int64_t kSageCudaMaxLen = (int64_t{1} << 31) - 256;
// Byte offset of packed row `row` of slice bh in q_int [B * Hq, Lq_pad, row_bytes] (or k_int [B * Hkv, Lk_pad,
// row_bytes]).
TERSOR_HD constexpr int64_t qk_row_offset(int64_t bh, int64_t len_pad, int64_t row, int row_bytes) {
  return (bh * len_pad + row) * row_bytes;
}
// Offset (in units of elem_bytes bytes) of channel c, position p of V^T [B * Hkv, D, Lk_pad].
TERSOR_HD constexpr int64_t v_t_offset(int64_t bkv, int head_dim, int64_t len_k_pad, int c, int64_t p, int elem_bytes) {
  return ((bkv * head_dim + c) * len_k_pad + p) * elem_bytes;
}
// Element offset of out[b, h, row, 0] in the contiguous out [B, Hq, Lq, D] (head_dim 1: of lse[b, h, row]).
TERSOR_HD constexpr int64_t out_row_offset(int64_t bh, int64_t len_q, int64_t row, int head_dim) {
  return (bh * len_q + row) * head_dim;
}

}  // namespace tersor::attention
