// The CUDA 2:4 GEMV and GEMM replayed on the CPU (op _sparse24_emulate_cuda_linear), so the
// value/metadata fragment layout, the x-tile swizzle + ldmatrix and the warp split are tested without a
// GPU. Each lane loads exactly what the kernel
// loads (its 8 values at tile_offset + 8 * lane, its metadata word, its x pairs); the MMA is then
// evaluated from those registers by the PTX ISA's rules for mma.sp m16n8k32 16-bit (9.7.14.6.2),
// written out here independently of sparse24_format.h's placement functions: if the format's
// placement and the hardware's reading disagree, the replay disagrees with the dense reference. The
// warps are reduced in the kernel's order. (The hardware's summation order inside one MMA is
// unspecified, so the kernel agrees with this replay to fp32 rounding, not bitwise.)
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstring>
#include <optional>
#include <vector>

#include "sparse/sparse24_cuda_traits.h"
#include "sparse/sparse24_format.h"
#include "sparse/sparse24_glue.h"

namespace tersor::sparse24 {
namespace {

using Traits = Sparse24GemvTraits;

template <typename T>
float bits_to_float(uint16_t b) {
  T v;
  std::memcpy(&v, &b, 2);
  return static_cast<float>(v);
}

// One m16n8k32 sparse MMA, selector `sel`, from the 32 lanes' registers: a[lane][8] (16-bit values,
// registers a0..a3 as 8 halves), b[lane][8] (x values of the B fragment), e[lane].
template <typename T>
void mma_sp_replay(const uint16_t a[32][8], const uint16_t b[32][8], const uint32_t e[32], int sel, float c[16][8]) {
  float A[16][32] = {};
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, q = lane & 3;
    for (int i = 0; i < 8; ++i) {
      // PTX: a_i of lane (g, q) is row g (i in {0,1,4,5}) or g + 8 (i in {2,3,6,7}), compressed column
      // 2q + (i & 1) (+ 8 for i >= 4): the (i & 1)-th kept value of 4-wide chunk (column / 2).
      const int row = g + 8 * ((i >> 1) & 1), col = 2 * q + (i & 1) + 8 * (i >> 2), chunk = col >> 1;
      // Metadata of (row, chunk): thread pair sel of the quad of row's group; the pair's first thread
      // covers chunks 0..3, the second 4..7; bits [15:0] for rows 0..7, [31:16] for rows 8..15.
      const uint32_t word = e[4 * (row & 7) + 2 * sel + (chunk >> 2)];
      const uint32_t nib = (word >> (16 * (row >> 3) + 4 * (chunk & 3))) & 0xfu;
      const int pos = (i & 1) ? static_cast<int>(nib >> 2) : static_cast<int>(nib & 3u);
      A[row][4 * chunk + pos] = bits_to_float<T>(a[lane][i]);
    }
  }
  float Bm[32][8];
  for (int lane = 0; lane < 32; ++lane)
    for (int i = 0; i < 8; ++i) Bm[2 * (lane & 3) + 8 * (i >> 1) + (i & 1)][lane >> 2] = bits_to_float<T>(b[lane][i]);
  for (int r = 0; r < 16; ++r)
    for (int n = 0; n < 8; ++n) {
      float s = c[r][n];
      for (int k = 0; k < 32; ++k) s += A[r][k] * Bm[k][n];
      c[r][n] = s;
    }
}

template <typename T>
at::Tensor emulate_impl(const at::Tensor& x2, const at::Tensor& values, const at::Tensor& meta, const Shape& s,
                        const std::optional<at::Tensor>& bias) {
  const int64_t B = x2.size(0), M = s.M, K = s.K, pairs = K / kColAlign;
  const int ntiles = B <= 8 ? 1 : 2;
  const uint16_t* v = reinterpret_cast<const uint16_t*>(values.const_data_ptr());
  const uint32_t* mw = reinterpret_cast<const uint32_t*>(meta.const_data_ptr<int32_t>());
  const uint16_t* x = reinterpret_cast<const uint16_t*>(x2.const_data_ptr());
  const uint16_t* bp = bias.has_value() ? reinterpret_cast<const uint16_t*>(bias->const_data_ptr()) : nullptr;
  at::Tensor y = at::empty({B, M}, x2.options());
  T* yp = y.mutable_data_ptr<T>();
  at::parallel_for(0, M / kRowAlign, 1, [&](int64_t rb0, int64_t rb1) {
    std::vector<float> partial(Traits::kWarps * 2 * 16 * 8);
    for (int64_t rb = rb0; rb < rb1; ++rb) {
      std::fill(partial.begin(), partial.end(), 0.f);
      for (int warp = 0; warp < Traits::kWarps; ++warp)
        for (int64_t p = warp; p < pairs; p += Traits::kWarps) {
          uint32_t e[32];
          uint16_t a[2][32][8];
          for (int lane = 0; lane < 32; ++lane) {
            e[lane] = mw[(rb * pairs + p) * 32 + lane];
            for (int s2 = 0; s2 < 2; ++s2)
              std::memcpy(a[s2][lane], v + tile_offset(K, rb, 2 * p + s2) + 8 * lane, 16);
          }
          for (int nt = 0; nt < ntiles; ++nt)
            for (int s2 = 0; s2 < 2; ++s2) {
              uint16_t b[32][8];
              const int64_t k0 = p * kColAlign + s2 * kTileK;
              for (int lane = 0; lane < 32; ++lane) {
                const int n = nt * 8 + (lane >> 2), q = lane & 3;
                for (int r = 0; r < 4; ++r)
                  for (int h = 0; h < 2; ++h) b[lane][2 * r + h] = n < B ? x[n * K + k0 + 2 * q + 8 * r + h] : 0;
              }
              float* c = partial.data() + (warp * 2 + nt) * 16 * 8;
              mma_sp_replay<T>(a[s2], b, e, s2, reinterpret_cast<float(*)[8]>(c));
            }
        }
      for (int nt = 0; nt < ntiles; ++nt)
        for (int r = 0; r < 16; ++r)
          for (int nn = 0; nn < 8; ++nn) {
            const int64_t n = nt * 8 + nn, row = rb * kRowAlign + r;
            if (n >= B) continue;
            float sum = 0.f;
            for (int w = 0; w < Traits::kWarps; ++w) sum += partial[((w * 2 + nt) * 16 + r) * 8 + nn];
            if (bp) sum += bits_to_float<T>(bp[row]);
            yp[n * M + row] = static_cast<T>(sum);
          }
    }
  });
  return y;
}

// The tiled GEMM kernel (sparse24_gemm_cuda.cu) replayed: every stage's shared-memory image is built
// with the kernel's own copy indexing (format offsets, the x-tile swizzle gemm_x_chunk), the lanes read
// their A registers and metadata from it, B registers are delivered by ldmatrix's rule (lane t gets, from
// matrix i, row t / 4 at elements 2 (t % 4), +1, where matrix i's row r is the address lane 8 i + r gave),
// and the D fragments are stored as the kernel stores them.
template <typename T>
at::Tensor emulate_gemm(const at::Tensor& x2, const at::Tensor& values, const at::Tensor& meta, const Shape& s,
                        const std::optional<at::Tensor>& bias) {
  using G = Sparse24GemmTraits;
  const int64_t N = x2.size(0), M = s.M, K = s.K, row_blocks = M / kRowAlign, ksteps = K / G::kBK;
  const uint16_t* v = reinterpret_cast<const uint16_t*>(values.const_data_ptr());
  const uint32_t* mw = reinterpret_cast<const uint32_t*>(meta.const_data_ptr<int32_t>());
  const uint16_t* x = reinterpret_cast<const uint16_t*>(x2.const_data_ptr());
  const uint16_t* bp = bias.has_value() ? reinterpret_cast<const uint16_t*>(bias->const_data_ptr()) : nullptr;
  at::Tensor y = at::empty({N, M}, x2.options());
  T* yp = y.mutable_data_ptr<T>();
  const int64_t grid_m = (row_blocks + G::kRowBlocks - 1) / G::kRowBlocks, grid_n = (N + G::kBN - 1) / G::kBN;
  at::parallel_for(0, grid_m * grid_n, 1, [&](int64_t b0, int64_t b1) {
    std::vector<uint8_t> stage(G::kStageBytes);
    std::vector<float> acc(G::kWarps * G::kMTiles * G::kNTiles * 128);  // [warp][mt][nt][16 x 8]
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t rb0 = (blk / grid_n) * G::kRowBlocks, n0 = (blk % grid_n) * G::kBN;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t kp = 0; kp < ksteps; ++kp) {
        uint8_t* vs = stage.data();
        uint8_t* ms = vs + G::kValueStageBytes;
        uint8_t* xs = ms + G::kMetaStageBytes;
        for (int c = 0; c < G::kValueStageBytes / 16; ++c) {
          const int rbl = c >> 6, off = c & 63;
          if (rb0 + rbl < row_blocks)
            std::memcpy(vs + c * 16, v + tile_offset(K, rb0 + rbl, 2 * kp) + off * 8, 16);
          else
            std::memset(vs + c * 16, 0, 16);
        }
        for (int t = 0; t < G::kMetaStageBytes / 16; ++t) {
          const int rbl = t >> 3, off = t & 7;
          if (rb0 + rbl < row_blocks)
            std::memcpy(ms + t * 16, mw + ((rb0 + rbl) * (K / kColAlign) + kp) * 32 + off * 4, 16);
          else
            std::memset(ms + t * 16, 0, 16);
        }
        for (int c = 0; c < G::kXStageBytes / 16; ++c) {
          const int n = c >> 3, ch = c & 7;
          if (n0 + n < N)
            std::memcpy(xs + gemm_x_chunk(n, ch) * 16, x + (n0 + n) * K + kp * G::kBK + ch * 8, 16);
          else
            std::memset(xs + gemm_x_chunk(n, ch) * 16, 0, 16);
        }
        for (int warp = 0; warp < G::kWarps; ++warp) {
          const int warp_m = warp / G::kWarpsN, warp_n = warp % G::kWarpsN;
          for (int sel = 0; sel < 2; ++sel)
            for (int mt = 0; mt < G::kMTiles; ++mt) {
              uint16_t a[32][8];
              uint32_t e[32];
              for (int lane = 0; lane < 32; ++lane) {
                std::memcpy(a[lane], vs + ((warp_m * G::kMTiles + mt) * 2 + sel) * 512 + lane * 16, 16);
                std::memcpy(&e[lane], ms + ((warp_m * G::kMTiles + mt) * 32 + lane) * 4, 4);
              }
              for (int nt = 0; nt < G::kNTiles; ++nt) {
                uint16_t b[32][8];
                for (int t = 0; t < 32; ++t)
                  for (int i = 0; i < 4; ++i) {
                    const int giver = 8 * i + t / 4;
                    const int n = gemm_ldmatrix_row(warp_n * G::kNTiles * 8 + nt * 8, giver);
                    const uint8_t* row = xs + gemm_x_chunk(n, gemm_ldmatrix_chunk(sel, giver)) * 16;
                    std::memcpy(&b[t][2 * i], row + 4 * (t % 4), 4);
                  }
                float* c = acc.data() + ((warp * G::kMTiles + mt) * G::kNTiles + nt) * 128;
                mma_sp_replay<T>(a, b, e, sel, reinterpret_cast<float(*)[8]>(c));
              }
            }
        }
      }
      for (int warp = 0; warp < G::kWarps; ++warp) {
        const int warp_m = warp / G::kWarpsN, warp_n = warp % G::kWarpsN;
        for (int mt = 0; mt < G::kMTiles; ++mt)
          for (int nt = 0; nt < G::kNTiles; ++nt)
            for (int r = 0; r < 16; ++r)
              for (int nn = 0; nn < 8; ++nn) {
                const int64_t m = (rb0 + warp_m * G::kMTiles + mt) * kRowAlign + r;
                const int64_t n = n0 + warp_n * G::kNTiles * 8 + nt * 8 + nn;
                if (m >= M || n >= N) continue;
                float sum = acc[((warp * G::kMTiles + mt) * G::kNTiles + nt) * 128 + r * 8 + nn];
                if (bp) sum += bits_to_float<T>(bp[m]);
                yp[n * M + m] = static_cast<T>(sum);
              }
      }
    }
  });
  return y;
}

at::Tensor emulate_cuda_linear(const at::Tensor& x, const at::Tensor& values_in, const at::Tensor& meta_in,
                               const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "_sparse24_emulate_cuda_linear";
  const Shape s = check_packed(values_in, meta_in, op);
  const std::vector<int64_t> out_shape = check_linear_inputs(x, bias, values_in, s, op);
  const at::Tensor x2 = x.reshape({-1, s.K}).contiguous();
  const at::Tensor values = values_in.contiguous(), meta = meta_in.contiguous();
  if (x2.size(0) == 0) return at::empty(out_shape, x.options());
  std::optional<at::Tensor> b;
  if (bias.has_value()) b = bias->contiguous();
  const bool half = values.scalar_type() == at::kHalf;
  // The kernel the CUDA op picks for this many rows of x.
  const at::Tensor y = x2.size(0) >= Sparse24GemmTraits::kMinBatch
                           ? (half ? emulate_gemm<c10::Half>(x2, values, meta, s, b)
                                   : emulate_gemm<c10::BFloat16>(x2, values, meta, s, b))
                           : (half ? emulate_impl<c10::Half>(x2, values, meta, s, b)
                                   : emulate_impl<c10::BFloat16>(x2, values, meta, s, b));
  return y.reshape(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(tersor, CPU, m) { m.impl("_sparse24_emulate_cuda_linear", &emulate_cuda_linear); }

}  // namespace tersor::sparse24
