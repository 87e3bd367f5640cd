// The K x K Hadamard matrices (sign bits) for the non-power-of-two sizes, host side.
// The CUDA K-mix kernel keeps its own __constant__ copy made from the same generated macros.
#pragma once

#include "common/macros.h"
#include "hadamard/hadamard_k_tables.h"

namespace tersor::hadamard {

TERSOR_HD constexpr int k_words_per_row(int k) { return (k + 63) / 64; }

// 1 where H_K[r][c] == -1.
TERSOR_HD inline unsigned k_sign_bit(const unsigned long long* bits, int k, int r, int c) {
  return static_cast<unsigned>((bits[r * k_words_per_row(k) + (c >> 6)] >> (c & 63)) & 1ull);
}

#define TERSOR_HADAMARD_K_HOST_TABLE(K) \
  inline constexpr unsigned long long kHostBitsK##K[] = {TERSOR_HADAMARD_K##K##_BITS};
TERSOR_HADAMARD_K_LIST(TERSOR_HADAMARD_K_HOST_TABLE)
#undef TERSOR_HADAMARD_K_HOST_TABLE

// nullptr for an unsupported k.
inline const unsigned long long* host_k_bits(int k) {
  switch (k) {
#define TERSOR_HADAMARD_K_CASE(K) \
  case K: return kHostBitsK##K;
    TERSOR_HADAMARD_K_LIST(TERSOR_HADAMARD_K_CASE)
#undef TERSOR_HADAMARD_K_CASE
    default: return nullptr;
  }
}

}  // namespace tersor::hadamard
