// PTX wrappers for the Hopper (sm90a) warpgroup MMAs of the quantized attention kernel, each with why.
// Shapes m64n64k32 with A from registers (the "RS" form) and B through a shared-memory descriptor
// (common/wgmma.cuh). Fragment layouts: PTX ISA 9.7.15.5 (register fragments of A and of the accumulator),
// the per-warp maps are written out in attention/sage_sm90_layout.h. Include only from sm90a translation
// units (wgmma does not exist elsewhere).
#pragma once

#include <cstdint>

#include "common/wgmma.cuh"

namespace tersor {

// D (+)= A B, m64n64k32, s8 x s8 -> s32, A (Q, 4 x 4 int8 per thread) in registers: INT8 Q K^T on Hopper.
// Q stays in registers for the whole KV loop (loaded once), so no Q tile occupies shared memory and each
// k-step reads only the K tile through the descriptor. Integer accumulation is exact, like mma.sync's.
// accumulate == 0 overwrites d (the first k-step of a tile), else adds.
__device__ __forceinline__ void wgmma_m64n64k32_s32_s8_rs(int32_t d[32], const uint32_t a[4], uint64_t desc_b,
                                                          int accumulate) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k32.s32.s8.s8 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "{%32, %33, %34, %35}, %36, p;\n"
      "}\n"
      :
        "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]),
        "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
        "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]),
        "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]),
        "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]),
        "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]),
        "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]),
        "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate));
}

// D (+)= A B, m64n64k32, e4m3 x e4m3 -> f32, A (P~, 4 x 4 e4m3 per thread) in registers: FP8 P V on Hopper
// (sm90 has no native FP8 mma.sync). P never leaves registers: the QK accumulator of a lane already holds
// the P entries of its A fragment once V^T is stored token-permuted (v_fp8_position_token). The f32
// accumulator keeps only ~22 bits, so callers accumulate one 64-token half from zero (accumulate == 0 on its
// first k-step) and add the result into the true fp32 O (two-level accumulation). Scale-a/b immediates 1.
__device__ __forceinline__ void wgmma_m64n64k32_f32_e4m3_rs(float d[32], const uint32_t a[4], uint64_t desc_b,
                                                            int accumulate) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "{%32, %33, %34, %35}, %36, p, 1, 1;\n"
      "}\n"
      :
        "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]),
        "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]),
        "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]),
        "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate));
}

}  // namespace tersor
