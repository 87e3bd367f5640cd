// Block-sparse (BSR) weights: the schedule layout, the shared-memory swizzle and the tensor-core
// fragment maps, as small functions shared by the CUDA kernel (bsr_cuda_kernel.cuh), the CPU op
// (bsr_cpu.cpp) and the CPU replay of the kernel (bsr_cuda_emulate.cpp), so a layout bug shows up in
// CPU tests. Format (docs/formats.md, "BSR v1"): W [N, K] in blocks of bs x bs (bs in {16, 32, 64});
// crow_indices int32 [Mb + 1], col_indices int32 [nnzb], values [nnzb, bs, bs] (row-major blocks),
// schedule int32 (below). No torch or CUDA headers.
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace tersor::sparse {

constexpr int kBsrFormatVersion = 1;

constexpr TERSOR_HD bool bsr_valid_blocksize(int64_t bs) { return bs == 16 || bs == 32 || bs == 64; }

// ---- schedule ----
// One int32 tensor: [row items: Mb x 4][split items: S x 4][partial_ptr: Mb + 1].
// An item is (block_row, first block, end block, slot): one CTA (per token tile) multiplies blocks
// [first, end) of block_row. slot < 0: the item covers its whole row and writes y directly (bias added,
// rounded once). slot >= 0: it writes an fp32 partial sum to scratch slot `slot`; a second pass adds a
// row's partials in slot order (partial_ptr[r] .. partial_ptr[r+1]), so results are deterministic.
// Row items: every block row once, longest first (many tokens: parallelism comes from token tiles, and
// the long rows start first). Split items: rows cut into chunks of at most `chunk_blocks` blocks (few
// tokens: the weight stream is what costs, and it is spread evenly over the SMs).
constexpr int kItemInts = 4;
enum BsrItemField : int { kItemRow = 0, kItemBegin = 1, kItemEnd = 2, kItemSlot = 3 };

constexpr TERSOR_HD int64_t bsr_schedule_numel(int64_t mb, int64_t n_split) {
  return kItemInts * (mb + n_split) + mb + 1;
}
// S from the schedule's length, or -1 when the length fits no S.
constexpr TERSOR_HD int64_t bsr_split_items_from_numel(int64_t numel, int64_t mb) {
  const int64_t rest = numel - (kItemInts * mb + mb + 1);
  return (rest < 0 || rest % kItemInts != 0) ? -1 : rest / kItemInts;
}
constexpr TERSOR_HD int64_t bsr_row_items_offset(int64_t /*mb*/) { return 0; }
constexpr TERSOR_HD int64_t bsr_split_items_offset(int64_t mb) { return kItemInts * mb; }
constexpr TERSOR_HD int64_t bsr_partial_ptr_offset(int64_t mb, int64_t n_split) {
  return kItemInts * (mb + n_split);
}
// Default chunk: 32 KiB of 16-bit weights per split item (4 blocks of 64, 16 of 32, 64 of 16), enough
// to amortise a CTA's start-up and its pipeline fill, small enough that a 10%-dense 8192^2 weight makes
// ~3 items per SM on a 132-SM GPU.
constexpr TERSOR_HD int64_t bsr_default_chunk_blocks(int64_t bs) { return 16384 / (bs * bs); }
// Split scratch entry (fp32) of partial slot `slot`, token t, row m of the block.
// ---- 64-bit global offsets of the kernel's loads and stores (issue 17) ----
// values holds more than 2^31 elements from nnzb = 2^31 / bs^2 on (2^19 blocks of 64 x 64), and x and y
// are [tokens, features]: every product here is int64 (tested at sizes past 2^31 through
// tersor_testing::_bsr_index). The small in-block terms (row * bs, chunk * 8) stay int.
// Element offset of row r of value block j.
constexpr TERSOR_HD int64_t bsr_value_offset(int64_t j, int bs, int r) { return (j * bs + r) * bs; }
// Element offset of x[token, col_block * bs] in x [tokens, in_features].
constexpr TERSOR_HD int64_t bsr_x_offset(int64_t token, int64_t in_features, int64_t col_block, int bs) {
  return token * in_features + col_block * bs;
}
// Element offset of y[token, row * bs + m] in y [tokens, out_features].
constexpr TERSOR_HD int64_t bsr_y_offset(int64_t token, int64_t out_features, int64_t row, int bs, int m) {
  return token * out_features + row * bs + m;
}
constexpr TERSOR_HD int64_t bsr_partial_index(int64_t slot, int64_t t, int64_t m, int64_t tokens, int64_t bs) {
  return (slot * tokens + t) * bs + m;
}

// ---- shared-memory tiles ----
// A stage holds one weight block [bs rows][bs k] and the x tile [tokens][bs k], both 16-bit, rows of
// bs / 8 16-byte chunks. ldmatrix reads 8 rows at one chunk column; without a swizzle those rows share
// banks (a 128-byte row is a full bank cycle). Chunk c of row r is stored at chunk c ^ phase(r), where
// phase advances once per 128 bytes of rows, so any 8 consecutive rows at one logical chunk hit 8
// different 16-byte bank groups (bs = 64: 1 row per 128 B; 32: 2; 16: 4).
constexpr TERSOR_HD int bsr_chunks_per_row(int bs) { return bs / 8; }
constexpr TERSOR_HD int bsr_smem_chunk(int bs, int row, int chunk) {
  const int cpr = bsr_chunks_per_row(bs);
  const int phase = (row * cpr / 8) % cpr;
  return row * cpr + (chunk ^ phase);
}
// cp.async copy assignment: copy number c of a tile with `rows` rows moves 16 bytes of row c / cpr,
// chunk c % cpr (consecutive threads read consecutive 16-byte pieces of global memory: coalesced).
constexpr TERSOR_HD int bsr_copy_row(int bs, int c) { return c / bsr_chunks_per_row(bs); }
constexpr TERSOR_HD int bsr_copy_chunk(int bs, int c) { return c % bsr_chunks_per_row(bs); }

// ---- mma.m16n8k16 operands (PTX ISA "Matrix Fragments for mma.m16n8k16", 16-bit types) ----
// A = weight rows (output features) x k, row-major in smem: ldmatrix.x4, lane l gives the address of
// row (l % 16) at k chunk 2 * k16 + l / 16 (matrices: rows 0-7/k 0-7, rows 8-15/k 0-7, rows 0-7/k 8-15,
// rows 8-15/k 8-15 = a0..a3).
constexpr TERSOR_HD int bsr_a_ld_row(int lane) { return lane % 16; }
constexpr TERSOR_HD int bsr_a_ld_chunk(int lane, int k16) { return 2 * k16 + lane / 16; }
// B = k x tokens; x is stored [token][k] which is B "col" layout, so plain ldmatrix (no .trans) gives
// B fragments. ldmatrix.x4 loads two n8 fragments: lane l addresses token (l % 8) + 8 * (l / 16) at k
// chunk 2 * k16 + (l / 8) % 2 (matrices: n0-7/k0-7 = b0, n0-7/k8-15 = b1 of fragment 0, then fragment 1).
// .x2 (one fragment) uses lanes 0-15 of the same map.
constexpr TERSOR_HD int bsr_b_ld_token(int lane) { return lane % 8 + 8 * (lane / 16); }
constexpr TERSOR_HD int bsr_b_ld_chunk(int lane, int k16) { return 2 * k16 + (lane / 8) % 2; }
// ldmatrix: of 8x8 matrix i (row j addressed by lane 8 i + j), lane l receives row l / 4, columns
// 2 (l % 4) and 2 (l % 4) + 1.
constexpr TERSOR_HD int ldmatrix_recv_row(int lane) { return lane / 4; }
constexpr TERSOR_HD int ldmatrix_recv_col(int lane) { return 2 * (lane % 4); }
// Accumulator element e (0..3) of lane l: tile row l / 4 + 8 (e / 2), column 2 (l % 4) + e % 2.
constexpr TERSOR_HD int mma_c_row(int lane, int e) { return lane / 4 + 8 * (e / 2); }
constexpr TERSOR_HD int mma_c_col(int lane, int e) { return 2 * (lane % 4) + e % 2; }
// A register r (fp16x2/bf16x2): row l / 4 + 8 (r % 2), k 2 (l % 4) + 8 (r / 2) (+1 for the high half).
constexpr TERSOR_HD int mma_a_row(int lane, int r) { return lane / 4 + 8 * (r % 2); }
constexpr TERSOR_HD int mma_a_k(int lane, int r) { return 2 * (lane % 4) + 8 * (r / 2); }
// B register r: k 2 (l % 4) + 8 r (+1 for the high half), column (token) l / 4.
constexpr TERSOR_HD int mma_b_k(int lane, int r) { return 2 * (lane % 4) + 8 * r; }
constexpr TERSOR_HD int mma_b_col(int lane) { return lane / 4; }

}  // namespace tersor::sparse
