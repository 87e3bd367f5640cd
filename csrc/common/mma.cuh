// PTX wrappers for tensor-core and packed-half instructions, each with why it is used.
#pragma once

#include <cstdint>

namespace tersor {

// D = A B + C, m16n8k16, fp16 inputs, fp32 accumulators (sm80+). Used by GEMV-shaped kernels whose
// weight tile is decoded in registers straight into the A fragment layout: no shared-memory round
// trip, and the 8-wide N dimension carries up to 8 rows of x for free (a batch-1 GEMV wastes 7/8 of
// the MMA, which is cheap next to the memory traffic it replaces). Fragment layout: PTX ISA
// "Matrix Fragments for mma.m16n8k16 with floating point type".
__device__ __forceinline__ void mma_m16n8k16_f16_f32(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The bf16 form (sm80+): bf16 weights/activations go to the tensor cores as they are (converting them to
// fp16 could overflow fp16's range). Same fragment layout as the fp16 form.
__device__ __forceinline__ void mma_m16n8k16_bf16_f32(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two fp16 subtractions on raw half2 bit patterns. Why PTX and not __hsub2: the operands are built
// with integer bit tricks, and this keeps them in 32-bit registers without type punning.
__device__ __forceinline__ uint32_t sub_f16x2(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("sub.rn.f16x2 %0, %1, %2;\n" : "=r"(d) : "r"(a), "r"(b));
  return d;
}

// 64-bit load through the read-only (non-coherent) path: weights are read once per launch and never
// written, so they need no L1 coherence and should not evict x from L1.
__device__ __forceinline__ uint64_t ldg_nc_u64(const void* p) {
  uint64_t v;
  asm volatile("ld.global.nc.L1::no_allocate.u64 %0, [%1];\n" : "=l"(v) : "l"(p));
  return v;
}

}  // namespace tersor
