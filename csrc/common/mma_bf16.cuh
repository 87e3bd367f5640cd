// bf16 twin of mma_m16n8k16_f16_f32 (common/mma.cuh), kept in its own header.
#pragma once

#include <cstdint>

namespace tersor {

// D = A B + C, m16n8k16, bf16 inputs, fp32 accumulators (sm80+): bf16 weights and activations go to
// the tensor cores as they are (no conversion to fp16, which could overflow bf16's range). Fragment
// layout identical to the fp16 form (PTX ISA "Matrix Fragments for mma.m16n8k16").
__device__ __forceinline__ void mma_m16n8k16_bf16_f32(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

}  // namespace tersor
