// Tile and launch choices of the codebook family's CUDA kernels, in one place. Plain C++ (no CUDA or
// torch headers) so the CPU replay of the E8P GEMV (e8p_cuda_emulate.cpp) follows the same plan.
#pragma once

#include <cstdint>

namespace tersor::codebook {

struct E8PGemvTraits {
  // One block per 16-row block of W; its warps split the 64-column blocks round-robin (warp w takes
  // J = w, w + kWarps, ...) and their 16 x 8 accumulators are summed in warp order through shared
  // memory, so the result does not depend on scheduling. 8 warps: a 4096-wide row block gives each
  // warp 8 iterations with one 256-byte coalesced word load each, and 512 blocks x 8 warps keep enough
  // loads in flight to cover HBM latency on 132 SMs.
  static constexpr int kWarps = 8;
  static constexpr int kThreads = kWarps * 32;
  // Rows of x per launch: the MMA's N dimension (m16n8k16); more rows go through decode + GEMM.
  static constexpr int kMaxBatch = 8;
};

struct E8PDecodeTraits {
  static constexpr int kThreads = 256;  // one packed word (4 codes, 32 weights) per thread
};

struct AQLMGemvTraits {
  // One warp per output row; lanes stride over the row's 8-column groups.
  static constexpr int kWarps = 8;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kMaxBatch = 8;
  // Codebooks with at most this many entries (in total over all codebooks, fp32 x 8) go to shared
  // memory (2x8: 2 x 256 x 32 B = 16 KiB); larger ones (1x16: 2 MiB) are read through L2.
  static constexpr int64_t kSmemMaxEntries = 1024;
};

// Whether the AQLM GEMV stages the codebooks (`entries` rows of 8 in total over all codebooks) in shared
// memory: the launcher's choice, and the route name _codebook_route reports (codebook_route.h).
constexpr bool aqlm_gemv_uses_smem(int64_t entries) { return entries <= AQLMGemvTraits::kSmemMaxEntries; }

struct AQLMDecodeTraits {
  static constexpr int kThreads = 256;  // one 8-weight group per thread
};

}  // namespace tersor::codebook
