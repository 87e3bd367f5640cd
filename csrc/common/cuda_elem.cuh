// Element conversion and vector memory access for kernels that compute in fp32 registers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace tersor {

template <typename T>
struct ElemIO;

template <>
struct ElemIO<float> {
  static __device__ __forceinline__ float to_float(float v) { return v; }
  static __device__ __forceinline__ float from_float(float v) { return v; }
};
template <>
struct ElemIO<__half> {
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};
template <>
struct ElemIO<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

// An integer type of exactly kBytes, so one chunk moves with a single ld/st of that width
// (LDG.128 for 16 bytes: the widest per-thread access, and what memory-bound kernels need).
template <int kBytes>
struct RawChunk;
template <>
struct RawChunk<16> { using type = uint4; };
template <>
struct RawChunk<8> { using type = uint2; };
template <>
struct RawChunk<4> { using type = uint32_t; };
template <>
struct RawChunk<2> { using type = uint16_t; };

// Loads kBytes / sizeof(T) elements from src (aligned to kBytes) and widens them to fp32.
template <typename T, int kBytes>
__device__ __forceinline__ void load_chunk_as_float(const T* __restrict__ src, float* dst) {
  using Raw = typename RawChunk<kBytes>::type;
  constexpr int kElems = kBytes / static_cast<int>(sizeof(T));
  Raw raw = *reinterpret_cast<const Raw*>(src);
  const T* elems = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < kElems; ++i) dst[i] = ElemIO<T>::to_float(elems[i]);
}

// Rounds kBytes / sizeof(T) fp32 values to T and stores them to dst (aligned to kBytes).
template <typename T, int kBytes>
__device__ __forceinline__ void store_chunk_from_float(T* __restrict__ dst, const float* src) {
  using Raw = typename RawChunk<kBytes>::type;
  constexpr int kElems = kBytes / static_cast<int>(sizeof(T));
  Raw raw;
  T* elems = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int i = 0; i < kElems; ++i) elems[i] = ElemIO<T>::from_float(src[i]);
  *reinterpret_cast<Raw*>(dst) = raw;
}

// 8 consecutive elements (one 8-weight group of the codebook kernels) with 16-byte accesses: one for
// 16-bit types, two for fp32; the pointer must be aligned to 16 bytes.
template <typename T>
__device__ __forceinline__ void load8_as_float(const T* __restrict__ src, float dst[8]) {
  load_chunk_as_float<T, 16>(src, dst);
  if constexpr (sizeof(T) == 4) load_chunk_as_float<T, 16>(src + 4, dst + 4);
}
template <typename T>
__device__ __forceinline__ void store8_from_float(T* __restrict__ dst, const float src[8]) {
  store_chunk_from_float<T, 16>(dst, src);
  if constexpr (sizeof(T) == 4) store_chunk_from_float<T, 16>(dst + 4, src + 4);
}

}  // namespace tersor
