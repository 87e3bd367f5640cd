// The wgmma shared-memory matrix descriptor (sm90a), host + device: kernels build it, CPU layout checks
// decode it (e.g. attention/sage_sm90_layout.h). Source: PTX ISA 9.7.15.5.1 ("matrix descriptor").
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace tersor {

// The 64-bit shared-memory matrix descriptor wgmma reads a B (or A) operand through. Fields (each byte
// quantity in units of 16 bytes, so every operand must be 16-byte aligned):
//   bits  0-13  start address (shared window)        bits 16-29  leading-dimension byte offset (LBO)
//   bits 32-45  stride-dimension byte offset (SBO)   bits 49-51  base offset (0 for tiles aligned to the
//   swizzle pattern)                                  bits 62-63  swizzle: 0 none, 1 128B, 2 64B, 3 32B
// For K-major operands without swizzle the unit is the "core matrix" (8 rows x 16 bytes, 128 contiguous
// bytes): LBO is the distance between core matrices adjacent along K, SBO between core matrices adjacent
// along M/N (8-row groups). TERSOR_HD so CPU tests can check the packing.
enum class WgmmaSwizzle : uint32_t { kNone = 0, k128B = 1, k64B = 2, k32B = 3 };

TERSOR_HD constexpr uint64_t wgmma_smem_desc(uint32_t smem_addr, uint32_t lbo_bytes, uint32_t sbo_bytes,
                                             WgmmaSwizzle swizzle = WgmmaSwizzle::kNone, uint32_t base_offset = 0) {
  return (static_cast<uint64_t>((smem_addr >> 4) & 0x3FFFu)) |
         (static_cast<uint64_t>((lbo_bytes >> 4) & 0x3FFFu) << 16) |
         (static_cast<uint64_t>((sbo_bytes >> 4) & 0x3FFFu) << 32) |
         (static_cast<uint64_t>(base_offset & 0x7u) << 49) |
         (static_cast<uint64_t>(static_cast<uint32_t>(swizzle) & 0x3u) << 62);
}

// Advancing a descriptor along K by `bytes` (a multiple of 16) only moves the start address: adding to the
// low field is what CUTLASS's DescriptorIterator does too, and it is valid while the tile does not cross
// the 256 KiB shared window (it cannot: a CTA has at most 227 KiB).
TERSOR_HD constexpr uint64_t wgmma_desc_advance(uint64_t desc, uint32_t bytes) {
  return desc + static_cast<uint64_t>(bytes >> 4);
}

}  // namespace tersor
