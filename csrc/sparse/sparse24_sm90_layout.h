// Addressing of the sm90a 2:4 GEMM (sparse24_wgmma_sm90.cu), shared by the kernel and its CPU replay
// (sparse24_cuda_emulate.cpp). Plain C++ with TERSOR_HD: no CUDA header.
//
// Why format v1 feeds wgmma.sp unchanged (docs/research/sparse24.md, "wgmma.sp"): for 16-bit types each
// warp of the warpgroup supplies 16 rows of the 64-row A operand (warp w % 4 -> rows 16 w .. 16 w + 15),
// its A registers a0..a7 follow the same per-warp rule as mma.sp m16n8k32 and its metadata register has
// the same lane/bit layout and the same thread-pair selector (PTX ISA 9.7.15.6.2.1, Figure 176 is the
// mma.sp m16n8k32 f16/bf16 metadata figure). So warp w loads the format v1 tile of row block 4 wg + w
// (8 values per lane, one 16-byte load) and the pair's metadata word, as the mma.sp kernels do.
#pragma once

#include <cstdint>

#include "common/macros.h"
#include "sparse/sparse24_cuda_traits.h"

namespace tersor::sparse24 {

// ---- which output tile block `bid` (1-D grid) computes ----
struct TileCoord {
  int64_t tm;  // W tile: row blocks kRowBlocks tm ..
  int64_t tn;  // x tile: rows kBN tn ..
};
// Grouped launch order (Sparse24Sm90Traits::kRasterGroupM): a bijection of [0, grid_m grid_n) onto the tiles.
TERSOR_HD constexpr TileCoord sm90_block_tile(int64_t bid, int64_t grid_m, int64_t grid_n) {
  constexpr int64_t kGroup = Sparse24Sm90Traits::kRasterGroupM;
  const int64_t per_group = kGroup * grid_n, first_m = (bid / per_group) * kGroup, r = bid % per_group;
  const int64_t rows = grid_m - first_m < kGroup ? grid_m - first_m : kGroup;
  return TileCoord{first_m + r % rows, r / rows};
}

// ---- the writer: where the copy puts x[n0 + n][64 p + k] (n < kBN, k < kBK) in a stage's x tile ----

// The 16-byte chunk copy number c (0 .. kBN * 8 - 1) of a stage moves row n, chunk ch (k = 8 ch .. + 7).
// Rows run fastest inside groups of 8 so that 8 consecutive threads fill one 128-byte core matrix
// (conflict-free shared stores) while a warp still reads 4 whole 16-byte chunks = 64 contiguous bytes
// of each of 8 rows of x (full 32-byte sectors).
struct XChunk {
  int n;
  int ch;
};
TERSOR_HD constexpr XChunk sm90_x_chunk(int c) { return XChunk{(c & 7) + 8 * (c >> 6), (c >> 3) & 7}; }

// Byte offset of element (n, k) in the x tile, from the store's point of view: core matrix (n / 8, k / 8)
// is 128 contiguous bytes at 1024 (n / 8) + 128 (k / 8); inside it row n % 8 is 16 bytes.
TERSOR_HD constexpr int sm90_x_store_offset(int n, int k) {
  return (n >> 3) * (8 * 128) + (k >> 3) * 128 + (n & 7) * 16 + (k & 7) * 2;
}

// ---- the reader: what wgmma reads through the B descriptor ----

// The descriptor fields (bytes; the kernel packs them with wgmma_smem_desc, no swizzle) of the B operand
// of k-tile `sel` (0/1: dense columns 32 sel .. + 31 of the stage) and wgmma number `ni` (x rows
// kInstrN ni .. + kInstrN - 1), relative to the stage's x tile.
struct DescFields {
  uint32_t start;
  uint32_t lbo;
  uint32_t sbo;
};
TERSOR_HD constexpr DescFields sm90_b_desc_fields(int sel, int ni) {
  using S = Sparse24Sm90Traits;
  return DescFields{static_cast<uint32_t>(ni * (S::kInstrN / 8) * S::kSBO + sel * (32 / 8) * S::kLBO),
                    static_cast<uint32_t>(S::kLBO), static_cast<uint32_t>(S::kSBO)};
}

// Byte offset wgmma reads B element (n, k) (n < N of the instruction, k < 32) from, for a K-major operand
// without swizzle, written from the PTX canonical layout ((8, m), (T, 2k)) : ((1T, SBO), (1, LBO)) in
// units of elements (T = 8 16-bit elements per 16-byte core-matrix row): row n % 8 of a core matrix at
// T elements, 8-row group n / 8 at SBO, element k % T at 1, core matrix k / T at LBO.
TERSOR_HD constexpr uint32_t sm90_b_read_offset(DescFields d, int n, int k) {
  constexpr int T = 8;
  return d.start + static_cast<uint32_t>((n % 8) * T * 2 + (n / 8) * static_cast<int>(d.sbo) + (k % T) * 2 +
                                         (k / T) * static_cast<int>(d.lbo));
}

// ---- W values and metadata in a stage ----

// Byte offset (in the stage's value area) of lane `lane`'s 8 values of k-tile `sel` of local row block
// `rbl` (0 .. kRowBlocks - 1): format v1 order, two k-tiles of a row block 1 KiB contiguous.
TERSOR_HD constexpr int sm90_value_offset(int rbl, int sel, int lane) { return (rbl * 2 + sel) * 512 + lane * 16; }
// Word index (in the stage's metadata area) of lane `lane`'s metadata word for local row block `rbl`.
TERSOR_HD constexpr int sm90_meta_word(int rbl, int lane) { return rbl * 32 + lane; }
// The row block warp `warp` (0..3) of warpgroup `wg` supplies to the wgmma's 64-row A (PTX: warp % 4 = w
// gives rows 16 w .. 16 w + 15).
TERSOR_HD constexpr int sm90_warp_row_block(int wg, int warp) { return 4 * wg + warp; }

// ---- the accumulator (D) fragment of m64nNk32 f32: d[i] of lane (g, q) in warp w ----
struct DPos {
  int m;  // row of the wgmma's 64 (W row)
  int n;  // column (row of x)
};
TERSOR_HD constexpr DPos sm90_d_pos(int warp, int lane, int i) {
  return DPos{16 * warp + (lane >> 2) + 8 * ((i >> 1) & 1), 8 * (i >> 2) + 2 * (lane & 3) + (i & 1)};
}

}  // namespace tersor::sparse24
