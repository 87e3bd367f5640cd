// Hopper (sm90a) warpgroup MMA plumbing shared by every family's wgmma kernels: the shared-memory matrix
// descriptor and the fences / group commits around asynchronous wgmma. The instruction wrappers for a
// given type/shape live beside their family (wgmma_sp.cuh, ...) and include this file. Each helper says why.
// Source: PTX ISA 9.7.15 (asynchronous warpgroup-level matrix instructions), "matrix descriptor" section.
#pragma once

#include <cstdint>

#include "common/wgmma_desc.h"

namespace tersor {

// The descriptor packing (wgmma_smem_desc, wgmma_desc_advance) lives in common/wgmma_desc.h: torch- and
// CUDA-free, so CPU layout checks run on the very bits the kernels build.
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
