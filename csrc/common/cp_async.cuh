// PTX wrappers for asynchronous global->shared copies and shared-memory matrix loads (sm80+), each with
// why it is used.
#pragma once

#include <cstdint>

namespace tersor {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global->shared copy that bypasses L1 (.cg) and registers, so a multi-stage pipeline can have
// several tiles in flight while the tensor cores work on an earlier one. src_bytes < 16 zero-fills the
// rest (0 = a pure zero fill for rows past the end of the matrix, without a branch around the copy).
__device__ __forceinline__ void cp_async_16_zfill(void* smem_dst, const void* gmem_src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem_dst)), "l"(gmem_src),
               "r"(src_bytes));
}

// Closes the group of cp.async issued since the last commit (one pipeline stage).
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until at most kPending committed groups are still in flight (the stages not yet consumed).
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// Four 8x8 b16 matrices from shared memory into the mma fragment layout: lane L gives the row address
// of matrix L / 8, row L % 8, and receives from matrix i its row (L / 4), elements 2 (L % 4), +1 in
// r[i]. Why: one instruction per 4 fragment registers instead of 4 x 2 scalar shared loads.
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem_row)));
}

}  // namespace tersor
