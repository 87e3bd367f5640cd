// PTX wrappers for the sparse tensor-core MMA (2:4 structured sparse A operand), each with why it is used.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace tersor {

// D = A B + C, m16n8k32 with A 2:4 sparse (16 x 16 stored values + metadata `e`), 16-bit inputs, fp32
// accumulators (sm80+; runs on sm89/sm90 too). Why ::ordered_metadata: the PTX ISA warns that plain
// mma.sp may be substantially slower on some targets; it requires idx0 < idx1 in every nibble, which
// the tersor 2:4 format guarantees. kSelector (an immediate, 0 or 1 for this shape) picks which thread
// pair of each quad supplies the metadata: the format packs two k-tiles' metadata into one word per
// lane, selector 0 for the even k-tile and 1 for the odd one. Fragment layouts: PTX ISA 9.7.14.6.2.
template <int kSelector>
__device__ __forceinline__ void mma_sp_m16n8k32_f16_f32(float c[4], const uint32_t a[4], const uint32_t b[4],
                                                        uint32_t e) {
  static_assert(kSelector == 0 || kSelector == 1, "m16n8k32 16-bit: sparsity selector is 0 or 1");
  asm volatile(
      "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, %13;\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e),
        "n"(kSelector));
}

// The same for bfloat16 inputs.
template <int kSelector>
__device__ __forceinline__ void mma_sp_m16n8k32_bf16_f32(float c[4], const uint32_t a[4], const uint32_t b[4],
                                                         uint32_t e) {
  static_assert(kSelector == 0 || kSelector == 1, "m16n8k32 16-bit: sparsity selector is 0 or 1");
  asm volatile(
      "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, %13;\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e),
        "n"(kSelector));
}

// The form for element type T (__half or __nv_bfloat16), for kernels templated on the dtype.
template <typename T, int kSelector>
__device__ __forceinline__ void mma_sp_m16n8k32_f32(float c[4], const uint32_t a[4], const uint32_t b[4], uint32_t e) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "mma.sp: fp16 or bf16 inputs");
  if constexpr (std::is_same_v<T, __half>) {
    mma_sp_m16n8k32_f16_f32<kSelector>(c, a, b, e);
  } else {
    mma_sp_m16n8k32_bf16_f32<kSelector>(c, a, b, e);
  }
}

// 128-bit load through the read-only path without L1 allocation: each stored weight byte is read once
// per launch (streamed), so keeping it out of L1 leaves L1 to x, which every block re-reads.
__device__ __forceinline__ uint4 ldg_stream_u128(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// 32-bit streamed load (the metadata word), same reasoning.
__device__ __forceinline__ uint32_t ldg_stream_u32(const void* p) {
  uint32_t v;
  asm volatile("ld.global.nc.L1::no_allocate.u32 %0, [%1];\n" : "=r"(v) : "l"(p));
  return v;
}

}  // namespace tersor
