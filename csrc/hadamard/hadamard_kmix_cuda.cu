// Second stage of the K * 2^k Hadamard transform: mixes the K sub-rows of each row with the K x K
// matrix. One block per (row, 32-column tile): the K x 32 fp32 tile is staged in shared memory, each
// warp produces whole output sub-rows, lane = column. The sign bits live in __constant__ memory and
// every lane of a warp reads the same word, which the constant cache broadcasts.
#include <cuda_runtime.h>

#include "common/cuda_elem.cuh"
#include "hadamard/hadamard_cuda.h"
#include "hadamard/hadamard_k.h"
#include "hadamard/hadamard_plan.h"

namespace tersor::hadamard {
namespace {

// All K tables back to back; offsets computed on the host from the same X-macro order.
__constant__ unsigned long long c_k_bits[] = {
#define TERSOR_HADAMARD_K_DEVICE_BITS(K) TERSOR_HADAMARD_K##K##_BITS,
    TERSOR_HADAMARD_K_LIST(TERSOR_HADAMARD_K_DEVICE_BITS)
#undef TERSOR_HADAMARD_K_DEVICE_BITS
};

int k_table_offset(int k) {
  int offset = 0;
  for (int i = 0; i < kNumHadamardKs; ++i) {
    if (kHadamardKs[i] == k) return offset;
    offset += kHadamardKs[i] * k_words_per_row(kHadamardKs[i]);
  }
  return -1;
}

constexpr int kMaxK = 172;
constexpr int kTileCols = kKmixTileCols;
constexpr int kWarps = 8;

template <typename Tout>
__global__ void __launch_bounds__(kWarps * 32)
    kmix_kernel(const float* __restrict__ t, Tout* __restrict__ y, int64_t tiles_per_row, int k, int log_n,
                int table_offset, float scale, bool transpose) {
  __shared__ float tile[kMaxK][kTileCols];
  const int64_t n = int64_t{1} << log_n;
  const int64_t row = blockIdx.x / tiles_per_row;
  const int64_t col0 = (blockIdx.x % tiles_per_row) * kTileCols;
  for (int i = threadIdx.x; i < k * kTileCols; i += blockDim.x) {
    const int a = i / kTileCols, c = i % kTileCols;
    tile[a][c] = col0 + c < n ? t[kmix_offset(row, k, log_n, a, col0 + c)] : 0.f;  // int64: hadamard_plan.h
  }
  __syncthreads();

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int words = k_words_per_row(k);
  const unsigned long long* bits = c_k_bits + table_offset;
  for (int a = warp; a < k; a += kWarps) {
    float acc = 0.f;
    for (int b = 0; b < k; ++b) {
      // H[a][b], or H^T[a][b] = H[b][a]; a and b are warp-uniform, so the word is a broadcast.
      const unsigned neg = transpose ? static_cast<unsigned>((bits[b * words + (a >> 6)] >> (a & 63)) & 1ull)
                                     : static_cast<unsigned>((bits[a * words + (b >> 6)] >> (b & 63)) & 1ull);
      acc += __uint_as_float(__float_as_uint(tile[b][lane]) ^ (neg << 31));
    }
    if (col0 + lane < n) y[kmix_offset(row, k, log_n, a, col0 + lane)] = ElemIO<Tout>::from_float(acc * scale);
  }
}

template <typename Tout>
cudaError_t launch_kmix_typed(const float* t, Tout* y, int64_t rows, int k, int log_n, float scale,
                              bool transpose, cudaStream_t stream) {
  const int offset = k_table_offset(k);
  if (offset < 0 || k > kMaxK || log_n < 0 || log_n > kMaxLogN) return cudaErrorInvalidValue;
  if (rows <= 0) return cudaSuccess;
  const int64_t tiles = kmix_tiles_per_row(log_n);
  const int64_t blocks = kmix_blocks(rows, log_n);
  if (blocks > kMaxGridX) return cudaErrorInvalidValue;  // the glue refuses such calls first (cuda_max_rows)
  kmix_kernel<Tout><<<static_cast<unsigned>(blocks), kWarps * 32, 0, stream>>>(t, y, tiles, k, log_n, offset,
                                                                               scale, transpose);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_kmix(const float* t, void* y, DType y_type, int64_t rows, int k, int log_n, float scale,
                        bool transpose, cudaStream_t stream) {
  switch (y_type) {
    case DType::kFloat32:
      return launch_kmix_typed(t, static_cast<float*>(y), rows, k, log_n, scale, transpose, stream);
    case DType::kFloat16:
      return launch_kmix_typed(t, static_cast<__half*>(y), rows, k, log_n, scale, transpose, stream);
    case DType::kBFloat16:
      return launch_kmix_typed(t, static_cast<__nv_bfloat16*>(y), rows, k, log_n, scale, transpose, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace tersor::hadamard
