// Launchers of the 2:4 family's CUDA kernels. Plain C++ + CUDA runtime types (no torch headers), so the
// glue and the kernels compile independently.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/dtype.h"
#include "sparse/sparse24_cuda_traits.h"

namespace tersor::sparse24 {

struct Sparse24Args {
  const void* values = nullptr;     // device, format v1 [M/16, K/32, 256], 16-byte aligned
  const uint32_t* meta = nullptr;   // device, format v1 [M/16, K/64, 32]
  int64_t M = 0, K = 0;
  DType dtype = DType::kFloat16;    // kFloat16 or kBFloat16
};

// y [batch, M] = x [batch, K] @ W^T (+ bias [M] or nullptr), all of args.dtype, x rows contiguous;
// batch in 1..Sparse24GemvTraits::kMaxBatch. fp32 accumulation, rounded once.
cudaError_t launch_sparse24_gemv(const Sparse24Args& a, const void* x, int batch, const void* bias, void* y,
                                 cudaStream_t stream);
// The same product for any batch >= 1 on the tiled, cp.async-pipelined mma.sp GEMM (used from
// Sparse24GemmTraits::kMinBatch rows; x rows 16-byte aligned).
cudaError_t launch_sparse24_gemm(const Sparse24Args& a, const void* x, int64_t batch, const void* bias, void* y,
                                 cudaStream_t stream);
// The same product on Hopper (sm90a cubin only; call it on a compute-capability 9.0 device): wgmma.sp
// m64n128k32, 128 W rows x 256 rows of x per block (Sparse24Sm90Traits). Used from
// Sparse24Sm90Traits::kMinBatch rows of x; any batch >= 1 is correct.
cudaError_t launch_sparse24_gemm_sm90(const Sparse24Args& a, const void* x, int64_t batch, const void* bias, void* y,
                                      cudaStream_t stream);
// Packs a dense 2:4 weight [M, K] (args.dtype, rows contiguous, 8-byte aligned) into args' values and
// meta (written through the const pointers' buffers, passed here as mutable). Sets *bad_flag (device
// int, zeroed by the caller) to 1 if some chunk holds more than two non-zeros.
cudaError_t launch_sparse24_compress(const void* weight, int64_t M, int64_t K, void* values, uint32_t* meta,
                                     int* bad_flag, cudaStream_t stream);
// The dense weight [M, K] of args.dtype (pruned positions zero); bit-exact.
cudaError_t launch_sparse24_decompress(const Sparse24Args& a, void* out, cudaStream_t stream);

}  // namespace tersor::sparse24
