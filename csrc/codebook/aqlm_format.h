// AQLM's additive codebooks (out_group 1, in_group 8): the per-group arithmetic shared by the CPU ops
// and the CUDA kernels, so both compute bit-identical weights. Format: docs/formats.md ("AQLM").
// Torch-free so kernel sources can include it.
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace tersor::codebook {

// A stored code is signed (AQLM keeps 2^b-entry indices in a b-bit signed integer); its codebook index
// is the code mod 2^b, i.e. its low b bits.
template <typename CodeT>
TERSOR_HD inline uint32_t aqlm_index(CodeT code, uint32_t index_mask) {
  return static_cast<uint32_t>(static_cast<int32_t>(code)) & index_mask;
}

// The 8 unscaled weights of one group: sum over the C codebooks, c = 0 first, in fp32.
// `codebooks` is fp32 [C, entries, 8].
template <typename CodeT>
TERSOR_HD inline void aqlm_group_values(const CodeT* codes, int num_codebooks, uint32_t index_mask,
                                        const float* codebooks, int64_t entries, float out[8]) {
  for (int k = 0; k < 8; ++k) out[k] = 0.f;
  for (int c = 0; c < num_codebooks; ++c) {
    const float* e = codebooks + (c * entries + aqlm_index(codes[c], index_mask)) * 8;
    for (int k = 0; k < 8; ++k) out[k] += e[k];
  }
}

}  // namespace tersor::codebook
