// XAttention block scoring (docs/research/xattention.md): the index rules shared by the CPU op
// (xattn_cpu.cpp), the CUDA kernel and the tests (through tersor.ops.xattention_mask). Torch-free.
//
// Strided antidiagonal scoring with stride S: reduced query i stands for query rows [i S, i S + S), reduced key j
// for key rows [j S, j S + S), and their score is the antidiagonal sum
//   R[i, j] = sum_{s < S} q[i S + (S - 1 - s)] . k[j S + s]      (rows past the sequence are zeros),
// i.e. the GEMM of the reversed-within-stride query rows and the strided key rows concatenated along the head
// dim (XAttention's "inverse" select mode). Softmax over j of R * scale / S, summed per (block_size / S) x
// (block_size / S) square: the mass of each (query block, key block).
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace tersor::attention {

// The query row whose embedding reduced query i puts at position s of its concatenation (may be >= len_q: zero).
TERSOR_HD constexpr int64_t xattn_query_row(int64_t i, int64_t s, int64_t stride) { return i * stride + (stride - 1 - s); }
// The key row at position s of reduced key j (may be >= len_k: zero).
TERSOR_HD constexpr int64_t xattn_key_row(int64_t j, int64_t s, int64_t stride) { return j * stride + s; }

// Causal (bottom-right aligned, as sage_attention): reduced key j is visible to reduced query i iff the first
// key row of j is visible to the first query row of i: j S <= i S + (len_k - len_q). For len_q == len_k, j <= i
// (XAttention's reduced causal mask).
TERSOR_HD constexpr bool xattn_causal_visible(int64_t i, int64_t j, int64_t stride, int64_t len_q, int64_t len_k) {
  return j * stride <= i * stride + (len_k - len_q);
}

// Reduced keys [0, n) visible to reduced query i (n = ceil(len_k / S) without causal).
TERSOR_HD constexpr int64_t xattn_visible_reduced_keys(int64_t i, int64_t stride, int64_t len_q, int64_t len_k,
                                                       bool causal) {
  const int64_t nk = (len_k + stride - 1) / stride;
  if (!causal) return nk;
  const int64_t last = i * stride + (len_k - len_q);  // j S <= last
  if (last < 0) return 0;
  const int64_t n = last / stride + 1;
  return n < nk ? n : nk;
}

// The "diagonal" key block of query block qb, always kept: the block of the key aligned with the block's last
// query row (bottom-right: row r <-> key r + len_k - len_q), clamped into [0, len_k).
TERSOR_HD constexpr int64_t xattn_diagonal_block(int64_t qb, int64_t block, int64_t len_q, int64_t len_k) {
  const int64_t last_row = ((qb + 1) * block < len_q ? (qb + 1) * block : len_q) - 1;
  int64_t key = last_row + (len_k - len_q);
  key = key < 0 ? 0 : (key > len_k - 1 ? len_k - 1 : key);
  return key / block;
}

}  // namespace tersor::attention
