// PTX wrappers for the Hopper sparse warpgroup MMA (wgmma.mma_async.sp, sm90a), each with why it is used.
// Include only from translation units built for sm90a. Fences, commits and waits: common/wgmma.cuh.
// Source: PTX ISA 9.7.15.6 (wgmma.mma_async.sp), 9.7.15.6.2.1 (fragments of sparse m64nNk32 16-bit).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "common/wgmma.cuh"

namespace tersor {

// D (64 x 128, fp32, accumulated) += A (64 x 32, 2:4 sparse: 64 x 16 stored values + metadata) x B (32 x 128),
// fp16 inputs. Why A from registers: the tersor 2:4 format stores each lane's A registers as 16 contiguous
// bytes (the mma.sp fragment, which is also the wgmma.sp fragment per warp), so a warp fills them with one
// conflict-free 16-byte shared load per lane and no sparse shared-memory layout is needed. Why n128: with
// two per k-tile a warpgroup covers 256 rows of x, and 64 accumulators per instruction keep the whole
// 128-register accumulator set of the tile in registers. The scale-d operand is the immediate 1 (always
// accumulate: the accumulators start at zero), imm-scale-a/b 1 (no negation), imm-trans-b 0: B is K-major
// (x rows, k contiguous). kSelector picks the thread pair of each quad whose metadata is used (0 for
// the even k-tile of a format v1 metadata word, 1 for the odd one), as for mma.sp m16n8k32.
// The wgmma reads a, e and the accumulators asynchronously: the caller keeps them unchanged (and alive,
// wgmma_fence_operand) until wgmma_wait_group says this instruction's group retired.
template <int kSelector>
__device__ __forceinline__ void wgmma_sp_m64n128k32_f16_f32(float d[64], const uint32_t a[4], uint64_t desc_b,
                                                            uint32_t e) {
  static_assert(kSelector == 0 || kSelector == 1, "wgmma.sp m64nNk32 16-bit: sparsity selector is 0 or 1");
  asm volatile(
      "{\n"
      "wgmma.mma_async.sp.sync.aligned.m64n128k32.f32.f16.f16 "
      "{"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "{%64, %65, %66, %67}, %68, %69, %70, 1, 1, 1, 0;\n"
      "}\n"
      :
        "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(e), "n"(kSelector));
}

// The same for bfloat16 inputs (bf16 wgmma accumulates in fp32 only).
template <int kSelector>
__device__ __forceinline__ void wgmma_sp_m64n128k32_bf16_f32(float d[64], const uint32_t a[4], uint64_t desc_b,
                                                             uint32_t e) {
  static_assert(kSelector == 0 || kSelector == 1, "wgmma.sp m64nNk32 16-bit: sparsity selector is 0 or 1");
  asm volatile(
      "{\n"
      "wgmma.mma_async.sp.sync.aligned.m64n128k32.f32.bf16.bf16 "
      "{"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "{%64, %65, %66, %67}, %68, %69, %70, 1, 1, 1, 0;\n"
      "}\n"
      :
        "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(e), "n"(kSelector));
}

// The form for element type T (__half or __nv_bfloat16), for kernels templated on the dtype.
template <typename T, int kSelector>
__device__ __forceinline__ void wgmma_sp_m64n128k32_f32(float d[64], const uint32_t a[4], uint64_t desc_b,
                                                        uint32_t e) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "wgmma.sp: fp16 or bf16 inputs");
  if constexpr (std::is_same_v<T, __half>) {
    wgmma_sp_m64n128k32_f16_f32<kSelector>(d, a, desc_b, e);
  } else {
    wgmma_sp_m64n128k32_bf16_f32<kSelector>(d, a, desc_b, e);
  }
}

}  // namespace tersor
