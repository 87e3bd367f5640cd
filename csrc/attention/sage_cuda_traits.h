// Tile and shared-memory choices of the sm80/sm89 attention kernel (one place, see sage_attn_cuda.cu).
#pragma once

#include "attention/sage_format.h"

namespace tersor::attention {

template <int kHeadDim, bool kFp8>
struct SageAttnSm8xKernelTraits : SageTraitsSm8x {
  static constexpr int kD = kHeadDim;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kDTiles = kD / 8;        // 8-channel n-tiles of the output
  static constexpr int kQKSteps = kD / 32;      // k-steps of m16n8k32 over the head dim
  static constexpr int kVElemBytes = kFp8 ? 1 : 2;
  // Shared rows padded by 16 bytes: consecutive rows start 4 banks apart, so the 8 rows a fragment load
  // touches (g = lane/4) hit different banks; 16 keeps every row 16-byte aligned for cp.async.
  static constexpr int kQKRowBytes = kD + 16;                   // int8 Q and K rows
  static constexpr int kVRowBytes = kCtaK * kVElemBytes + 16;   // V^T rows (one channel, 64 tokens)
  static constexpr int kQBytes = kCtaQ * kQKRowBytes;
  static constexpr int kKBytes = kCtaK * kQKRowBytes;           // per stage
  static constexpr int kVBytes = kD * kVRowBytes;               // per stage
  static constexpr int kStages = 2;                             // cp.async double buffer
  static constexpr int kSmemBytes = kQBytes + kStages * (kKBytes + kVBytes);
};

}  // namespace tersor::attention
