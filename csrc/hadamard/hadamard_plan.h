// Size factorisation and CUDA work plan of the Hadamard transform. Pure constexpr C++: the CPU
// implementation, the CUDA kernels and the CPU tests (through tersor::_hadamard_plan) all read the
// same functions, so a wrong plan or smem layout is caught without a GPU.
#pragma once

#include <cstdint>

#include "common/macros.h"
#include "hadamard/hadamard_k_tables.h"

namespace tersor::hadamard {

// n = k * 2^log_n, with k == 1 (plain Sylvester transform) or one of the tabulated K.
struct FactoredSize {
  int k = 0;
  int log_n = 0;
};

inline constexpr int kMaxLogN = 15;  // 2^k part up to 32768

#define TERSOR_HADAMARD_K_ENTRY(K) K,
inline constexpr int kHadamardKs[] = {TERSOR_HADAMARD_K_LIST(TERSOR_HADAMARD_K_ENTRY)};
#undef TERSOR_HADAMARD_K_ENTRY
inline constexpr int kNumHadamardKs = sizeof(kHadamardKs) / sizeof(kHadamardKs[0]);

// Returns false when n is not k*2^log_n for a supported (k, log_n). The odd parts of the supported K
// are pairwise distinct, so the factorisation is unique.
TERSOR_HD constexpr bool factor_size(int64_t n, FactoredSize* out) {
  if (n <= 0) return false;
  int64_t odd = n;
  int twos = 0;
  while ((odd & 1) == 0) {
    odd >>= 1;
    ++twos;
  }
  if (odd == 1) {
    if (twos > kMaxLogN) return false;
    *out = {1, twos};
    return true;
  }
  for (int i = 0; i < kNumHadamardKs; ++i) {
    int k = kHadamardKs[i];
    int k_twos = 0, k_odd = k;
    while ((k_odd & 1) == 0) {
      k_odd >>= 1;
      ++k_twos;
    }
    if (k_odd == odd && twos >= k_twos && twos - k_twos <= kMaxLogN) {
      *out = {k, twos - k_twos};
      return true;
    }
  }
  return false;
}

// ---- CUDA plan for the power-of-two transform of rows of length 2^log_n ----
//
// Each thread owns `ept` consecutive elements of a row (so global loads/stores are 16-byte vectors),
// held in registers as fp32. Index bits of an element inside a row, low to high:
//   [ log2(ept) bits: register ] [ up to 5 bits: lane ] [ log2(wpr) bits: warp ]
// Register bits are transformed in-thread, lane bits with shuffles, warp bits by a trip through shared
// memory: each thread writes its registers, gathers `wpr` values that differ only in the warp bits,
// transforms them in registers, writes them back and re-reads its own. To bound shared memory the
// trip runs in `rounds` rounds over disjoint slices of the registers (a slice is closed under the
// warp-bit butterflies), each round holding rows_len/rounds floats.
struct Pow2Plan {
  int log_n = 0;
  int n = 0;
  int elem_bytes = 0;
  int ept = 0;             // elements per thread (power of two)
  int vec_bytes = 0;       // width of one global load/store: min(16, ept * elem_bytes)
  int tpr = 0;             // threads per row = n / ept, at most 1024
  int wpr = 0;             // warps per row; 1 means no shared-memory stage
  int lane_bits = 0;       // butterfly stages done with shuffles
  int rows_per_block = 0;  // > 1 only when wpr == 1
  int block_threads = 0;
  int rounds = 0;          // shared-memory rounds (wpr > 1)
  int ept_round = 0;       // registers per thread exchanged per round = ept / rounds
  int groups = 0;          // wpr-point transforms per thread per round = ept_round / wpr
  int smem_bytes = 0;      // dynamic shared memory per block
  bool ok = false;
};

inline constexpr int kMaxBlockThreads = 1024;
inline constexpr int kSmallRowBlockThreads = 256;
inline constexpr int kMaxSmemBytes = 72 * 1024;  // fits sm80 (164K), sm89 (99K), sm90 (227K) with opt-in

// Shared memory stage layout: 16 bytes of padding after every 32 floats. With it the 16-byte stores
// of 8 consecutive threads (ept_round in {4, 8, 16, 32}) hit 8 distinct 16-byte bank groups, and the
// gather of 32 consecutive indices by a warp hits 32 distinct banks. Checked on the CPU by
// tests/test_hadamard_plan.py.
TERSOR_HD constexpr int smem_index(int j) { return j + (j >> 5) * 4; }
TERSOR_HD constexpr int smem_floats(int count) { return count + (count >> 5) * 4; }

TERSOR_HD constexpr int ilog2(int x) {
  int r = 0;
  while ((1 << (r + 1)) <= x) ++r;
  return r;
}

TERSOR_HD constexpr Pow2Plan make_pow2_plan(int log_n, int elem_bytes) {
  Pow2Plan p{};
  if (log_n < 0 || log_n > kMaxLogN || (elem_bytes != 2 && elem_bytes != 4)) return p;
  p.log_n = log_n;
  p.n = 1 << log_n;
  p.elem_bytes = elem_bytes;
  int vec = 16 / elem_bytes;
  for (int ept = vec < p.n ? vec : p.n; ept <= p.n; ept *= 2) {
    int tpr = p.n / ept;
    if (tpr > kMaxBlockThreads) continue;
    int wpr = tpr >= 32 ? tpr / 32 : 1;
    int rounds = 1;
    if (wpr > 1) {
      while (smem_floats(p.n / rounds) * 4 > kMaxSmemBytes) rounds *= 2;
      if (rounds > ept || ept / rounds < wpr) continue;  // a round must hold whole wpr-point groups
    }
    p.ept = ept;
    p.vec_bytes = ept * elem_bytes < 16 ? ept * elem_bytes : 16;
    p.tpr = tpr;
    p.wpr = wpr;
    p.lane_bits = ilog2(tpr < 32 ? tpr : 32);
    p.rows_per_block = wpr > 1 ? 1 : (tpr >= kSmallRowBlockThreads ? 1 : kSmallRowBlockThreads / tpr);
    p.block_threads = p.rows_per_block * tpr;
    p.rounds = rounds;
    p.ept_round = ept / rounds;
    p.groups = wpr > 1 ? p.ept_round / wpr : 0;
    p.smem_bytes = wpr > 1 ? smem_floats(p.n / rounds) * 4 : 0;
    p.ok = true;
    return p;
  }
  return p;
}

// ---- 64-bit index math of the CUDA kernels (issue 17) ----
// Every product that can pass 2^31 is taken here in int64, by the kernels and by CPU tests (through
// tersor_testing::_hadamard_index) at sizes no test could allocate.
inline constexpr int64_t kMaxGridX = 0x7fffffff;  // CUDA's gridDim.x limit

// Blocks of the power-of-two kernel for `rows` rows of plan p.
TERSOR_HD constexpr int64_t pow2_blocks(const Pow2Plan& p, int64_t rows) {
  return (rows + p.rows_per_block - 1) / p.rows_per_block;
}
// Row of thread `tid` of block `block` (may be past the last row: the kernel masks it).
TERSOR_HD constexpr int64_t pow2_row(const Pow2Plan& p, int64_t block, int tid) {
  return block * p.rows_per_block + tid / p.tpr;
}
// Element offset of the first of thread t's registers in row `row` (rows contiguous, n elements each).
TERSOR_HD constexpr int64_t pow2_elem_offset(const Pow2Plan& p, int64_t row, int t) {
  return row * p.n + static_cast<int64_t>(t) * p.ept;
}

// K-mix kernel: one block per (row, 32-column tile) of the K x 2^log_n view of each row.
inline constexpr int kKmixTileCols = 32;
TERSOR_HD constexpr int64_t kmix_tiles_per_row(int log_n) {
  return ((int64_t{1} << log_n) + kKmixTileCols - 1) / kKmixTileCols;
}
TERSOR_HD constexpr int64_t kmix_blocks(int64_t rows, int log_n) { return rows * kmix_tiles_per_row(log_n); }
// Offset of element (row, sub-row a, column col) of a contiguous [rows, k, 2^log_n] array.
TERSOR_HD constexpr int64_t kmix_offset(int64_t row, int k, int log_n, int a, int64_t col) {
  return (row * k + a) * (int64_t{1} << log_n) + col;
}

// The most rows of n = k * 2^log_n elements (elem_bytes each) the CUDA path launches in one call: the
// power-of-two kernel sees rows * k sub-rows and the K-mix kernel rows * tiles blocks, both within
// gridDim.x. 0 when no plan exists. The glue refuses more with a ValueError naming this number.
TERSOR_HD constexpr int64_t cuda_max_rows(int k, int log_n, int elem_bytes) {
  const Pow2Plan p = make_pow2_plan(log_n, elem_bytes);
  if (!p.ok || k < 1) return 0;
  int64_t max_rows = kMaxGridX * p.rows_per_block / k;
  if (k > 1) {
    const int64_t by_mix = kMaxGridX / kmix_tiles_per_row(log_n);
    if (by_mix < max_rows) max_rows = by_mix;
  }
  return max_rows;
}

}  // namespace tersor::hadamard
