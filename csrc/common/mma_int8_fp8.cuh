// PTX wrappers for the 8-bit tensor-core MMAs and fp8 conversions of the quantized attention kernels,
// each with why it is used. Fragment layouts: PTX ISA "Matrix Fragments for mma.m16n8k32" (the .s8 and
// .e4m3 layouts are identical: 4 consecutive k per 32-bit register).
#pragma once

#include <cstdint>

namespace tersor {

// D = A B + C, m16n8k32, s8 x s8 -> s32 (sm80+). INT8 Q K^T: twice the FP16 MMA rate on sm80/sm89 and
// exact integer accumulation, so the only QK error is the quantization itself.
__device__ __forceinline__ void mma_m16n8k32_s8_s32(int32_t c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// D = A B + C, m16n8k64, s4 x s4 -> s32 (sm80 / sm89; Hopper has no INT4 tensor cores, the sm90a build
// never launches it). INT4 Q K^T: twice the INT8 rate. The fragments are the s8 ones at the byte level (PTX
// ISA "Matrix Fragments for mma.m16n8k64": a register holds 8 consecutive k, the lower k in the lower
// nibble), so the INT8 kernel's addressing serves both; the s32 accumulation stays exact.
__device__ __forceinline__ void mma_m16n8k64_s4_s32(int32_t c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
// acc += (A B with a zero accumulator), m16n8k32, e4m3 x e4m3 -> f32 (sm89; emulated through FP16 on
// sm90, which uses wgmma). The MMA's own f32 accumulator keeps only ~22 significant bits, so it is never
// carried across calls: each 32-token partial product starts from 0 and is added into the true fp32
// accumulator on the CUDA cores (two-level accumulation). The adds sit in the same asm block so the
// partials stay 4 scoped registers (issued separately, ptxas hoisted all MMAs of a tile and spilled).
__device__ __forceinline__ void mma_m16n8k32_e4m3_add_f32(float acc[4], const uint32_t a[4], uint32_t b0,
                                                          uint32_t b1) {
  asm volatile(
      "{\n"
      ".reg .f32 p<4>;\n"
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {p0, p1, p2, p3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %10, %10, %10};\n"
      "add.f32 %0, %0, p0;\n"
      "add.f32 %1, %1, p1;\n"
      "add.f32 %2, %2, p2;\n"
      "add.f32 %3, %3, p3;\n"
      "}\n"
      : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(0.f));
}

// Two floats -> two e4m3 in one 16-bit value, lo in bits 0..7 (RNE, satfinite). The hardware conversion
// is what tersor::attention::float_to_e4m3 reproduces on the CPU.
__device__ __forceinline__ uint16_t cvt_e4m3x2(float lo, float hi) {
  uint16_t d;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;\n" : "=h"(d) : "f"(hi), "f"(lo));
  return d;
}

// Two e4m3 -> f16x2 (exact): to sum the rounded P exactly as the MMA sees it.
__device__ __forceinline__ uint32_t cvt_f16x2_from_e4m3x2(uint16_t x) {
  uint32_t d;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;\n" : "=r"(d) : "h"(x));
  return d;
}
#endif

// 2^x, the MUFU instruction (<= 2 ulp, flushes denormals): softmax is computed in base 2 so each element
// costs one ex2 and no multiply; ex2(-inf) = +0 handles masked scores.
__device__ __forceinline__ float ex2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

}  // namespace tersor
