// Hopper (sm90) bulk-copy engine and mbarrier plumbing shared by every family: a producer issues
// cp.async.bulk copies that complete on an mbarrier's transaction count, consumers wait on its phase.
// Each helper says why. Source: PTX ISA 9.7.9.25 (cp.async.bulk) and 9.7.13.15 (mbarrier).
#pragma once

#include <cstdint>

#include "common/smem_load.cuh"  // smem_u32

namespace tersor {

// Include only from translation units built for sm90+ (the bulk-copy engine and mbarrier tx counts).
// One arrival count per expected arriving thread; the copy engine's bytes are counted separately
// (expect_tx). Followed by a CTA barrier (and fence_mbarrier_init for cluster use) before first use.
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(arrivals) : "memory");
}

// Makes the mbarrier initialisation visible to the async proxy (the copy engine) before it signals it.
__device__ __forceinline__ void fence_mbarrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// The producer's arrival that also announces how many bytes the copies of this phase will deliver: the
// phase completes only when both the arrivals and the bytes are in, so consumers never see a partial tile.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes)
               : "memory");
}

// A plain arrival: consumers use it to hand a drained stage back to the producer.
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}

// Spins until the phase with parity `phase` (0/1, flipping each time the barrier completes) is done.
// try_wait (not test_wait) lets the hardware suspend the thread for a while instead of a hot spin.
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t phase) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n"
      "}\n" ::"r"(smem_u32(bar)),
      "r"(phase)
      : "memory");
}

// Global -> shared copy of `bytes` contiguous bytes (a multiple of 16, both addresses 16-byte aligned) by
// the bulk-copy engine: one thread issues a whole tile, no registers or per-thread address math, and the
// completion lands on `bar` as transaction bytes. Tiles that are contiguous in global memory (tersor's
// tile-native formats) need no tensor map.
__device__ __forceinline__ void bulk_copy_g2s(void* smem_dst, const void* gmem_src, uint32_t bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                   smem_u32(smem_dst)),
               "l"(gmem_src), "r"(bytes), "r"(smem_u32(bar))
               : "memory");
}
}  // namespace tersor
