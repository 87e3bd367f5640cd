// Portable qualifiers for code shared by CPU twins, CPU tests and CUDA kernels.
#pragma once

#if defined(__CUDACC__)
#define TERSOR_HD __host__ __device__
#define TERSOR_DEVICE_INLINE __device__ __forceinline__
#else
#define TERSOR_HD
#endif
