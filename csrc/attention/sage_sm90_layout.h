// Index and fragment math of the sm90a attention kernel (sage_attn_sm90.cu), shared with its CPU layout
// check (_sage_sm90_layout_check, sage_sm90_check_cpu.cpp). Torch-free, host + device.
//
// Tile-native operands: the relayout kernel rewrites the sm8x prologue's row-major INT8 K [Lk_pad, D] and
// token-permuted e4m3 V^T [D, Lk_pad] (per batch, kv head) so that each 128-token tile is ONE contiguous
// block already in the wgmma canonical K-major, no-swizzle layout: one cp.async.bulk per tile and operand.
// PTX ISA 9.7.15.5.1 (shared memory matrix layout): the K-major operand is built from "core matrices" of
// 8 rows (M or N) x 16 bytes (K), each 128 contiguous bytes, row r of the core matrix at byte 16 r; the
// descriptor's LBO is the byte distance between core matrices adjacent along K, SBO between core matrices
// adjacent along M/N (8-row groups). 8-bit operands must be K-major (no transpose for .s8/.e4m3).
// Lane l of warp w in a warpgroup is (g, t) = (l / 4, l % 4).
#pragma once

#include <cstdint>

#include "attention/sage_cuda_layout.h"
#include "attention/sage_format.h"
#include "attention/sage_sm90_traits.h"
#include "common/macros.h"
#include "common/wgmma_desc.h"

namespace tersor::attention {

// ---- tile-native global layouts (the writer side: sage_sm90_relayout_kernel) ----
constexpr int kSm90CoreBytes = 128;  // one 8 x 16-byte core matrix
constexpr int kSm90KLbo = kSm90CoreBytes;  // K: next 16 head-dim bytes of the same 8 tokens
template <int D>
TERSOR_HD constexpr int sm90_k_sbo() { return 8 * D; }  // K: next 8 tokens
constexpr int kSm90VLbo = kSm90CoreBytes;                  // V^T: next 16 token positions of the same 8 channels
constexpr int kSm90VSbo = 8 * 128;                         // V^T: next 8 channels (128 positions each)

// Byte of K element (token n of the tile, head-dim byte c) inside its 128 x D tile block.
template <int D>
TERSOR_HD constexpr int sm90_k_tile_offset(int n, int c) {
  return (n / 8) * sm90_k_sbo<D>() + (c / 16) * kSm90KLbo + (n % 8) * 16 + c % 16;
}
// Byte of V^T element (channel ch, position p of the tile, p in the v_fp8_position_token order) inside its
// D x 128 tile block.
TERSOR_HD constexpr int sm90_v_tile_offset(int ch, int p) {
  return (ch / 8) * kSm90VSbo + (p / 16) * kSm90VLbo + (ch % 8) * 16 + p % 16;
}
// The relayout kernel's 16-byte chunk i (< 128 D / 16) of a tile: K row n, head-dim byte c; V^T channel ch,
// position p. Both sides of every chunk are 16 contiguous bytes (a core-matrix row).
template <int D>
TERSOR_HD constexpr int sm90_relayout_k_token(int i) { return i / (D / 16); }
template <int D>
TERSOR_HD constexpr int sm90_relayout_k_byte(int i) { return (i % (D / 16)) * 16; }
TERSOR_HD constexpr int sm90_relayout_v_channel(int i) { return i / 8; }
TERSOR_HD constexpr int sm90_relayout_v_position(int i) { return (i % 8) * 16; }
// Tiles keep the row-major tensors' footprint and base: tile `tile` of slice bkv starts at byte
// (bkv * len_k_pad + tile * 128) * D in both buffers (len_k_pad a multiple of 128 on this path).
TERSOR_HD constexpr int64_t sm90_tile_base(int64_t bkv, int64_t len_k_pad, int64_t tile, int D) {
  return (bkv * len_k_pad + tile * 128) * D;
}

// ---- the reader side: what wgmma fetches through a descriptor ----
// Decodes the fields wgmma_smem_desc packs (units of 16 bytes) and returns the shared byte address of
// element (row mn, K byte kb) of the operand, K-major without swizzle: the PTX canonical layout
// ((8, m), (16 B, k)) : ((16 B, SBO), (1, LBO)). Used only by the CPU check, so the check runs on the
// descriptor bits the kernel builds, not on a second copy of the offset formula.
TERSOR_HD constexpr uint32_t sm90_desc_read_address(uint64_t desc, int mn, int kb) {
  const uint32_t start = static_cast<uint32_t>(desc & 0x3FFFu) << 4;
  const uint32_t lbo = static_cast<uint32_t>((desc >> 16) & 0x3FFFu) << 4;
  const uint32_t sbo = static_cast<uint32_t>((desc >> 32) & 0x3FFFu) << 4;
  return start + static_cast<uint32_t>(mn / 8) * sbo + static_cast<uint32_t>(kb / 16) * lbo +
         static_cast<uint32_t>(mn % 8) * 16 + static_cast<uint32_t>(kb % 16);
}

// Start byte (relative to the stage's K tile) of the B descriptor of Q K^T for key half h, k-step kk:
// the half's 64 tokens are 8 row groups further per group, the k-step 32 bytes = 2 core matrices along K.
template <int D>
TERSOR_HD constexpr int sm90_k_desc_start(int half, int kk) {
  return half * 8 * sm90_k_sbo<D>() + kk * 2 * kSm90KLbo;
}
// Start byte (relative to the stage's V tile) of the B descriptor of P V for output chunk cb (64 channels),
// key half h, k-step kk (32 positions).
TERSOR_HD constexpr int sm90_v_desc_start(int cb, int half, int kk) {
  return cb * 8 * kSm90VSbo + (half * 64 + kk * 32) / 16 * kSm90VLbo;
}

// The descriptors the kernel issues (stage addresses in the shared window).
template <int D>
TERSOR_HD constexpr uint64_t sm90_k_desc(uint32_t k_stage_addr, int half, int kk) {
  return wgmma_smem_desc(k_stage_addr + sm90_k_desc_start<D>(half, kk), kSm90KLbo, sm90_k_sbo<D>());
}
TERSOR_HD constexpr uint64_t sm90_v_desc(uint32_t v_stage_addr, int cb, int half, int kk) {
  return wgmma_smem_desc(v_stage_addr + sm90_v_desc_start(cb, half, kk), kSm90VLbo, kSm90VSbo);
}

// ---- register fragments (PTX ISA 9.7.15.5: wgmma register fragments; each warp w of the warpgroup owns
// rows 16 w .. 16 w + 15 and, inside them, the m16n8 layouts of mma.sync) ----
// Accumulator m64nN (s32 or f32), register i < N / 2: row 16 w + g + 8 ((i >> 1) & 1),
// column 8 (i >> 2) + 2 t + (i & 1).
TERSOR_HD constexpr int wg_acc_row(int w, int g, int i) { return 16 * w + g + 8 * ((i >> 1) & 1); }
TERSOR_HD constexpr int wg_acc_col(int t, int i) { return 8 * (i >> 2) + 2 * t + (i & 1); }
// A from registers, m64nNk32 8-bit: register r (4 bytes, k ascending) holds row 16 w + g + 8 (r & 1),
// k bytes 4 t + 16 (r >> 1) .. +3 -- mma.m16n8k32's A fragment per warp (frag_a_row / frag_k_byte).
TERSOR_HD constexpr int wg_a_row(int w, int g, int r) { return 16 * w + frag_a_row(g, r); }
TERSOR_HD constexpr int wg_a_k(int t, int r, int j) { return frag_k_byte(t, r >> 1) + j; }

// Q A-fragment register r of k-step kk, loaded once from the row-major q_int of the CTA (byte offset from
// the warpgroup's first row).
template <int D>
TERSOR_HD constexpr int sm90_q_frag_offset(int w, int g, int t, int kk, int r) {
  return wg_a_row(w, g, r) * D + kk * 32 + wg_a_k(t, r, 0);
}
// P A-fragment of P V (k-step kk of a 64-key half) from the QK accumulator of the same lane: register r packs
// accumulator registers p_acc_reg(kk, r, 0..3) (two column pairs of n-tiles nt and nt + 1), exactly the
// sm8x rule (p8_frag_ntile / p_frag_elem) with the n-tile stride 4 of the m64nN accumulator.
TERSOR_HD constexpr int sm90_p_acc_reg(int kk, int r, int j) {
  return 4 * (p8_frag_ntile(kk, r) + (j >> 1)) + p_frag_elem(r) + (j & 1);
}

// Scales: one Q scale per lane (rows 16 w + g and + 8 lie in one 32-row block, class g), one K scale per
// lane and key half (columns 8 i + 2 t + {0, 1} of a 64-token tile: group t).
TERSOR_HD constexpr int64_t sm90_q_scale_index(int64_t bh, int64_t len_q_pad, int64_t wg_row0, int w, int g) {
  return q_scale_index(bh, len_q_pad, wg_row0 + 16 * w, g);
}
TERSOR_HD constexpr int sm90_k_scale_in_slice(int tile128, int half, int t) {
  return k_scale_in_slice(2 * tile128 + half, t);
}

}  // namespace tersor::attention
