// Tile and launch choices of the BSR tensor-core kernel, one traits struct per (blocksize, token tile).
// Plain C++ (no CUDA or torch headers) so the CPU replay (bsr_cuda_emulate.cpp) follows the same plan.
#pragma once

#include <cstdint>

namespace tersor::sparse {

// One CTA = one work item (a run of blocks of one block row) x one tile of kTokens tokens. The block's
// bs output rows are split over kWarpsM warps (16 rows = one MMA M each), the tokens over kWarpsN.
template <int BS, int TOKENS>
struct BsrTile {
  static_assert(BS == 16 || BS == 32 || BS == 64, "blocksize must be 16, 32 or 64");
  static constexpr int kBlock = BS;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kWarpsM = BS / 16;
  static constexpr int kWarpsN = kWarps / kWarpsM;
  static constexpr int kTokens = TOKENS;
  static constexpr int kWarpTokens = TOKENS / kWarpsN;
  static constexpr int kNFrags = kWarpTokens / 8;  // n8 MMA fragments per warp
  static_assert(kWarpTokens % 8 == 0 && kNFrags >= 1, "each warp needs whole n8 fragments");
  static_assert(kNFrags == 1 || kNFrags % 2 == 0, "B fragments are loaded in pairs (ldmatrix.x4) or alone (.x2)");
  static constexpr int kK16 = BS / 16;  // MMA k steps per block
  // cp.async pipeline depth: two blocks in flight while one is multiplied (a memory-bound item has only
  // a few blocks, so the loads must overlap from the start).
  static constexpr int kStages = 3;
  static constexpr int kStageElems = BS * BS + TOKENS * BS;  // 16-bit elements
  static constexpr int kSmemBytes = kStages * kStageElems * 2;
};

// Token tiles: the smallest tile that gives each warp one n8 fragment (few tokens: decode), or 64.
constexpr int bsr_small_tokens(int bs) { return 8 * (4 / (bs / 16)); }
constexpr int kBsrLargeTokens = 64;
constexpr int bsr_tile_tokens(int bs, int64_t tokens) {
  return tokens <= bsr_small_tokens(bs) ? bsr_small_tokens(bs) : kBsrLargeTokens;
}
// Split items (+ the partial-sum pass) pay when the weight stream dominates: up to this many tokens.
// Beyond it the token tiles alone give enough CTAs and the fp32 partials would cost real traffic.
constexpr int kBsrSplitMaxTokens = 64;
// Token tiles are the launch's gridDim.y (at most 65535), so one call takes at most this many tokens (the
// glue refuses more with a ValueError naming the number; the kernel's token indices are then int).
constexpr int64_t kBsrMaxTokenTiles = 65535;
constexpr int64_t bsr_cuda_max_tokens() { return kBsrMaxTokenTiles * kBsrLargeTokens; }
constexpr bool bsr_use_split(int64_t tokens) { return tokens <= kBsrSplitMaxTokens; }

// The partial-sum pass: one thread per (row, token, m) output element.
struct BsrReduceTraits {
  static constexpr int kThreads = 256;
};

}  // namespace tersor::sparse
