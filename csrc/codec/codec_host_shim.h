// What the host-callable parts of codec_cuda_common.cuh take from the CUDA headers, for host compilers
// without them (the kernels' CPU replay is built in every TERSOR_TESTING build, CPU-only ones included):
// the uint2/uint4 vector types and the fp16/bf16 conversions, bit-exact with the device's cvt.rn
// instructions (round to nearest even; a NaN becomes the canonical 0x7fff, as cvt.rn produces).
// Checked against cuda_fp16.h / cuda_bf16.h's host conversions on all 2^32 fp32 and 2^16 fp16 patterns;
// tests/test_codec.py compares the GEMV replay with the GPU kernel bit for bit.
#pragma once

#include <cstdint>
#include <cstring>

namespace tersor::codec::host_shim {

struct alignas(8) uint2 {
  uint32_t x, y;
};
struct alignas(16) uint4 {
  uint32_t x, y, z, w;
};
inline uint2 make_uint2(uint32_t x, uint32_t y) { return uint2{x, y}; }
inline uint4 make_uint4(uint32_t x, uint32_t y, uint32_t z, uint32_t w) { return uint4{x, y, z, w}; }

inline uint32_t float_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return u;
}

// float -> bfloat16 bits, round to nearest even (cvt.rn.bf16.f32).
inline uint16_t bf16_bits_rn(float v) {
  const uint32_t u = float_bits(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;  // NaN
  const uint32_t rounded = u + 0x7fffu + ((u >> 16) & 1u);  // carries into the exponent (to inf) as it should
  return static_cast<uint16_t>(rounded >> 16);
}

// float -> float16 bits, round to nearest even (cvt.rn.f16.f32), subnormals and overflow included.
inline uint16_t f16_bits_rn(float v) {
  const uint32_t x = float_bits(v);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t u = x & 0x7fffffffu;
  if (u > 0x7f800000u) return 0x7fffu;                                  // NaN
  if (u >= 0x47800000u) return static_cast<uint16_t>(sign | 0x7c00u);   // |v| >= 65536 (or inf): inf
  uint32_t result, remainder;  // remainder: the dropped bits, left-aligned in 32
  if (u >= 0x38800000u) {      // normal in fp16 (|v| >= 2^-14)
    result = (u - 0x38000000u) >> 13;
    remainder = u << 19;
  } else if (u < 0x33000001u) {  // |v| <= 2^-25: zero (the tie at 2^-25 goes to the even zero)
    result = 0;
    remainder = 0;
  } else {                       // fp16 subnormal
    const uint32_t shift = 0x7eu - (u >> 23);  // 14..24 here
    const uint32_t mantissa = (u & 0x7fffffu) | 0x800000u;
    result = mantissa >> shift;
    remainder = mantissa << (32u - shift);
  }
  if (remainder > 0x80000000u || (remainder == 0x80000000u && (result & 1u))) ++result;  // may carry to inf
  return static_cast<uint16_t>(sign | result);
}

// float16 bits -> float (exact; NaN -> 0x7fffffff, as cuda_fp16.h's host __half2float).
inline float f16_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, out;
  if (exp == 0x1fu) {
    out = mant ? 0x7fffffffu : sign | 0x7f800000u;  // inf; a NaN becomes the canonical one, as in cuda_fp16.h
  } else if (exp != 0) {
    out = sign | ((exp + 112u) << 23) | (mant << 13);
  } else if (mant == 0) {
    out = sign;
  } else {  // subnormal: normalize
    exp = 113u;
    while (!(mant & 0x400u)) {
      mant <<= 1;
      --exp;
    }
    out = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &out, 4);
  return f;
}

}  // namespace tersor::codec::host_shim
