// PTX wrappers for staging tiles in shared memory (sm80+): cp.async global->shared copies and ldmatrix
// fragment loads, shared by every family's tensor-core kernels. Each says why it is used.
#pragma once

#include <cstdint>

namespace tersor {

// The 32-bit shared-window address PTX's .shared operands take.
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global->shared copy that bypasses L1 (.cg) and the register file, so a multi-stage pipeline
// has the next tiles in flight while the tensor cores work on the current one. src_bytes < 16 zero-fills
// the rest (0: a pure zero fill for rows past the end of the matrix, so the MMA sees zeros without a
// branch around the copy).
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, int src_bytes = 16) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem_dst)), "l"(gmem_src),
               "r"(src_bytes));
}

// Closes the group of cp.async this thread issued since the last commit (one pipeline stage).
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until at most kPending of this thread's committed groups are still in flight (a kStages-deep
// pipeline keeps kStages - 2 loads running while it computes).
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// Four 8x8 b16 matrices from shared memory into the mma fragment layout in one instruction: lane L gives
// the address of row L % 8 of matrix L / 8 and receives, from matrix i, row L / 4, elements 2 (L % 4), +1
// in r[i]. Replaces 4 x 2 scalar shared loads per lane and the shuffles to place them.
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem_row)));
}

// Two matrices (lanes 0-15 supply the rows): one n8 B fragment of m16n8k16.
__device__ __forceinline__ void ldmatrix_x2(uint32_t r[2], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_u32(smem_row)));
}

}  // namespace tersor
