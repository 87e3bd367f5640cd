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
// 64-bit offsets (issue 17): the weight [out, in] and the codes [out, groups, C] pass 2^31 elements in large
// layers; the CPU decode, the CUDA kernels and the CPU tests (tersor_testing::_codebook_index) use these.
// First code of group j of output row o.
TERSOR_HD constexpr int64_t aqlm_code_offset(int64_t o, int64_t j, int64_t groups, int num_codebooks) {
  return (o * groups + j) * num_codebooks;
}
// First weight of group j of output row o (in = 8 * groups), also x[b, 8 j] for x [batch, in].
TERSOR_HD constexpr int64_t aqlm_weight_offset(int64_t o, int64_t j, int64_t in) { return o * in + 8 * j; }
// First float of entry `index` of codebook c in the fp32 codebooks [C, entries, 8].
TERSOR_HD constexpr int64_t aqlm_entry_offset(int c, int64_t entries, uint32_t index) {
  return (c * entries + index) * 8;
}

template <typename CodeT>
TERSOR_HD inline void aqlm_group_values(const CodeT* codes, int num_codebooks, uint32_t index_mask,
                                        const float* codebooks, int64_t entries, float out[8]) {
  for (int k = 0; k < 8; ++k) out[k] = 0.f;
  for (int c = 0; c < num_codebooks; ++c) {
    const float* e = codebooks + aqlm_entry_offset(c, entries, aqlm_index(codes[c], index_mask));
    for (int k = 0; k < 8; ++k) out[k] += e[k];
  }
}

}  // namespace tersor::codebook
