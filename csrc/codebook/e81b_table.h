// QuIP#'s 1-bit "E81B" codebook (the residual stage of its 3-bit RVQ), built at compile time.
// Facts: docs/research/e8p12.md section 5. Torch-free.
#pragma once

#include <cstdint>

namespace tersor::codebook {

struct E81BTable {
  float value[256][8];
  // fp16x2 bit patterns of coordinates (2p, 2p+1), for the CUDA GEMV's A fragments (all values are
  // 0, +-1/2, +-1 or +-2: exact in fp16).
  uint32_t half2[256][4];
};

namespace detail {
constexpr uint16_t e81b_half_bits(float v) {
  const float a = v < 0 ? -v : v;
  const uint16_t mag = a == 0.0f ? 0x0000 : a == 0.5f ? 0x3800 : a == 1.0f ? 0x3c00 : 0x4000;
  return static_cast<uint16_t>(v < 0 ? (mag | 0x8000) : mag);
}

constexpr E81BTable make_e81b_table() {
  E81BTable t{};
  int k = 0;
  // Integer points of E8 with |x|^2 <= 2 (so coordinates in {-1, 0, 1}) and an even sum, ascending
  // lexicographic (coordinate 0 most significant), the origin included.
  for (int i = 0; i < 6561; ++i) {
    int d[8] = {}, r = i, norm = 0, sum = 0;
    for (int c = 7; c >= 0; --c) { d[c] = r % 3 - 1; r /= 3; }
    for (int c = 0; c < 8; ++c) { norm += d[c] * d[c]; sum += d[c]; }
    if (norm > 2 || (sum % 2) != 0) continue;
    for (int c = 0; c < 8; ++c) t.value[k][c] = static_cast<float>(d[c]);
    ++k;
  }
  // The 128 points of (+-1/2)^8 with an even number of minus signs (even sum), ascending.
  for (int i = 0; i < 256; ++i) {
    int neg = 0;
    for (int c = 0; c < 8; ++c) neg += !((i >> (7 - c)) & 1);
    if (neg % 2) continue;
    for (int c = 0; c < 8; ++c) t.value[k][c] = ((i >> (7 - c)) & 1) ? 0.5f : -0.5f;
    ++k;
  }
  // +2 e_0 .. +2 e_7, then -2 e_0 .. -2 e_6 (QuIP# leaves out -2 e_7).
  for (int i = 0; i < 8; ++i, ++k) t.value[k][i] = 2.0f;
  for (int i = 0; i < 7; ++i, ++k) t.value[k][i] = -2.0f;
  for (int a = 0; a < 256; ++a)
    for (int p = 0; p < 4; ++p)
      t.half2[a][p] = static_cast<uint32_t>(e81b_half_bits(t.value[a][2 * p])) |
                      (static_cast<uint32_t>(e81b_half_bits(t.value[a][2 * p + 1])) << 16);
  return t;
}
}  // namespace detail

inline constexpr E81BTable kE81BTable = detail::make_e81b_table();

}  // namespace tersor::codebook
