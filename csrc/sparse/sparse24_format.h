// 2:4 semi-structured weight format v1 (docs/formats.md, "2:4 semi-structured"): the layout functions
// shared by the CUDA kernels, the CPU ops and (through the CPU ops) the tests.
//
// A weight W [M, K] (M = out_features, K = in_features) keeps two values out of every 4-wide chunk of a
// row along K. It is stored tile-native for the sparse A operand of mma.sp::ordered_metadata
// .m16n8k32 (16-bit types):
//  * values [M/16, K/32, 256] (float16/bfloat16): one 256-element tile per (16-row block, 32-column
//    k-tile); in a tile, lane l of a warp owns the 8 consecutive elements [8l, 8l+8) in the order of its
//    A fragment registers a0..a7, so a warp loads a whole tile with one coalesced 16-byte load per lane;
//  * meta [M/16, K/64, 32] (int32): one 32-word group per (16-row block, pair of k-tiles); word l is
//    exactly lane l's metadata register `e` for the pair: lanes with threadID_in_group 0/1 describe the
//    even k-tile (sparsity selector 0), lanes 2/3 the odd one (selector 1).
// Every chunk has a 4-bit nibble idx0 | idx1 << 2 with idx0 < idx1 (the order ::ordered_metadata
// requires); a chunk with fewer than two non-zeros keeps explicit zeros at its lowest free positions.
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace tersor::sparse24 {

inline constexpr int kFormatVersion = 1;
inline constexpr int kRowAlign = 16;   // rows of one MMA tile
inline constexpr int kColAlign = 64;   // two m16n8k32 k-tiles share one metadata word per lane
inline constexpr int kTileK = 32;      // dense columns of one k-tile (one mma.m16n8k32)
inline constexpr int kTileElems = 256; // stored values of a 16 x 32 tile (16 x 16 kept)

// Where stored value (row r, compressed column kc) of a 16 x 16 compressed tile lives, following the
// PTX A-fragment rule of m16n8k32 sparse 16-bit MMA (same as dense m16n8k16): lane 4g+q holds
// a0,a1 = (row g, cols 2q, 2q+1), a2,a3 = (row g+8, same cols), a4..a7 = the same with cols + 8.
struct LaneSlot {
  int lane;
  int slot;  // 0..7, the element index inside the lane's 8
};
TERSOR_HD constexpr LaneSlot tile_lane_slot(int r, int kc) {
  return LaneSlot{4 * (r & 7) + ((kc & 7) >> 1), (kc & 1) | ((r >> 3) << 1) | ((kc >> 3) << 2)};
}

// The inverse: which (row, compressed column) of the tile lane `lane`'s element `slot` is.
struct RowCol {
  int r;
  int kc;
};
TERSOR_HD constexpr RowCol tile_row_col(int lane, int slot) {
  return RowCol{(lane >> 2) + 8 * ((slot >> 1) & 1), 2 * (lane & 3) + (slot & 1) + 8 * (slot >> 2)};
}

// Element offset of stored value (row, kc) (kc = compressed column, 0..K/2-1) in `values`.
TERSOR_HD constexpr int64_t value_offset(int64_t K, int64_t row, int64_t kc) {
  const LaneSlot ls = tile_lane_slot(static_cast<int>(row & 15), static_cast<int>(kc & 15));
  return ((row >> 4) * (K / kTileK) + (kc >> 4)) * kTileElems + ls.lane * 8 + ls.slot;
}

// Offset of the first element of tile (row block rb, k-tile kt); the lane's 8 start at + 8 * lane.
TERSOR_HD constexpr int64_t tile_offset(int64_t K, int64_t rb, int64_t kt) {
  return (rb * (K / kTileK) + kt) * kTileElems;
}

// The one padding rule of both 2:4 GEMMs (mma.sp and wgmma.sp): a CTA tile that runs past the weight's last
// row block (M not a multiple of the tile's rows) loads the last valid row block again in its place. Not
// zeros: a zero metadata nibble (idx0 = idx1 = 0) is not an ordered pair, which ::ordered_metadata leaves
// undefined; a copied block has valid metadata, and its rows only reach outputs the epilogue masks.
TERSOR_HD constexpr int64_t gemm_stage_row_block(int64_t rb, int64_t row_blocks) {
  return rb < row_blocks ? rb : row_blocks - 1;
}

// Where the nibble of (row, dense chunk ch) (ch = k / 4) lives in `meta`: word index and bit shift.
// PTX metadata rule for m16n8k32 16-bit: with selector s, lanes 4g+2s and 4g+2s+1 supply it; the first
// of the pair covers chunks 0..3 of the k-tile, the second chunks 4..7; bits [15:0] are row g and bits
// [31:16] row g+8, one nibble per chunk, lowest chunk in the lowest bits.
struct MetaPos {
  int64_t word;
  int shift;
};
TERSOR_HD constexpr int meta_lane(int r, int chunk_in_pair) {
  // chunk_in_pair: 0..15 over the two k-tiles of the pair (8 chunks each)
  return 4 * (r & 7) + 2 * (chunk_in_pair >> 3) + ((chunk_in_pair >> 2) & 1);
}
TERSOR_HD constexpr int meta_shift(int r, int chunk_in_pair) { return 16 * ((r >> 3) & 1) + 4 * (chunk_in_pair & 3); }
TERSOR_HD constexpr MetaPos meta_pos(int64_t K, int64_t row, int64_t ch) {
  const int r = static_cast<int>(row & 15), c = static_cast<int>(ch & 15);
  return MetaPos{((row >> 4) * (K / kColAlign) + (ch >> 4)) * 32 + meta_lane(r, c), meta_shift(r, c)};
}

// The nibble of two kept positions (idx0 < idx1, both in 0..3).
TERSOR_HD constexpr uint32_t encode_nibble(int idx0, int idx1) { return static_cast<uint32_t>(idx0 | (idx1 << 2)); }
TERSOR_HD constexpr int nibble_idx0(uint32_t nib) { return static_cast<int>(nib & 3u); }
TERSOR_HD constexpr int nibble_idx1(uint32_t nib) { return static_cast<int>((nib >> 2) & 3u); }
// Valid for ::ordered_metadata: two distinct indices in ascending order (0b0100, 0b1000, 0b1001,
// 0b1100, 0b1101, 0b1110).
TERSOR_HD constexpr bool nibble_valid(uint32_t nib) { return nibble_idx0(nib) < nibble_idx1(nib); }

// The kept positions of a chunk given which of its 4 entries are non-zero (bit i = entry i), or -1 when
// more than two are (not 2:4). Fewer than two: the lowest free positions fill up (deterministic).
TERSOR_HD constexpr int chunk_nibble_from_mask(uint32_t nonzero_mask) {
  int n = 0;
  for (int i = 0; i < 4; ++i) n += (nonzero_mask >> i) & 1u;
  if (n > 2) return -1;
  uint32_t keep = nonzero_mask;
  for (int i = 0; i < 4 && n < 2; ++i)
    if (!((keep >> i) & 1u)) {
      keep |= 1u << i;
      ++n;
    }
  int idx0 = -1, idx1 = -1;  // scalars, not an indexed array: stays in registers on the GPU
  for (int i = 0; i < 4; ++i)
    if ((keep >> i) & 1u) {
      if (idx0 < 0)
        idx0 = i;
      else
        idx1 = i;
    }
  return static_cast<int>(encode_nibble(idx0, idx1));
}

}  // namespace tersor::sparse24
