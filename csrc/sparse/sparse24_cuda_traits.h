// Tile and launch choices of the 2:4 family's CUDA kernels, in one place. Plain C++ (no CUDA or torch
// headers) so the CPU replay of the GEMV (sparse24_cuda_emulate.cpp) follows the same plan.
#pragma once

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

struct Sparse24CompressTraits {
  static constexpr int kThreads = 256;  // one lane metadata word (2 rows x 4 chunks) per thread
};

struct Sparse24DecompressTraits {
  static constexpr int kThreads = 256;  // one lane's 8 stored values (4 chunks of two rows) per thread
};

}  // namespace tersor::sparse24
