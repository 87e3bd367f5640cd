// PTX wrappers for shared-memory tile loads (sm80+): cp.async global->shared copies and ldmatrix
// fragment loads, each with why it is used.
#pragma once

#include <cstdint>

namespace tersor {

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global->shared copy that bypasses L1 (.cg) and the register file: a tile for the tensor
// cores is staged while the previous one is multiplied. src_bytes < 16 zero-fills the rest (0: a pure
// zero fill, used for rows past the last token, so the MMA sees zeros without a branch around it).
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem_dst)), "l"(gmem_src),
               "r"(src_bytes));
}
// Closes the group of cp.async issued by this thread since the last commit.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most kPending of this thread's committed groups are still in flight (a pipeline keeps
// kStages - 2 loads running while it computes).
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// Four 8x8 16-bit matrices from shared memory into the mma.m16n8k16 fragment layout in one
// instruction (lane 8 i + j supplies row j of matrix i); replaces 4 x 8 scalar shared loads per lane
// and the shuffles to place them.
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem_row)));
}
// Two matrices (lanes 0-15 supply the rows): one n8 B fragment.
__device__ __forceinline__ void ldmatrix_x2(uint32_t r[2], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_u32(smem_row)));
}

}  // namespace tersor
