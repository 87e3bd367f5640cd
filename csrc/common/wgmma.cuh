// Hopper (sm90a) warpgroup MMA plumbing shared by every family's wgmma kernels: the shared-memory matrix
// descriptor and the fences / group commits around asynchronous wgmma. The instruction wrappers for a
// given type/shape live beside their family (wgmma_sp.cuh, ...) and include this file. Each helper says why.
// Source: PTX ISA 9.7.15 (asynchronous warpgroup-level matrix instructions), "matrix descriptor" section.
#pragma once

#include <cstdint>

namespace tersor {

// The 64-bit shared-memory matrix descriptor wgmma reads a B (or A) operand through. Fields (each byte
// quantity in units of 16 bytes, so every operand must be 16-byte aligned):
//   bits  0-13  start address (shared window)        bits 16-29  leading-dimension byte offset (LBO)
//   bits 32-45  stride-dimension byte offset (SBO)   bits 49-51  base offset (0 for tiles aligned to the
//   swizzle pattern)                                  bits 62-63  swizzle: 0 none, 1 128B, 2 64B, 3 32B
// For K-major operands without swizzle the unit is the "core matrix" (8 rows x 16 bytes, 128 contiguous
// bytes): LBO is the distance between core matrices adjacent along K, SBO between core matrices adjacent
// along M/N (8-row groups). __host__ __device__ so CPU tests can check the packing.
enum class WgmmaSwizzle : uint32_t { kNone = 0, k128B = 1, k64B = 2, k32B = 3 };

__host__ __device__ constexpr uint64_t wgmma_smem_desc(uint32_t smem_addr, uint32_t lbo_bytes, uint32_t sbo_bytes,
                                                       WgmmaSwizzle swizzle = WgmmaSwizzle::kNone,
                                                       uint32_t base_offset = 0) {
  return (static_cast<uint64_t>((smem_addr >> 4) & 0x3FFFu)) |
         (static_cast<uint64_t>((lbo_bytes >> 4) & 0x3FFFu) << 16) |
         (static_cast<uint64_t>((sbo_bytes >> 4) & 0x3FFFu) << 32) |
         (static_cast<uint64_t>(base_offset & 0x7u) << 49) |
         (static_cast<uint64_t>(static_cast<uint32_t>(swizzle) & 0x3u) << 62);
}

// Advancing a descriptor along K by `bytes` (a multiple of 16) only moves the start address: adding to the
// low field is what CUTLASS's DescriptorIterator does too, and it is valid while the tile does not cross
// the 256 KiB shared window (it cannot: a CTA has at most 227 KiB).
__host__ __device__ constexpr uint64_t wgmma_desc_advance(uint64_t desc, uint32_t bytes) {
  return desc + static_cast<uint64_t>(bytes >> 4);
}

// Include only from translation units built for sm90a (wgmma does not exist elsewhere).
// Orders this warpgroup's earlier register writes (accumulators, A fragments) before the next wgmma reads
// them: required before the first wgmma of a batch and whenever registers an in-flight wgmma uses change.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }

// Closes the batch of wgmma issued since the last commit into one group that wgmma_wait can track.
__device__ __forceinline__ void wgmma_commit_group() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }

// Waits until at most kPending committed wgmma groups are in flight. Accumulator registers of a group are
// undefined to read until it retires, so the epilogue (or softmax) waits with kPending = 0; a pipeline
// that overlaps the next MMA with this one's consumer waits with 1.
template <int kPending>
__device__ __forceinline__ void wgmma_wait_group() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}

// Shared memory written by ordinary stores (st.shared, stmatrix) is read by wgmma through the async proxy:
// each writing thread fences before the barrier that publishes the tile (PTX ISA memory consistency
// model, proxies).
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// Keeps the compiler from moving accumulator reads/writes across an in-flight wgmma: wgmma writes its
// accumulator registers asynchronously, which "+f" constraints alone do not express.
__device__ __forceinline__ void wgmma_fence_operand(float& r) { asm volatile("" : "+f"(r)::"memory"); }
__device__ __forceinline__ void wgmma_fence_operand(uint32_t& r) { asm volatile("" : "+r"(r)::"memory"); }
__device__ __forceinline__ void wgmma_fence_operand(int32_t& r) { asm volatile("" : "+r"(r)::"memory"); }

// Warp-specialized kernels (FA3): a producer warpgroup that only issues bulk copies gives registers back and
// the MMA warpgroups take them, so one CTA of 3 warpgroups fits O, S and P in registers. Takes effect only
// under a register cap at entry (__launch_bounds__(threads, 1)) and when each warpgroup's role is one branch
// of an if/else; otherwise ptxas ignores it and says so (warning C7508). kRegs: multiple of 8 in [24, 256].
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
  static_assert(kRegs % 8 == 0 && kRegs >= 24 && kRegs <= 256, "setmaxnreg range");
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
  static_assert(kRegs % 8 == 0 && kRegs >= 24 && kRegs <= 256, "setmaxnreg range");
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
}  // namespace tersor
