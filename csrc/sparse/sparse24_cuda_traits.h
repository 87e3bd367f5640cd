// Tile and launch choices of the 2:4 family's CUDA kernels, in one place. Plain C++ (no CUDA or torch
// headers) so the CPU replay of the GEMV (sparse24_cuda_emulate.cpp) follows the same plan.
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace tersor::sparse24 {

struct Sparse24GemvTraits {
  // One block per 16-row block of W (the MMA's M); its warps split the K dimension in steps of one
  // k-tile pair (64 dense columns: two mma.sp m16n8k32 sharing one metadata word, selectors 0 and 1),
  // warp w taking steps w, w + kWarps, ...; the 16 x n accumulators are summed in warp order through
  // shared memory, so the result does not depend on scheduling (deterministic split-K). Per step a
  // lane issues two 16-byte value loads (512 coalesced bytes per warp each) and one 4-byte metadata
  // load: 8 warps x 2 steps unrolled keep ~32 KiB in flight per SM, above HBM3's bandwidth-latency
  // product per SM on H100 (~15 KiB).
  static constexpr int kWarps = 8;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kUnroll = 2;
  // Rows of x per launch: one or two n8 MMA tiles; more rows go through the GEMM route.
  static constexpr int kMaxBatch = 16;
};

struct Sparse24GemmTraits {
  // Block tile 128 (W rows) x 128 (rows of x) x 64 (K: one k-tile pair, i.e. one metadata word per lane
  // and 16 rows); 8 warps as 2 (M) x 4 (N), each 64 x 32 = 4 x 4 mma.sp m16n8k32 per k-tile (64 fp32
  // accumulators per thread). 3 cp.async stages of 25 KiB: the values (8 KiB = 9/16 of a dense tile
  // together with the metadata), the metadata (1 KiB) and x (16 KiB) of k-step p + 2 load while step p
  // multiplies.
  static constexpr int kBM = 128, kBN = 128, kBK = 64;
  static constexpr int kWarpsM = 2, kWarpsN = 4, kWarps = kWarpsM * kWarpsN, kThreads = kWarps * 32;
  static constexpr int kMTiles = kBM / kWarpsM / 16;  // m16 tiles per warp
  static constexpr int kNTiles = kBN / kWarpsN / 8;   // n8 tiles per warp
  static constexpr int kStages = 3;
  static constexpr int kRowBlocks = kBM / 16;
  static constexpr int kValueStageBytes = kRowBlocks * 2 * 512;  // two 16x32 tiles per row block
  static constexpr int kMetaStageBytes = kRowBlocks * 32 * 4;
  static constexpr int kXStageBytes = kBN * kBK * 2;
  static constexpr int kStageBytes = kValueStageBytes + kMetaStageBytes + kXStageBytes;
  static constexpr int kSmemBytes = kStages * kStageBytes;
  // Only worth it where the product is compute-bound; fewer rows of x go to the GEMV.
  static constexpr int kMinBatch = 17;
};

// Where 16-byte chunk c (0..7) of row n of a stage's x tile [kBN][kBK] lives (in 16-byte units): the
// chunk index is XOR-swizzled with the row so the 8 row addresses of one ldmatrix phase (8 rows, same
// chunk) fall in 8 different bank groups.
TERSOR_HD constexpr int gemm_x_chunk(int n, int c) { return n * 8 + (c ^ (n & 7)); }

// The x-tile row and chunk lane L addresses in ldmatrix.x4 for the B fragments of n8 tile starting at
// row n0 and k-tile s (0/1) of the stage: matrix L / 8 covers k = 32 s + 8 (L / 8) .. + 7, row L % 8.
TERSOR_HD constexpr int gemm_ldmatrix_row(int n0, int lane) { return n0 + (lane & 7); }
TERSOR_HD constexpr int gemm_ldmatrix_chunk(int s, int lane) { return 4 * s + (lane >> 3); }

struct Sparse24Sm90Traits {
  // Hopper GEMM on wgmma.mma_async.sp m64nNk32 (sm90a): a CTA computes 128 W rows x 256 rows of x. Two
  // consumer warpgroups each own 64 W rows (one wgmma M = 4 row blocks, one per warp: warp w of the
  // warpgroup supplies row block 4 wg + w, exactly the format v1 tile a mma.sp warp loads) and issue two
  // m64n128k32 per k-tile (128 fp32 accumulators per thread). A (W values + metadata) goes through
  // registers, B (x) through a shared-memory descriptor. 4 cp.async stages of 41 KiB (x 32 KiB, values
  // 8 KiB, metadata 1 KiB): stage p + 2 loads while step p multiplies and step p - 1's wgmma may still be
  // in flight (wgmma.wait_group 1), so the stage overwritten is always p - 2's.
  static constexpr int kWarpgroups = 2, kThreads = kWarpgroups * 128;
  static constexpr int kBM = 64 * kWarpgroups, kBN = 256, kBK = 64;
  static constexpr int kInstrN = 128;                // N of one wgmma
  static constexpr int kNInstr = kBN / kInstrN;      // wgmma per k-tile per warpgroup
  static constexpr int kAccPerInstr = kInstrN / 2;   // fp32 accumulators per thread per wgmma
  static constexpr int kStages = 4;
  static constexpr int kRowBlocks = kBM / 16;
  // Stage image: x first (the descriptor's start address must be 16-byte aligned; 1 KiB here), then
  // the two 16 x 32 value tiles of every row block (k-tiles 2p, 2p + 1: 1 KiB contiguous in format v1),
  // then each row block's 32 metadata words.
  static constexpr int kXStageBytes = kBN * kBK * 2;
  static constexpr int kValueStageBytes = kRowBlocks * 2 * 512;
  static constexpr int kMetaStageBytes = kRowBlocks * 32 * 4;
  static constexpr int kXOffset = 0, kValueOffset = kXStageBytes, kMetaOffset = kXStageBytes + kValueStageBytes;
  static constexpr int kStageBytes = kXStageBytes + kValueStageBytes + kMetaStageBytes;
  static constexpr int kSmemBytes = kStages * kStageBytes;
  // x tile in shared memory: K-major, no swizzle. A core matrix is 8 rows of x x 8 k (16 bytes a row,
  // 128 contiguous bytes); the 8 core matrices along k of one 8-row group are adjacent (LBO = 128 bytes),
  // 8-row groups follow each other (SBO = 8 x 128 = 1024 bytes).
  static constexpr int kLBO = 128, kSBO = 1024;
  // Below this many rows of x a 256-row tile is mostly padding: the mma.sp GEMM (128-row tiles) runs.
  static constexpr int kMinBatch = 128;
  // Launch order: consecutive blocks walk kRasterGroupM W tiles for every x tile, then the next group, so
  // a wave of 132 blocks (one per SM) shares 16 W tiles and ~8 x tiles in L2 instead of all W tiles.
  static constexpr int kRasterGroupM = 16;
};
static_assert(Sparse24Sm90Traits::kSmemBytes <= 227 * 1024, "sm90 shared memory per block");
static_assert(Sparse24Sm90Traits::kStages >= 3, "the overwritten stage must be two steps old");

// Launch limits (issue 17): the most rows of x one call takes on each GEMM. The sm80 GEMM puts x tiles on
// gridDim.y (at most 65535); the sm90 GEMM has a 1-D grid of W tiles x x tiles (at most 2^31 - 1 blocks).
// The glue refuses more with a ValueError naming the number (the kernels' offsets are int64 either way).
constexpr int64_t sparse24_gemm_max_rows() { return int64_t{65535} * Sparse24GemmTraits::kBN; }
constexpr int64_t sparse24_sm90_max_rows(int64_t M) {
  const int64_t grid_m = (M / 16 + Sparse24Sm90Traits::kRowBlocks - 1) / Sparse24Sm90Traits::kRowBlocks;
  return grid_m > 0 ? int64_t{0x7fffffff} / grid_m * Sparse24Sm90Traits::kBN : 0;
}
// Blocks of the element-wise compress / decompress kernels (one thread per metadata word / lane of a tile).
constexpr int64_t sparse24_elementwise_blocks(int64_t threads, int block_threads) {
  return (threads + block_threads - 1) / block_threads;
}

struct Sparse24CompressTraits {
  static constexpr int kThreads = 256;  // one lane metadata word (2 rows x 4 chunks) per thread
};

struct Sparse24DecompressTraits {
  static constexpr int kThreads = 256;  // one lane's 8 stored values (4 chunks of two rows) per thread
};

}  // namespace tersor::sparse24
