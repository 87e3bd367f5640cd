// Tile and shared-memory choices of the sm80/sm89 attention kernel (one place, see sage_attn_cuda.cu).
#pragma once

#include "attention/sage_format.h"

namespace tersor::attention {

// kQKBits 8: Q K^T by mma.m16n8k32.s8, 32 channels (bytes) per k-step. kQKBits 4: mma.m16n8k64.s4, 64
// channels per k-step in the same 32 bytes (two nibbles per byte, the even channel in the low nibble), so
// the byte-level fragment addressing and the quantization groups are the same for both widths.
template <int kHeadDim, bool kFp8, int kQKBits = 8>
struct SageAttnSm8xKernelTraits : SageTraitsSm8x {
  static_assert(kQKBits == 8 || kQKBits == 4, "Q K^T is INT8 or INT4");
  static constexpr int kD = kHeadDim;
  static constexpr int kBits = kQKBits;
  // Query rows per warp in the kernel. D = 128: 16 (one m-tile, 8 warps): O is then 64 fp32 per lane instead
  // of 128 and the kernel fits in 255 registers without spilling, at the cost of each K / V fragment being
  // loaded from shared memory by twice as many warps. D = 64: 32 (two m-tiles, 4 warps). The Q scale groups
  // and smoothing blocks stay those of 32-row blocks (kWarpQ, part of the format): a 16-row warp reads the
  // group scales and bias row of its enclosing block, so the numerics do not depend on this choice.
  static constexpr int kWarpRows = kHeadDim == 128 ? 16 : 32;
  static constexpr int kMTiles = kWarpRows / 16;
  static constexpr int kCtaWarps = kCtaQ / kWarpRows;
  static constexpr int kThreads = kCtaWarps * 32;
  static constexpr int kDTiles = kD / 8;        // 8-channel n-tiles of the output
  static constexpr int kQKRowDataBytes = kD * kQKBits / 8;  // one packed Q / K row in global memory
  static constexpr int kQKSteps = kQKRowDataBytes / 32;     // k-steps (32 bytes each) over the head dim
  static constexpr int kVElemBytes = kFp8 ? 1 : 2;
  // Shared rows padded by 16 bytes: consecutive rows start 4 banks apart, so the 8 rows a fragment load
  // touches (g = lane/4) hit different banks; 16 keeps every row 16-byte aligned for cp.async.
  static constexpr int kQKRowBytes = kQKRowDataBytes + 16;      // int8 / packed int4 Q and K rows
  static constexpr int kVRowBytes = kCtaK * kVElemBytes + 16;   // V^T rows (one channel, 64 tokens)
  static constexpr int kQBytes = kCtaQ * kQKRowBytes;
  static constexpr int kKBytes = kCtaK * kQKRowBytes;           // per stage
  static constexpr int kVBytes = kD * kVRowBytes;               // per stage
  static constexpr int kStages = 2;                             // cp.async double buffer
  static constexpr int kSmemBytes = kQBytes + kStages * (kKBytes + kVBytes);
};

}  // namespace tersor::attention
