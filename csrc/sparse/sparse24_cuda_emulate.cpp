// The CUDA 2:4 GEMV and GEMM replayed on the CPU (op _sparse24_emulate_cuda_linear; the sm90a wgmma.sp
// GEMM: _sparse24_emulate_sm90_linear, with _sparse24_sm90_layout_check for its x tile), so the
// value/metadata fragment layout, the x-tile swizzle + ldmatrix and the warp split are tested without a
// GPU. Each lane loads exactly what the kernel
// loads (its 8 values at tile_offset + 8 * lane, its metadata word, its x pairs); the MMA is then
// evaluated from those registers by the PTX ISA's rules for mma.sp m16n8k32 16-bit (9.7.14.6.2),
// written out here independently of sparse24_format.h's placement functions: if the format's
// placement and the hardware's reading disagree, the replay disagrees with the dense reference. The
// warps are reduced in the kernel's order. (The hardware's summation order inside one MMA is
// unspecified, so the kernel agrees with this replay to fp32 rounding, not bitwise.)
#include <algorithm>
#include <cstring>
#include <limits>
#include <utility>
#include <optional>
#include <string>
#include <vector>

#include "common/torch_glue.h"
#include "sparse/sparse24_cuda_traits.h"
#include "sparse/sparse24_format.h"
#include "sparse/sparse24_glue.h"
#include "sparse/sparse24_sm90_layout.h"

namespace tersor::sparse24 {
namespace {

using Traits = Sparse24GemvTraits;

template <typename T>
float bits_to_float(uint16_t b) {
  T v;
  std::memcpy(&v, &b, 2);
  return static_cast<float>(v);
}

// The dense 16 x 32 A tile one warp's sparse A registers a[lane][8] (16-bit values, registers a0..a3 as
// 8 halves) and metadata words e[lane] describe with selector `sel`, by the PTX rules for 16-bit sparse
// m16n8k32 (mma.sp), which are also the per-warp rules of wgmma.sp m64nNk32 (9.7.15.6.2.1).
template <typename T>
void decode_sparse_a(const uint16_t a[32][8], const uint32_t e[32], int sel, float A[16][32]) {
  for (int r = 0; r < 16; ++r)
    for (int k = 0; k < 32; ++k) A[r][k] = 0.f;
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
      // ::ordered_metadata needs idx0 < idx1 in every nibble an MMA reads (padding rows included);
      // anything else is undefined on the GPU, so the replay refuses it instead of guessing.
      TERSOR_CHECK(nibble_idx0(nib) < nibble_idx1(nib), "sparse24 replay: lane ", lane, " feeds mma.sp the metadata "
                   "nibble ", nib, " for row ", row, ", chunk ", chunk, " (not an ordered pair idx0 < idx1)");
      const int pos = (i & 1) ? static_cast<int>(nib >> 2) : static_cast<int>(nib & 3u);
      A[row][4 * chunk + pos] = bits_to_float<T>(a[lane][i]);
    }
  }
}

// One m16n8k32 sparse MMA, selector `sel`, from the 32 lanes' registers: a[lane][8], b[lane][8] (x values
// of the B fragment), e[lane].
template <typename T>
void mma_sp_replay(const uint16_t a[32][8], const uint16_t b[32][8], const uint32_t e[32], int sel, float c[16][8]) {
  float A[16][32];
  decode_sparse_a<T>(a, e, sel, A);
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
Tensor emulate_impl(const Tensor& x2, const Tensor& values, const Tensor& meta, const Shape& s,
                        const std::optional<Tensor>& bias) {
  const int64_t B = x2.size(0), M = s.M, K = s.K, pairs = K / kColAlign;
  const int ntiles = B <= 8 ? 1 : 2;
  const uint16_t* v = reinterpret_cast<const uint16_t*>(values.const_data_ptr());
  const uint32_t* mw = reinterpret_cast<const uint32_t*>(meta.const_data_ptr<int32_t>());
  const uint16_t* x = reinterpret_cast<const uint16_t*>(x2.const_data_ptr());
  const uint16_t* bp = bias.has_value() ? reinterpret_cast<const uint16_t*>(bias->const_data_ptr()) : nullptr;
  Tensor y = empty({B, M}, x2.scalar_type(), x2.device());
  T* yp = y.mutable_data_ptr<T>();
  tersor::parallel_for(0, M / kRowAlign, 1, [&](int64_t rb0, int64_t rb1) {
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
Tensor emulate_gemm(const Tensor& x2, const Tensor& values, const Tensor& meta, const Shape& s,
                        const std::optional<Tensor>& bias) {
  using G = Sparse24GemmTraits;
  const int64_t N = x2.size(0), M = s.M, K = s.K, row_blocks = M / kRowAlign, ksteps = K / G::kBK;
  const uint16_t* v = reinterpret_cast<const uint16_t*>(values.const_data_ptr());
  const uint32_t* mw = reinterpret_cast<const uint32_t*>(meta.const_data_ptr<int32_t>());
  const uint16_t* x = reinterpret_cast<const uint16_t*>(x2.const_data_ptr());
  const uint16_t* bp = bias.has_value() ? reinterpret_cast<const uint16_t*>(bias->const_data_ptr()) : nullptr;
  Tensor y = empty({N, M}, x2.scalar_type(), x2.device());
  T* yp = y.mutable_data_ptr<T>();
  const int64_t grid_m = (row_blocks + G::kRowBlocks - 1) / G::kRowBlocks, grid_n = (N + G::kBN - 1) / G::kBN;
  tersor::parallel_for(0, grid_m * grid_n, 1, [&](int64_t b0, int64_t b1) {
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
          const int64_t rb = gemm_stage_row_block(rb0 + rbl, row_blocks);
          std::memcpy(vs + c * 16, v + tile_offset(K, rb, 2 * kp) + off * 8, 16);
        }
        for (int t = 0; t < G::kMetaStageBytes / 16; ++t) {
          const int rbl = t >> 3, off = t & 7;
          const int64_t rb = gemm_stage_row_block(rb0 + rbl, row_blocks);
          std::memcpy(ms + t * 16, mw + (rb * (K / kColAlign) + kp) * 32 + off * 4, 16);
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

// The sm90a wgmma.sp GEMM (sparse24_wgmma_sm90.cu) replayed. Every stage image is built by the kernel's
// copy addressing, thread by thread (sm90_x_chunk / sm90_x_store_offset, format tile offsets, clamped
// tail rows); each warp of each warpgroup takes its A registers and metadata where the kernel loads them;
// B of every wgmma is read through the descriptor fields the kernel packs (sm90_b_desc_fields) with the PTX
// canonical K-major rule (sm90_b_read_offset); the product lands in the lanes' accumulator registers by
// the PTX D-fragment rule written out here, and the epilogue stores them as the kernel does
// (sm90_d_pos). Faults for the tests: 1 = selector 0 for both k-tiles, 2 = LBO and SBO swapped in the
// descriptor, 3 = warps take their neighbour's row block (warp ^ 1).
template <typename T>
Tensor emulate_sm90(const Tensor& x2, const Tensor& values, const Tensor& meta, const Shape& s,
                        const std::optional<Tensor>& bias, int64_t fault) {
  using S = Sparse24Sm90Traits;
  const int64_t N = x2.size(0), M = s.M, K = s.K, row_blocks = M / kRowAlign, ksteps = K / S::kBK;
  const uint16_t* v = reinterpret_cast<const uint16_t*>(values.const_data_ptr());
  const uint32_t* mw = reinterpret_cast<const uint32_t*>(meta.const_data_ptr<int32_t>());
  const uint16_t* x = reinterpret_cast<const uint16_t*>(x2.const_data_ptr());
  const uint16_t* bp = bias.has_value() ? reinterpret_cast<const uint16_t*>(bias->const_data_ptr()) : nullptr;
  // NaN-filled: an output no block writes (a launch-order mapping that is not a bijection) shows.
  Tensor y = torch::stable::full({N, M}, std::numeric_limits<double>::quiet_NaN(), x2.scalar_type(), std::nullopt,
                                x2.device());
  T* yp = y.mutable_data_ptr<T>();
  const int64_t grid_m = (row_blocks + S::kRowBlocks - 1) / S::kRowBlocks, grid_n = (N + S::kBN - 1) / S::kBN;
  constexpr int kAccPerThread = S::kNInstr * S::kAccPerInstr;
  tersor::parallel_for(0, grid_m * grid_n, 1, [&](int64_t b0, int64_t b1) {
    std::vector<uint8_t> stage(S::kStageBytes);
    std::vector<float> acc(static_cast<size_t>(S::kThreads) * kAccPerThread);  // [thread][ni][i]
    std::vector<float> C(16 * S::kInstrN), Bm(32 * S::kInstrN);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const TileCoord tile = sm90_block_tile(blk, grid_m, grid_n);  // the kernel's launch order
      const int64_t rb0 = tile.tm * S::kRowBlocks, n0 = tile.tn * S::kBN;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t kp = 0; kp < ksteps; ++kp) {
        for (int t = 0; t < S::kThreads; ++t) {  // load_stage, thread by thread
          for (int i = 0; i < S::kXStageBytes / 16 / S::kThreads; ++i) {
            const XChunk c = sm90_x_chunk(t + i * S::kThreads);
            const int64_t row = n0 + c.n < N ? n0 + c.n : N - 1;
            std::memcpy(stage.data() + S::kXOffset + sm90_x_store_offset(c.n, 8 * c.ch),
                        x + row * K + kp * S::kBK + c.ch * 8, 16);
          }
          for (int i = 0; i < S::kValueStageBytes / 16 / S::kThreads; ++i) {
            const int c = t + i * S::kThreads, rbl = c >> 6, off = c & 63;
            const int64_t rb = gemm_stage_row_block(rb0 + rbl, row_blocks);
            std::memcpy(stage.data() + S::kValueOffset + c * 16, v + tile_offset(K, rb, 2 * kp) + off * 8, 16);
          }
          if (t < S::kMetaStageBytes / 16) {
            const int rbl = t >> 3, off = t & 7;
            const int64_t rb = gemm_stage_row_block(rb0 + rbl, row_blocks);
            std::memcpy(stage.data() + S::kMetaOffset + t * 16, mw + (rb * (K / kColAlign) + kp) * 32 + off * 4, 16);
          }
        }
        for (int wg = 0; wg < S::kWarpgroups; ++wg)
          for (int warp = 0; warp < 4; ++warp) {
            const int rbl = sm90_warp_row_block(wg, fault == 3 ? warp ^ 1 : warp);
            uint16_t a[2][32][8];
            uint32_t e[32];
            for (int lane = 0; lane < 32; ++lane) {
              for (int sel = 0; sel < 2; ++sel)
                std::memcpy(a[sel][lane], stage.data() + S::kValueOffset + sm90_value_offset(rbl, sel, lane), 16);
              std::memcpy(&e[lane], stage.data() + S::kMetaOffset + 4 * sm90_meta_word(rbl, lane), 4);
            }
            for (int ni = 0; ni < S::kNInstr; ++ni) {
              std::fill(C.begin(), C.end(), 0.f);
              for (int sel = 0; sel < 2; ++sel) {
                float A[16][32];
                decode_sparse_a<T>(a[sel], e, fault == 1 ? 0 : sel, A);
                DescFields f = sm90_b_desc_fields(sel, ni);
                if (fault == 2) std::swap(f.lbo, f.sbo);
                for (int k = 0; k < 32; ++k)
                  for (int n = 0; n < S::kInstrN; ++n) {
                    const uint32_t off = sm90_b_read_offset(f, n, k);
                    uint16_t bits = 0;
                    if (off + 2 <= static_cast<uint32_t>(S::kXStageBytes))
                      std::memcpy(&bits, stage.data() + S::kXOffset + off, 2);
                    Bm[k * S::kInstrN + n] = bits_to_float<T>(bits);
                  }
                for (int r = 0; r < 16; ++r)
                  for (int n = 0; n < S::kInstrN; ++n) {
                    float sum = 0.f;
                    for (int k = 0; k < 32; ++k) sum += A[r][k] * Bm[k * S::kInstrN + n];
                    C[r * S::kInstrN + n] += sum;
                  }
              }
              // PTX D fragment of m64nNk32 (f32): d[i] of lane (g, q) in warp w holds row 16 w + g + 8 ((i % 4) / 2),
              // column 8 (i / 4) + 2 q + i % 2.
              for (int lane = 0; lane < 32; ++lane)
                for (int i = 0; i < S::kAccPerInstr; ++i) {
                  const int r = (lane >> 2) + 8 * ((i % 4) / 2), n = 8 * (i / 4) + 2 * (lane % 4) + i % 2;
                  acc[(static_cast<size_t>(wg * 128 + warp * 32 + lane) * S::kNInstr + ni) * S::kAccPerInstr + i] +=
                      C[r * S::kInstrN + n];
                }
            }
          }
      }
      // The kernel's epilogue.
      for (int t = 0; t < S::kThreads; ++t) {
        const int wg = t >> 7, warp = (t >> 5) & 3, lane = t & 31;
        for (int ni = 0; ni < S::kNInstr; ++ni)
          for (int i = 0; i < S::kAccPerInstr; ++i) {
            const DPos d = sm90_d_pos(warp, lane, i);
            const int64_t m = (rb0 + 4 * wg) * kRowAlign + d.m, n = n0 + ni * S::kInstrN + d.n;
            if (m >= M || n >= N) continue;
            float sum = acc[(static_cast<size_t>(t) * S::kNInstr + ni) * S::kAccPerInstr + i];
            if (bp) sum += bits_to_float<T>(bp[m]);
            yp[n * M + m] = static_cast<T>(sum);
          }
      }
    }
  });
  return y;
}

Tensor emulate_sm90_linear(const Tensor& x, const Tensor& values_in, const Tensor& meta_in,
                               const std::optional<Tensor>& bias, int64_t fault) {
  constexpr const char* op = "_sparse24_emulate_sm90_linear";
  TERSOR_CHECK_VALUE(fault >= 0 && fault <= 3, op, ": fault must be 0 (none) or 1..3, got ", fault);
  const Shape s = check_packed(values_in, meta_in, op);
  const std::vector<int64_t> out_shape = check_linear_inputs(x, bias, values_in, s, op);
  const Tensor x2 = as_contiguous(torch::stable::reshape(x, {-1, s.K}));
  const Tensor values = as_contiguous(values_in), meta = as_contiguous(meta_in);
  if (x2.size(0) == 0) return empty(out_shape, x.scalar_type(), x.device());
  std::optional<Tensor> b;
  if (bias.has_value()) b = as_contiguous(*bias);
  const Tensor y = values.scalar_type() == ScalarType::Half ? emulate_sm90<Half>(x2, values, meta, s, b, fault)
                                                            : emulate_sm90<BFloat16>(x2, values, meta, s, b, fault);
  return torch::stable::reshape(y, out_shape);
}

// Every element of a stage's x tile: stored by the copy (each 16-byte chunk once, inside the tile), then
// read back through every wgmma's descriptor fields at the element the PTX layout says it is.
Tensor sm90_layout_check(int64_t fault) {
  using S = Sparse24Sm90Traits;
  TERSOR_CHECK_VALUE(fault == 0 || fault == 1, "_sparse24_sm90_layout_check: fault must be 0 or 1, got ", fault);
  constexpr int kElems = S::kXStageBytes / 2;
  std::vector<int32_t> image(kElems, -1);
  int64_t checked = 0, bad = 0;
  for (int c = 0; c < S::kBN * 8; ++c) {
    const XChunk xc = sm90_x_chunk(c);
    for (int j = 0; j < 8; ++j) {
      const int n = xc.n, k = 8 * xc.ch + j, off = sm90_x_store_offset(n, k);
      ++checked;
      if (n < 0 || n >= S::kBN || k >= S::kBK || off < 0 || off % 2 != 0 || off + 2 > S::kXStageBytes ||
          image[off / 2] != -1) {
        ++bad;
        continue;
      }
      image[off / 2] = n * S::kBK + k;
    }
  }
  for (int ni = 0; ni < S::kNInstr; ++ni)
    for (int sel = 0; sel < 2; ++sel) {
      DescFields f = sm90_b_desc_fields(sel, ni);
      if (fault == 1) std::swap(f.lbo, f.sbo);
      // 16-byte alignment of every field (the descriptor drops the low 4 bits).
      if (f.start % 16 != 0 || f.lbo % 16 != 0 || f.sbo % 16 != 0) ++bad;
      for (int n = 0; n < S::kInstrN; ++n)
        for (int k = 0; k < 32; ++k) {
          const uint32_t off = sm90_b_read_offset(f, n, k);
          ++checked;
          if (off + 2 > static_cast<uint32_t>(S::kXStageBytes) ||
              image[off / 2] != (ni * S::kInstrN + n) * S::kBK + 32 * sel + k)
            ++bad;
        }
    }
  Tensor out = empty({2}, ScalarType::Long, Device(DeviceType::CPU));
  out.mutable_data_ptr<int64_t>()[0] = checked;
  out.mutable_data_ptr<int64_t>()[1] = bad;
  return out;
}

Tensor emulate_cuda_linear(const Tensor& x, const Tensor& values_in, const Tensor& meta_in,
                               const std::optional<Tensor>& bias) {
  constexpr const char* op = "_sparse24_emulate_cuda_linear";
  const Shape s = check_packed(values_in, meta_in, op);
  const std::vector<int64_t> out_shape = check_linear_inputs(x, bias, values_in, s, op);
  const Tensor x2 = as_contiguous(torch::stable::reshape(x, {-1, s.K}));
  const Tensor values = as_contiguous(values_in), meta = as_contiguous(meta_in);
  if (x2.size(0) == 0) return empty(out_shape, x.scalar_type(), x.device());
  std::optional<Tensor> b;
  if (bias.has_value()) b = as_contiguous(*bias);
  const bool half = values.scalar_type() == ScalarType::Half;
  // The kernel the CUDA op picks for this many rows of x.
  const Tensor y = x2.size(0) >= Sparse24GemmTraits::kMinBatch
                       ? (half ? emulate_gemm<Half>(x2, values, meta, s, b) : emulate_gemm<BFloat16>(x2, values, meta, s, b))
                       : (half ? emulate_impl<Half>(x2, values, meta, s, b) : emulate_impl<BFloat16>(x2, values, meta, s, b));
  return torch::stable::reshape(y, out_shape);
}

// The kernels' int64 offsets (sparse24_format.h) and launch limits (sparse24_cuda_traits.h) evaluated on the
// host, so tests can check them at sizes past 2^31 without allocating anything.
std::vector<int64_t> sparse24_index(std::string fn, std::vector<int64_t> a) {
  auto need = [&](size_t n) {
    TERSOR_CHECK_VALUE(a.size() == n, "_sparse24_index: ", fn, " takes ", n, " arguments, got ", a.size());
  };
  if (fn == "value_offset") {  // [K, row, kc]
    need(3);
    return {value_offset(a[0], a[1], a[2])};
  }
  if (fn == "tile_offset") {  // [K, rb, kt]
    need(3);
    return {tile_offset(a[0], a[1], a[2])};
  }
  if (fn == "meta_pos") {  // [K, row, ch] -> [word, shift]
    need(3);
    const MetaPos p = meta_pos(a[0], a[1], a[2]);
    return {p.word, p.shift};
  }
  if (fn == "gemm_max_rows") {
    need(0);
    return {sparse24_gemm_max_rows()};
  }
  if (fn == "sm90_max_rows") {  // [M]
    need(1);
    return {sparse24_sm90_max_rows(a[0])};
  }
  if (fn == "elementwise_blocks") {  // [threads, block_threads]
    need(2);
    return {sparse24_elementwise_blocks(a[0], static_cast<int>(a[1]))};
  }
  TERSOR_CHECK_VALUE(false, "_sparse24_index: unknown function ", fn);
  return {};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(tersor_testing, CPU, m) {
  m.impl("_sparse24_emulate_cuda_linear", TORCH_BOX(&emulate_cuda_linear));
  m.impl("_sparse24_emulate_sm90_linear", TORCH_BOX(&emulate_sm90_linear));
}

// No tensor argument: registered for every dispatch key.
STABLE_TORCH_LIBRARY_IMPL(tersor_testing, CompositeExplicitAutograd, m) {
  m.impl("_sparse24_sm90_layout_check", TORCH_BOX(&sm90_layout_check));
  m.impl("_sparse24_index", TORCH_BOX(&sparse24_index));
}

}  // namespace tersor::sparse24
