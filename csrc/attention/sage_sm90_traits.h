// Tile, warp-role and shared-memory choices of the sm90a attention kernel (sage_attn_sm90.cu), in one
// place. Design and the numerics argument: docs/research/sage_attention.md, "sm90a kernel".
#pragma once

#include "attention/sage_format.h"

namespace tersor::attention {

template <int kHeadDim>
struct SageAttnSm90KernelTraits {
  static constexpr int kD = kHeadDim;
  // Warp specialization (FA3): warpgroup 0 only issues bulk copies, warpgroups 1..2 each own 64 query rows
  // (one wgmma m64 tile). Both consumers read the same K/V stage, so a stage is loaded once per 128 rows.
  static constexpr int kConsumerWarpgroups = 2;
  static constexpr int kRowsPerWarpgroup = 64;
  static constexpr int kCtaQ = kConsumerWarpgroups * kRowsPerWarpgroup;  // = SageTraitsSm8x::kCtaQ
  static constexpr int kThreads = (1 + kConsumerWarpgroups) * 128;
  // setmaxnreg: the producer needs almost nothing, the consumers hold O (D/2 fp32), S and P. 128 * 24 +
  // 256 * 240 = 64512 <= the 64K register file with one CTA per SM (__launch_bounds__(384, 1)).
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = 240;
  // Keys per shared-memory stage. The softmax and the two-level P.V accumulation still run per 64-key half,
  // the twin's SageTraitsSm8x::kCtaK tile: the running max is taken at the same points as in the twin, so
  // the kernel meets the same contract (docs, "sm90a kernel").
  static constexpr int kCtaK = 128;
  static constexpr int kHalfK = SageTraitsSm8x::kCtaK;  // 64
  static constexpr int kHalves = kCtaK / kHalfK;
  static constexpr int kStages = 2;
  static constexpr int kQKSteps = kD / 32;          // wgmma k32 steps over the head dim (INT8 bytes)
  static constexpr int kPVSteps = kHalfK / 32;      // wgmma k32 steps over one half's tokens (e4m3 bytes)
  static constexpr int kPVChunks = kD / 64;         // m64n64 output chunks of the head dim
  static constexpr int kAccRegs = 32;               // m64n64: 64 * 64 / 128 threads
  // Tile-native operand layouts (sage_sm90_layout.h): K-major core matrices, no swizzle.
  static constexpr int kKTileBytes = kCtaK * kD;    // int8 K, 128 tokens
  static constexpr int kVTileBytes = kD * kCtaK;    // e4m3 V^T, 128 token positions per channel
  static constexpr int kStageBytes = kKTileBytes + kVTileBytes;
  static constexpr int kBarrierBytes = 2 * kStages * 8;  // full[] and empty[] mbarriers
  static constexpr int kSmemBytes = kStages * kStageBytes + kBarrierBytes;
  static_assert(kD == 64 || kD == 128, "head dim 64 or 128");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory");
};

}  // namespace tersor::attention
