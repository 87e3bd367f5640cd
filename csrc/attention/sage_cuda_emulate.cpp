// The sm80/sm89 quantized-attention CUDA kernels replayed on the CPU, lane by lane (op
// _sage_emulate_cuda_attention), so their fragment layouts, shared-memory addressing, scale indexing,
// masking and warp reductions are tested without a GPU. Replayed: the four prologue kernels of
// sage_quant_cuda.cu (K mean, INT8 K / Q per fragment group with the LSE correction, V^T in e4m3 with the
// token permutation or in 16 bits) into buffers laid out as sage_cuda_glue.cpp allocates them, then
// sage_attn_kernel: every CTA's shared memory filled by the same 16-byte cp.async chunks (double-buffered
// stages), per-lane register arrays loaded through the kernel's sage_cuda_layout.h offsets, each mma.sync
// assembled from the 32 lanes' registers by the PTX fragment rules (written out here independently, as the
// "hardware"), quad shuffles over the lanes, and the kernel's fp32 operation order (FMA contractions nvcc
// makes included).
//
// What is not bit-identical to the GPU (docs/research/sage_attention.md, "CPU replay"): ex2.approx.ftz is
// replayed as exp2f with flushed subnormal results (ex2.approx is within 2 ulp); log2f; the summation order
// inside one FP8 / 16-bit MMA (replayed as the exact sum rounded once; the INT8 MMA is exact). The FMAs
// replayed are those nvcc 13.0 emits in the PTX (checked: the q . k_mean partials, the LSE); it also fuses one
// row-sum rescale (row class mt = 1, hh = 1: l * alpha + first P pair) into an FMA, which is not replayed
// (a sub-ulp difference of l, below ex2.approx's).
//
// `fault` (tests only) injects a deliberate layout bug on the kernel side so tests can show the replay
// catches it: 1 swaps Q A-fragment registers 1 and 2, 2 stores FP8 V^T without the token permutation,
// 3 swaps the n-tiles of P's A fragment registers (r ^ 2), 4 uses K scale group t ^ 1, 5 packs INT4 K with
// the even channel in the high nibble, 6 adds the Q-smoothing bias of the pair's other key (column 2t + 1 - e),
// 7 (block_mask) prefetches the next tile (tile + 1) instead of the next live one.
//
// INT4 (qk_bits 4) and Q smoothing (smooth_q) are replayed too: the packed-nibble prologue, the block mean and
// q_bias kernels, mma.m16n8k64.s4 from its own PTX fragment rules, and the bias added (rounded, no FMA) to
// the dequantized scores.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "attention/sage_cuda_layout.h"
#include "attention/sage_cuda_traits.h"
#include "attention/sage_format.h"
#include "attention/sage_glue.h"
#include "attention/sage_sm90_layout.h"
#include "attention/sage_sm90_traits.h"

namespace tersor::attention {
namespace {

constexpr int kLanes = 32;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ---- 16-bit values as the kernels see them (raw bits in buffers) ----
template <bool kBf16>
float bits16_to_float(uint16_t b) {
  if constexpr (kBf16)
    return static_cast<float>(BFloat16(b, BFloat16::from_bits()));
  else
    return static_cast<float>(Half(b, Half::from_bits()));
}
// Round to nearest even, as __floats2half2_rn / __floats2bfloat162_rn.
template <bool kBf16>
uint16_t float_to_bits16(float x) {
  if constexpr (kBf16)
    return BFloat16(x).x;
  else
    return Half(x).x;
}

// ex2.approx.ftz.f32: exp2 with subnormal inputs and results flushed to zero (the approximation's <= 2 ulp
// error is not replayed).
float ex2_ftz(float x) {
  if (std::fpclassify(x) == FP_SUBNORMAL) x = 0.f;
  const float y = std::exp2(x);
  return y < std::numeric_limits<float>::min() ? 0.f : y;
}

// __shfl_xor_sync butterfly over the lanes: v[l] = op(v[l], v[l ^ mask]) for every lane at once.
template <typename Op>
void shfl_xor_apply(float v[kLanes], int mask, Op op) {
  float w[kLanes];
  for (int l = 0; l < kLanes; ++l) w[l] = op(v[l], v[l ^ mask]);
  std::memcpy(v, w, sizeof(w));
}

// ---- the hardware: mma.sync fragment rules (PTX ISA), independent of sage_cuda_layout.h ----
// m16n8k32 .s8 / .e4m3: A reg r of lane (g, t) = bytes of row g (+8 if r is odd), k = 4t + x (+16 if r >= 2);
// B reg j = column g, k = 4t + x + 16j; C element i = row g (+8 if i >= 2), column 2t + (i & 1).
template <typename Elem, typename Decode>
void hw_gather_k32(const uint32_t a[kLanes][4], const uint32_t b[kLanes][2], Elem A[16][32], Elem B[32][8],
                   Decode decode) {
  for (int lane = 0; lane < kLanes; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int r = 0; r < 4; ++r)
      for (int x = 0; x < 4; ++x)
        A[g + ((r & 1) ? 8 : 0)][4 * t + x + ((r & 2) ? 16 : 0)] = decode(static_cast<uint8_t>(a[lane][r] >> (8 * x)));
    for (int j = 0; j < 2; ++j)
      for (int x = 0; x < 4; ++x) B[4 * t + x + 16 * j][g] = decode(static_cast<uint8_t>(b[lane][j] >> (8 * x)));
  }
}

// C += A B for the m16n8 integer MMAs (exact): C register i of lane (g, t) is row g (+8 for i >= 2), column
// 2t + (i & 1), whatever the k depth.
template <int K>
void hw_accumulate_s32(int32_t c[kLanes][4], const int32_t (&A)[16][K], const int32_t (&B)[K][8]) {
  for (int lane = 0; lane < kLanes; ++lane)
    for (int i = 0; i < 4; ++i) {
      const int row = lane / 4 + (i >= 2 ? 8 : 0), col = 2 * (lane % 4) + (i & 1);
      int32_t s = 0;
      for (int k = 0; k < K; ++k) s += A[row][k] * B[k][col];
      c[lane][i] += s;
    }
}

// D = A B + C, s8 x s8 -> s32 (exact).
void hw_mma_m16n8k32_s8(int32_t c[kLanes][4], const uint32_t a[kLanes][4], const uint32_t b[kLanes][2]) {
  int32_t A[16][32], B[32][8];
  hw_gather_k32(a, b, A, B, [](uint8_t x) { return static_cast<int32_t>(static_cast<int8_t>(x)); });
  hw_accumulate_s32<32>(c, A, B);
}

// D = A B + C, m16n8k64 .s4 (PTX ISA "Matrix Fragments for mma.m16n8k64"): A reg r of lane (g, t) holds 8
// signed nibbles, nibble x (bits 4x..4x+3) = row g (+8 if r is odd), k = 8t + x (+32 if r >= 2); B reg j =
// column g, k = 8t + x + 32j; C as m16n8k32. Exact.
void hw_mma_m16n8k64_s4(int32_t c[kLanes][4], const uint32_t a[kLanes][4], const uint32_t b[kLanes][2]) {
  auto nib = [](uint32_t w, int x) {
    const int v = static_cast<int>((w >> (4 * x)) & 15u);
    return v >= 8 ? v - 16 : v;
  };
  int32_t A[16][64], B[64][8];
  for (int lane = 0; lane < kLanes; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int r = 0; r < 4; ++r)
      for (int x = 0; x < 8; ++x) A[g + ((r & 1) ? 8 : 0)][8 * t + x + ((r & 2) ? 32 : 0)] = nib(a[lane][r], x);
    for (int j = 0; j < 2; ++j)
      for (int x = 0; x < 8; ++x) B[8 * t + x + 32 * j][g] = nib(b[lane][j], x);
  }
  hw_accumulate_s32<64>(c, A, B);
}

// mma_m16n8k32_e4m3_add_f32: P = A B with a zero accumulator (e4m3 products are exact in fp64 and so is the
// sum of 32 of them; the hardware's internal rounding differs slightly), then acc += P in fp32.
void hw_mma_m16n8k32_e4m3_add(float c[kLanes][4], const uint32_t a[kLanes][4], const uint32_t b[kLanes][2]) {
  double A[16][32], B[32][8];
  hw_gather_k32(a, b, A, B, [](uint8_t x) { return static_cast<double>(e4m3_to_float(x)); });
  for (int lane = 0; lane < kLanes; ++lane)
    for (int i = 0; i < 4; ++i) {
      const int row = lane / 4 + (i >= 2 ? 8 : 0), col = 2 * (lane % 4) + (i & 1);
      double s = 0;
      for (int k = 0; k < 32; ++k) s += A[row][k] * B[k][col];
      c[lane][i] += static_cast<float>(s);
    }
}

// D = A B + C, m16n8k16 f16/bf16 -> f32: A reg r = row g (+8 if r odd), k = 2t + x (+8 if r >= 2), x < 2 (lo
// half first); B reg j = column g, k = 2t + x + 8j. Replayed as the exact sum (with C) rounded once.
template <bool kBf16>
void hw_mma_m16n8k16(float c[kLanes][4], const uint32_t a[kLanes][4], const uint32_t b[kLanes][2]) {
  double A[16][16], B[16][8];
  for (int lane = 0; lane < kLanes; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int r = 0; r < 4; ++r)
      for (int x = 0; x < 2; ++x)
        A[g + ((r & 1) ? 8 : 0)][2 * t + x + ((r & 2) ? 8 : 0)] =
            bits16_to_float<kBf16>(static_cast<uint16_t>(a[lane][r] >> (16 * x)));
    for (int j = 0; j < 2; ++j)
      for (int x = 0; x < 2; ++x)
        B[2 * t + x + 8 * j][g] = bits16_to_float<kBf16>(static_cast<uint16_t>(b[lane][j] >> (16 * x)));
  }
  for (int lane = 0; lane < kLanes; ++lane)
    for (int i = 0; i < 4; ++i) {
      const int row = lane / 4 + (i >= 2 ? 8 : 0), col = 2 * (lane % 4) + (i & 1);
      double s = c[lane][i];
      for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
      c[lane][i] = static_cast<float>(s);
    }
}

uint32_t lds32(const uint8_t* p) {
  uint32_t w;
  std::memcpy(&w, p, 4);
  return w;
}

// ---- the prologue (sage_quant_cuda.cu) ----
// The fields of SageDims (sage_cuda.h pulls cuda_runtime.h, absent from CPU-only builds).
struct SageDims {
  int64_t batch, heads_q, heads_kv, len_q, len_k, head_dim;
  int64_t len_q_pad;  // multiple of 128 (CTA_Q)
  int64_t len_k_pad;  // multiple of 64 (CTA_K)
};

struct Buffers {
  SageDims d;
  int bits = 8;           // Q / K codes: INT8, or INT4 packed two per byte
  bool smooth_q = false;
  std::vector<float> k_mean, q_scale, lse_corr, k_scale, v_scale;
  std::vector<float> q_mean, q_bias;  // smooth_q: [B, Hq, Lq_pad / 32, D], [B, Hq, Lq_pad / 32, Lk_pad]
  std::vector<uint8_t> q_int, k_int;  // rows of D * bits / 8 bytes
  std::vector<uint8_t> v_t;  // e4m3 codes or 16-bit bits (little endian), [B, Hkv, D, Lk_pad]
  SageBlockMask bm;          // the block mask (none: dense), read by the kernels' next_live_tile
  KeyMask mask{};            // causal and sliding window (sage_format.h visible_keys)
  SageKeyPadding key_pad;    // the key padding mask (none: every key takes part)
};

// q/k/v: fp32 copies of the 16-bit inputs (exact), contiguous [B, H, L, D].
template <bool kBf16>
void replay_prologue(const SageCall& c, const float* q, const float* k, const float* v, const Tensor& v16,
                     bool fp8, int fault, Buffers& bf) {
  using Tr = SageTraitsSm8x;
  const SageDims& d = bf.d;
  const int D = static_cast<int>(d.head_dim);
  const int bits = bf.bits, row_bytes = D * bits / 8;
  const float qk_mul = static_cast<float>(c.scale) * kLog2e, scale = static_cast<float>(c.scale);
  const int64_t n_kv = d.batch * d.heads_kv, n_q = d.batch * d.heads_q;
  const int64_t q_blocks = d.len_q_pad / Tr::kWarpQ;
  bf.k_mean.assign(n_kv * D, 0.f);
  bf.k_int.assign(n_kv * d.len_k_pad * row_bytes, 0);
  bf.k_scale.assign(n_kv * (d.len_k_pad / Tr::kCtaK * Tr::kKGroupsPerTile), 0.f);
  bf.q_int.assign(n_q * d.len_q_pad * row_bytes, 0);
  bf.q_mean.assign(bf.smooth_q ? n_q * q_blocks * D : 0, 0.f);
  bf.q_bias.assign(bf.smooth_q ? n_q * q_blocks * d.len_k_pad : 0, 0.f);
  bf.q_scale.assign(n_q * (d.len_q_pad / Tr::kWarpQ * Tr::kQGroupsPerWarp), 0.f);
  bf.lse_corr.assign(n_q * d.len_q, 0.f);
  bf.v_scale.assign(n_kv * (fp8 ? D : 1), 0.f);
  bf.v_t.assign(n_kv * D * d.len_k_pad * (fp8 ? 1 : 2), 0);
  const uint16_t* v_bits = reinterpret_cast<const uint16_t*>(v16.const_data_ptr());

  tersor::parallel_for(0, n_kv, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t bh = b0; bh < b1; ++bh) {
      const float* kh = k + bh * d.len_k * D;
      const float* vh = v + bh * d.len_k * D;
      // kv_stats_partial_kernel + kv_stats_final_kernel: fp64 chunk sums in token order, then in chunk order.
      for (int ch = 0; ch < D; ++ch)
        bf.k_mean[bh * D + ch] = c.smooth_k ? chunked_channel_mean(kh + ch, d.len_k, D) : 0.f;
      const float* mean = bf.k_mean.data() + bh * D;
      // quant_k_kernel: block (tile), warp t = K group t, lanes strided over the group's 16 x D values.
      for (int64_t tile = 0; tile < d.len_k_pad / Tr::kCtaK; ++tile)
        for (int t = 0; t < 4; ++t) {
          const int64_t tile0 = tile * Tr::kCtaK;
          float amax[kLanes];
          for (int lane = 0; lane < kLanes; ++lane) {
            amax[lane] = 0.f;
            for (int idx = lane; idx < 16 * D; idx += kLanes) {
              const int64_t j = k_group_token(tile0, t, idx / D);
              const int ch = idx % D;
              if (j < d.len_k) amax[lane] = std::fmax(amax[lane], std::fabs(kh[j * D + ch] - mean[ch]));
            }
          }
          for (int o = 16; o > 0; o >>= 1) shfl_xor_apply(amax, o, [](float x, float y) { return std::fmax(x, y); });
          const IntQuantParams qp = int_quant_params(amax[0], bits);
          auto code_of = [&](int64_t j, int ch) {
            return j < d.len_k ? quantize_int(kh[j * D + ch] - mean[ch], qp.inv_scale, bits) : 0;
          };
          uint8_t* out = bf.k_int.data() + bh * d.len_k_pad * row_bytes;
          for (int idx = 0; idx < 16 * row_bytes; ++idx) {
            const int64_t j = k_group_token(tile0, t, idx / row_bytes);
            const int byte = idx % row_bytes;
            if (bits == 4) {
              const int lo = code_of(j, 2 * byte), hi = code_of(j, 2 * byte + 1);
              out[j * row_bytes + byte] = fault == 5 ? pack_int4_pair(hi, lo) : pack_int4_pair(lo, hi);
            } else {
              out[j * row_bytes + byte] = static_cast<uint8_t>(static_cast<int8_t>(code_of(j, byte)));
            }
          }
          bf.k_scale[k_scale_index(bh, d.len_k_pad, tile, t)] = qp.scale;
        }
      // quant_v_kernel: thread c writes row c of V^T.
      for (int ch = 0; ch < D; ++ch) {
        if (fp8) {
          float amax = 0.f;
          for (int64_t j = 0; j < d.len_k; ++j) amax = std::fmax(amax, std::fabs(vh[j * D + ch]));
          const IntQuantParams qp = fp8_channel_params(amax);
          bf.v_scale[bh * D + ch] = qp.scale;
          uint8_t* out = bf.v_t.data() + (bh * D + ch) * d.len_k_pad;
          for (int64_t p = 0; p < d.len_k_pad; ++p) {
            const int64_t j = fault == 2 ? p : v_fp8_position_token(p);
            out[p] = j < d.len_k ? float_to_e4m3(vh[j * D + ch] * qp.inv_scale) : 0;
          }
        } else {
          uint8_t* out = bf.v_t.data() + (bh * D + ch) * d.len_k_pad * 2;
          for (int64_t p = 0; p < d.len_k_pad; ++p) {
            const uint16_t x = p < d.len_k ? v_bits[(bh * d.len_k + p) * D + ch] : float_to_bits16<kBf16>(0.f);
            std::memcpy(out + 2 * p, &x, 2);
          }
        }
      }
    }
  });

  tersor::parallel_for(0, n_q, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t bh = b0; bh < b1; ++bh) {
      const int64_t b = bh / d.heads_q, h = bh % d.heads_q;
      const int64_t bkv = b * d.heads_kv + h / (d.heads_q / d.heads_kv);
      const float* qh = q + bh * d.len_q * D;
      const float* mean = bf.k_mean.data() + bkv * D;
      // quant_q_kernel: block of 32 rows, warp g = Q group g (rows g + 8i), lanes strided over channels.
      for (int64_t blk = 0; blk < q_blocks; ++blk) {
        const int64_t block0 = blk * Tr::kWarpQ;
        // smooth_q: thread c, fp64 sum of the rounded Q * qk_mul over the block's rows < Lq, rounded once.
        float* q_mean = bf.smooth_q ? bf.q_mean.data() + q_mean_index(bh, d.len_q_pad, block0, D, 0) : nullptr;
        if (bf.smooth_q)
          for (int ch = 0; ch < D; ++ch) {
            double s = 0;
            int64_t n = 0;
            for (int64_t r = block0; r < block0 + Tr::kWarpQ && r < d.len_q; ++r, ++n) s += qh[r * D + ch] * qk_mul;
            q_mean[ch] = n > 0 ? static_cast<float>(s / static_cast<double>(n)) : 0.f;
          }
        auto value = [&](int64_t r, int ch) {
          const float x = qh[r * D + ch] * qk_mul;
          return bf.smooth_q ? x - q_mean[ch] : x;
        };
        for (int g = 0; g < 8; ++g) {
          float amax[kLanes] = {};
          for (int i = 0; i < 4; ++i) {
            const int64_t r = q_group_row(block0, g, i);
            if (r >= d.len_q) continue;
            float dot[kLanes];
            for (int lane = 0; lane < kLanes; ++lane) {
              dot[lane] = 0.f;
              for (int ch = lane; ch < D; ch += kLanes) {
                const float x = qh[r * D + ch];
                amax[lane] = std::fmax(amax[lane], std::fabs(value(r, ch)));
                dot[lane] = std::fma(x, mean[ch], dot[lane]);  // nvcc contracts dot += x * mean
              }
            }
            for (int o = 16; o > 0; o >>= 1) shfl_xor_apply(dot, o, [](float x, float y) { return x + y; });
            bf.lse_corr[bh * d.len_q + r] = c.smooth_k ? dot[0] * scale : 0.f;
          }
          for (int o = 16; o > 0; o >>= 1) shfl_xor_apply(amax, o, [](float x, float y) { return std::fmax(x, y); });
          const IntQuantParams qp = int_quant_params(amax[0], bits);
          auto code_of = [&](int64_t r, int ch) { return r < d.len_q ? quantize_int(value(r, ch), qp.inv_scale, bits) : 0; };
          uint8_t* out = bf.q_int.data() + bh * d.len_q_pad * row_bytes;
          for (int i = 0; i < 4; ++i) {
            const int64_t r = q_group_row(block0, g, i);
            for (int byte = 0; byte < row_bytes; ++byte)
              out[r * row_bytes + byte] = bits == 4 ? pack_int4_pair(code_of(r, 2 * byte), code_of(r, 2 * byte + 1))
                                                    : static_cast<uint8_t>(static_cast<int8_t>(code_of(r, byte)));
          }
          bf.q_scale[q_scale_index(bh, d.len_q_pad, block0, g)] = qp.scale;
        }
        // q_bias_kernel: thread j, channel order, each step rounded.
        if (bf.smooth_q) {
          const float* kh = k + bkv * d.len_k * D;
          const float* k_mean = bf.k_mean.data() + bkv * D;
          float* out = bf.q_bias.data() + q_bias_index(bh, d.len_q_pad, d.len_k_pad, block0, 0);
          for (int64_t j = 0; j < d.len_k_pad; ++j) {
            float s = 0.f;
            if (j < d.len_k)
              for (int ch = 0; ch < D; ++ch) {
                const float ks = kh[j * D + ch] - k_mean[ch];
                const float prod = q_mean[ch] * ks;
                s = s + prod;
              }
            out[j] = s;
          }
        }
      }
    }
  });
}

// ---- sage_attn_kernel, one CTA ----
template <int D, bool FP8, bool kBf16, int BITS>
void replay_cta(const Buffers& bf, int fault, int64_t bh, int64_t cta, uint16_t* out, float* lse,
                std::vector<uint8_t>& smem) {
  using Tr = SageAttnSm8xKernelTraits<D, FP8, BITS>;
  constexpr int kRowBytes = Tr::kQKRowDataBytes;
  const SageDims& d = bf.d;
  // Poison: a fragment read from a byte no cp.async wrote shows up as garbage.
  smem.assign(Tr::kSmemBytes, 0x5A);
  uint8_t* q_s = smem.data();
  uint8_t* k_s = q_s + Tr::kQBytes;
  uint8_t* v_s = k_s + Tr::kStages * Tr::kKBytes;

  const int64_t b = bh / d.heads_q, h = bh % d.heads_q;
  const int64_t bkv = b * d.heads_kv + h / (d.heads_q / d.heads_kv);
  const int64_t r0 = cta * Tr::kCtaQ;
  const int64_t last_row = std::min(r0 + Tr::kCtaQ - 1, d.len_q - 1);
  const TileSpan span = visible_tiles(bf.mask, r0, last_row, d.len_q, d.len_k, Tr::kCtaK);
  const int n_tiles = span.end;
  const uint8_t* mask_row = bf.bm.row(b, h, cta);
  const uint8_t* q_g = bf.q_int.data() + qk_row_offset(bh, d.len_q_pad, r0, kRowBytes);
  const uint8_t* k_g = bf.k_int.data() + qk_row_offset(bkv, d.len_k_pad, 0, kRowBytes);
  const uint8_t* v_g = bf.v_t.data() + v_t_offset(bkv, D, d.len_k_pad, 0, 0, Tr::kVElemBytes);

  constexpr int kRowChunks = kRowBytes / 16;
  for (int i = 0; i < Tr::kCtaQ * kRowChunks; ++i) {  // all threads' chunks
    const int row = chunk_row(i, kRowChunks), cb = chunk_col_byte(i, kRowChunks);
    std::memcpy(q_s + row * Tr::kQKRowBytes + cb, q_g + row * kRowBytes + cb, 16);
  }
  auto load_kv = [&](int tile, int stage) {
    uint8_t* ks = k_s + stage * Tr::kKBytes;
    const uint8_t* ksrc = k_g + qk_row_offset(0, 0, static_cast<int64_t>(tile) * Tr::kCtaK, kRowBytes);
    for (int i = 0; i < Tr::kCtaK * kRowChunks; ++i) {
      const int row = chunk_row(i, kRowChunks), cb = chunk_col_byte(i, kRowChunks);
      std::memcpy(ks + row * Tr::kQKRowBytes + cb, ksrc + row * kRowBytes + cb, 16);
    }
    uint8_t* vs = v_s + stage * Tr::kVBytes;
    constexpr int kVChunks = Tr::kCtaK * Tr::kVElemBytes / 16;
    for (int i = 0; i < D * kVChunks; ++i) {
      const int ch = chunk_row(i, kVChunks), cb = chunk_col_byte(i, kVChunks);
      std::memcpy(vs + ch * Tr::kVRowBytes + cb,
                  v_g + v_t_offset(0, D, d.len_k_pad, ch, static_cast<int64_t>(tile) * Tr::kCtaK, Tr::kVElemBytes) + cb,
                  16);
    }
  };
  // The kernel's walk over the live tiles (tiles of masked key blocks are never loaded).
  int tile = next_live_tile(mask_row, span.first, n_tiles, Tr::kCtaK);
  if (tile < n_tiles) load_kv(tile, 0);
  constexpr float kPOff = FP8 ? kFp8POffset : 0.f;
  const float* k_sc = bf.k_scale.data() + k_scale_index(bkv, d.len_k_pad, 0, 0);

  // Per-lane registers of the 4 warps ([warp][lane]...). The warps share only shared memory, and the
  // kernel's __syncthreads sit between tiles, so running the warps one after another per tile is exact.
  struct Lane {
    float o[Tr::kMTiles][Tr::kDTiles][4];
    float m[Tr::kMTiles][2], l[Tr::kMTiles][2];
    int lo[Tr::kMTiles][2], hi[Tr::kMTiles][2];  // visible keys [lo, hi) of the lane's rows
    float q_sc;
  };
  std::vector<Lane> lanes(Tr::kCtaWarps * kLanes);
  for (int warp = 0; warp < Tr::kCtaWarps; ++warp)
    for (int lane = 0; lane < kLanes; ++lane) {
      Lane& L = lanes[warp * kLanes + lane];
      const int g = lane / 4;
      const int64_t row_base = r0 + warp * Tr::kWarpRows;
      L.q_sc = bf.q_scale[q_scale_index(bh, d.len_q_pad, row_base, g)];
      for (int mt = 0; mt < Tr::kMTiles; ++mt)
        for (int hh = 0; hh < 2; ++hh) {
          const KeySpan ks = visible_keys(bf.mask, row_base + mt * 16 + frag_c_row(g, 2 * hh), d.len_q, d.len_k);
          L.lo[mt][hh] = static_cast<int>(ks.lo);
          L.hi[mt][hh] = static_cast<int>(ks.hi);
          L.m[mt][hh] = kNegInf;
          L.l[mt][hh] = 0.f;
        }
      for (int mt = 0; mt < Tr::kMTiles; ++mt)
        for (int dn = 0; dn < Tr::kDTiles; ++dn)
          for (int i = 0; i < 4; ++i) L.o[mt][dn][i] = 0.f;
    }

  static thread_local std::vector<float> s_buf;
  s_buf.resize(kLanes * 2 * 8 * 4);
  auto S = [&](int lane, int mt, int nt, int i) -> float& { return s_buf[((lane * 2 + mt) * 8 + nt) * 4 + i]; };

  for (int it = 0; tile < n_tiles; ++it) {
    const int stage = it & 1;
    const int next = next_live_tile(mask_row, tile + 1, n_tiles, Tr::kCtaK);
    if (next < n_tiles) load_kv(fault == 7 ? tile + 1 : next, stage ^ 1);
    const uint8_t* ks = k_s + stage * Tr::kKBytes;
    const uint8_t* vs = v_s + stage * Tr::kVBytes;
    for (int warp = 0; warp < Tr::kCtaWarps; ++warp) {
      Lane* W = lanes.data() + warp * kLanes;
      // ---- S = Q K^T ----
      int32_t acc[Tr::kMTiles][8][kLanes][4] = {};
      for (int kk = 0; kk < Tr::kQKSteps; ++kk) {
        uint32_t af[Tr::kMTiles][kLanes][4];
        for (int lane = 0; lane < kLanes; ++lane)
          for (int mt = 0; mt < Tr::kMTiles; ++mt)
            for (int r = 0; r < 4; ++r) {
              const int rr = fault == 1 && (r == 1 || r == 2) ? 3 - r : r;
              af[mt][lane][r] = lds32(q_s + q_frag_offset<Tr>(warp, mt, lane / 4, lane % 4, kk, rr));
            }
        for (int nt = 0; nt < 8; ++nt) {
          uint32_t bfr[kLanes][2];
          for (int lane = 0; lane < kLanes; ++lane)
            for (int j = 0; j < 2; ++j) bfr[lane][j] = lds32(ks + k_frag_offset<Tr>(nt, lane / 4, lane % 4, kk, j));
          for (int mt = 0; mt < Tr::kMTiles; ++mt) {
            if constexpr (BITS == 4)
              hw_mma_m16n8k64_s4(acc[mt][nt], af[mt], bfr);
            else
              hw_mma_m16n8k32_s8(acc[mt][nt], af[mt], bfr);
          }
        }
      }
      const int tile0 = tile * Tr::kCtaK;
      const float* q_bias =
          bf.smooth_q ? bf.q_bias.data() + q_bias_index(bh, d.len_q_pad, d.len_k_pad, r0 + warp * Tr::kWarpRows, 0) : nullptr;
      for (int lane = 0; lane < kLanes; ++lane) {
        const int t = lane % 4;
        const float dq = W[lane].q_sc * k_sc[k_scale_in_slice(tile, fault == 4 ? t ^ 1 : t)];
        for (int mt = 0; mt < Tr::kMTiles; ++mt)
          for (int hh = 0; hh < 2; ++hh) {
            const int lim = W[lane].hi[mt][hh] - tile0 - frag_c_col(t, 0);
            const int lo_lim = W[lane].lo[mt][hh] - tile0 - frag_c_col(t, 0);
            const uint8_t* key_pad = bf.key_pad.row(b, d.len_k);
            for (int nt = 0; nt < 8; ++nt)
              for (int e = 0; e < 2; ++e)
              {
                float sv = static_cast<float>(acc[mt][nt][lane][2 * hh + e]) * dq;
                if (q_bias) sv = sv + q_bias[tile0 + nt * 8 + frag_c_col(t, fault == 6 ? 1 - e : e)];
                const bool vis = nt * 8 + e < lim && nt * 8 + e >= lo_lim &&
                                 (key_pad == nullptr || key_pad[tile0 + frag_c_col(t, 0) + nt * 8 + e] != 0);
                S(lane, mt, nt, 2 * hh + e) = vis ? sv : kNegInf;
              }
          }
      }
      // ---- online softmax: a row lives in the 4 lanes of a quad ----
      for (int mt = 0; mt < Tr::kMTiles; ++mt)
        for (int hh = 0; hh < 2; ++hh) {
          float mx[kLanes];
          for (int lane = 0; lane < kLanes; ++lane) {
            mx[lane] = kNegInf;
            for (int nt = 0; nt < 8; ++nt)
              mx[lane] = std::fmax(mx[lane], std::fmax(S(lane, mt, nt, 2 * hh), S(lane, mt, nt, 2 * hh + 1)));
          }
          shfl_xor_apply(mx, 1, [](float x, float y) { return std::fmax(x, y); });
          shfl_xor_apply(mx, 2, [](float x, float y) { return std::fmax(x, y); });
          for (int lane = 0; lane < kLanes; ++lane) {
            Lane& L = W[lane];
            const float m_new = std::fmax(L.m[mt][hh], mx[lane]);
            const bool none = m_new == kNegInf;
            const float alpha = none ? 1.f : ex2_ftz(L.m[mt][hh] - m_new);
            const float m_shift = none ? 0.f : m_new - kPOff;
            L.m[mt][hh] = m_new;
            L.l[mt][hh] *= alpha;
            for (int dn = 0; dn < Tr::kDTiles; ++dn) L.o[mt][dn][2 * hh] *= alpha, L.o[mt][dn][2 * hh + 1] *= alpha;
            for (int nt = 0; nt < 8; ++nt)
              for (int e = 0; e < 2; ++e) S(lane, mt, nt, 2 * hh + e) = ex2_ftz(S(lane, mt, nt, 2 * hh + e) - m_shift);
          }
        }
      // ---- O += P V ----
      constexpr int kPSteps = FP8 ? 2 : 4;
      uint32_t pa[Tr::kMTiles][kPSteps][kLanes][4];
      for (int lane = 0; lane < kLanes; ++lane) {
        Lane& L = W[lane];
        for (int mt = 0; mt < Tr::kMTiles; ++mt)
          for (int kk = 0; kk < kPSteps; ++kk)
            for (int r = 0; r < 4; ++r) {
              const int rr = fault == 3 ? r ^ 2 : r;
              const int e = p_frag_elem(rr);
              if constexpr (FP8) {
                const int nt = p8_frag_ntile(kk, rr);
                const uint8_t c0 = float_to_e4m3(S(lane, mt, nt, e)), c1 = float_to_e4m3(S(lane, mt, nt, e + 1));
                const uint8_t c2 = float_to_e4m3(S(lane, mt, nt + 1, e)), c3 = float_to_e4m3(S(lane, mt, nt + 1, e + 1));
                pa[mt][kk][lane][r] = uint32_t{c0} | (uint32_t{c1} << 8) | (uint32_t{c2} << 16) | (uint32_t{c3} << 24);
                // e4m3 -> f16 is exact; (lo + hi) + (lo + hi) in fp32 as the kernel.
                L.l[mt][r & 1] += (e4m3_to_float(c0) + e4m3_to_float(c1)) + (e4m3_to_float(c2) + e4m3_to_float(c3));
              } else {
                const int nt = p16_frag_ntile(kk, rr);
                const uint16_t lo = float_to_bits16<kBf16>(S(lane, mt, nt, e));
                const uint16_t hi = float_to_bits16<kBf16>(S(lane, mt, nt, e + 1));
                pa[mt][kk][lane][r] = uint32_t{lo} | (uint32_t{hi} << 16);
                L.l[mt][r & 1] += bits16_to_float<kBf16>(lo) + bits16_to_float<kBf16>(hi);
              }
            }
      }
      for (int kk = 0; kk < kPSteps; ++kk)
        for (int dn = 0; dn < Tr::kDTiles; ++dn) {
          uint32_t bfr[kLanes][2];
          for (int lane = 0; lane < kLanes; ++lane)
            for (int j = 0; j < 2; ++j) bfr[lane][j] = lds32(vs + v_frag_offset<Tr>(dn, lane / 4, lane % 4, kk, j));
          for (int mt = 0; mt < Tr::kMTiles; ++mt) {
            float c[kLanes][4];
            for (int lane = 0; lane < kLanes; ++lane) std::memcpy(c[lane], W[lane].o[mt][dn], sizeof(c[lane]));
            if constexpr (FP8)
              hw_mma_m16n8k32_e4m3_add(c, pa[mt][kk], bfr);
            else
              hw_mma_m16n8k16<kBf16>(c, pa[mt][kk], bfr);
            for (int lane = 0; lane < kLanes; ++lane) std::memcpy(W[lane].o[mt][dn], c[lane], sizeof(c[lane]));
          }
        }
    }
    tile = next;
  }

  // ---- epilogue ----
  const float* v_sc = bf.v_scale.data() + bkv * D;
  for (int warp = 0; warp < Tr::kCtaWarps; ++warp) {
    Lane* W = lanes.data() + warp * kLanes;
    const int64_t row_base = r0 + warp * Tr::kWarpRows;
    for (int mt = 0; mt < Tr::kMTiles; ++mt)
      for (int hh = 0; hh < 2; ++hh) {
        float lsum[kLanes];
        for (int lane = 0; lane < kLanes; ++lane) lsum[lane] = W[lane].l[mt][hh];
        shfl_xor_apply(lsum, 1, [](float x, float y) { return x + y; });
        shfl_xor_apply(lsum, 2, [](float x, float y) { return x + y; });
        for (int lane = 0; lane < kLanes; ++lane) {
          const int g = lane / 4, t = lane % 4;
          const int64_t row = row_base + mt * 16 + frag_c_row(g, 2 * hh);
          if (row >= d.len_q) continue;
          const bool dead = !(lsum[lane] > 0.f);
          const float inv_l = dead ? 0.f : 1.f / lsum[lane];
          uint16_t* orow = out + out_row_offset(bh, d.len_q, row, D);
          for (int dn = 0; dn < Tr::kDTiles; ++dn) {
            const int c = dn * 8 + frag_c_col(t, 0);
            float v0 = W[lane].o[mt][dn][2 * hh], v1 = W[lane].o[mt][dn][2 * hh + 1];
            if constexpr (FP8) {
              v0 = v0 * v_sc[c] * inv_l;
              v1 = v1 * v_sc[c + 1] * inv_l;
            } else {
              v0 *= inv_l;
              v1 *= inv_l;
            }
            if (dead) v0 = v1 = 0.f;
            orow[c] = float_to_bits16<kBf16>(v0);
            orow[c + 1] = float_to_bits16<kBf16>(v1);
          }
          if (t == 0)
            // nvcc contracts (...) * ln2 + corr into one FMA.
            lse[out_row_offset(bh, d.len_q, row, 1)] =
                dead ? kNegInf
                     : std::fma(W[lane].m[mt][hh] - kPOff + std::log2(lsum[lane]), 0.6931471805599453f,
                                bf.lse_corr[bh * d.len_q + row]);
        }
      }
  }
}

template <int D, bool FP8, bool kBf16, int BITS>
void replay_attention(const Buffers& bf, int fault, uint16_t* out, float* lse) {
  const SageDims& d = bf.d;
  const int64_t ctas = d.len_q_pad / SageTraitsSm8x::kCtaQ;
  tersor::parallel_for(0, d.batch * d.heads_q * ctas, 1, [&](int64_t b0, int64_t b1) {
    std::vector<uint8_t> smem;
    for (int64_t w = b0; w < b1; ++w) replay_cta<D, FP8, kBf16, BITS>(bf, fault, w / ctas, w % ctas, out, lse, smem);
  });
}

// ---- sage_attn_sm90_kernel (sage_attn_sm90.cu), one CTA ----
// The hardware: wgmma.m64n64k32 8-bit, A from the 128 threads' registers (thread (w, g, t) register r byte j =
// row 16 w + g + 8 (r % 2), k 4 t + 16 (r / 2) + j), B through the descriptor (K-major, no swizzle: start +
// (n / 8) SBO + (k / 16) LBO + (n % 8) 16 + k % 16), accumulator register i of thread (w, g, t) = row
// 16 w + g + 8 ((i / 2) % 2), column 8 (i / 4) + 2 t + i % 2. Written independently of sage_sm90_layout.h.
constexpr int kWgThreads = 128;
void hw_wgmma_gather(const uint32_t (*a)[4], const std::vector<uint8_t>& smem, uint64_t desc, uint8_t A[64][32],
                     uint8_t B[32][64]) {
  for (int tid = 0; tid < kWgThreads; ++tid) {
    const int w = tid / 32, g = (tid % 32) / 4, t = tid % 4;
    for (int r = 0; r < 4; ++r)
      for (int j = 0; j < 4; ++j) A[16 * w + g + 8 * (r % 2)][4 * t + 16 * (r / 2) + j] = (a[tid][r] >> (8 * j)) & 0xFF;
  }
  const uint32_t start = static_cast<uint32_t>(desc & 0x3FFF) * 16, lbo = static_cast<uint32_t>((desc >> 16) & 0x3FFF) * 16;
  const uint32_t sbo = static_cast<uint32_t>((desc >> 32) & 0x3FFF) * 16;
  for (int k = 0; k < 32; ++k)
    for (int n = 0; n < 64; ++n) {
      const uint32_t addr = start + (n / 8) * sbo + (k / 16) * lbo + (n % 8) * 16 + k % 16;
      TERSOR_CHECK(addr < smem.size(), "_sage_emulate_sm90_attention: descriptor reads past shared memory");
      B[k][n] = smem[addr];
    }
}
int hw_wgmma_row(int tid, int i) { return 16 * (tid / 32) + (tid % 32) / 4 + 8 * ((i / 2) % 2); }
int hw_wgmma_col(int tid, int i) { return 8 * (i / 4) + 2 * (tid % 4) + i % 2; }

template <int D, bool kBf16>
void replay_cta_sm90(const Buffers& bf, const std::vector<uint8_t>& k_tiles, const std::vector<uint8_t>& v_tiles,
                     int64_t bh, int64_t cta, uint16_t* out, float* lse, std::vector<uint8_t>& smem) {
  using Tr = SageAttnSm90KernelTraits<D>;
  const SageDims& d = bf.d;
  smem.assign(Tr::kStages * Tr::kStageBytes, 0x5A);  // poisoned: bytes no bulk copy wrote show up as garbage
  const int64_t b = bh / d.heads_q, h = bh % d.heads_q;
  const int64_t bkv = b * d.heads_kv + h / (d.heads_q / d.heads_kv);
  const int64_t r0 = cta * Tr::kCtaQ;
  const TileSpan span = visible_tiles(bf.mask, r0, std::min(r0 + Tr::kCtaQ - 1, d.len_q - 1), d.len_q, d.len_k, Tr::kCtaK);
  const int n_tiles = span.end;
  const float* k_sc = bf.k_scale.data() + k_scale_index(bkv, d.len_k_pad, 0, 0);

  struct Thread {
    uint32_t qf[Tr::kQKSteps][4];
    float o[Tr::kPVChunks][Tr::kAccRegs];
    float m[2], l[2], q_sc;
    int lo[2], hi[2];  // visible keys [lo, hi) of the thread's rows
  };
  std::vector<Thread> th(Tr::kConsumerWarpgroups * kWgThreads);
  int64_t wg_kv_begin[Tr::kConsumerWarpgroups], wg_kv_end[Tr::kConsumerWarpgroups];
  for (int wg = 0; wg < Tr::kConsumerWarpgroups; ++wg) {
    const int64_t wg_row0 = r0 + wg * Tr::kRowsPerWarpgroup;
    const int64_t wg_last = std::min(wg_row0 + Tr::kRowsPerWarpgroup - 1, d.len_q - 1);
    wg_kv_begin[wg] = wg_row0 >= d.len_q ? 0 : visible_keys(bf.mask, wg_row0, d.len_q, d.len_k).lo;
    wg_kv_end[wg] = wg_row0 >= d.len_q ? 0 : visible_keys(bf.mask, wg_last, d.len_q, d.len_k).hi;
    const int8_t* q_g = reinterpret_cast<const int8_t*>(bf.q_int.data()) + (bh * d.len_q_pad + wg_row0) * D;
    for (int tid = 0; tid < kWgThreads; ++tid) {
      Thread& T = th[wg * kWgThreads + tid];
      const int w = tid / 32, g = (tid % 32) / 4, t = tid % 4;
      for (int kk = 0; kk < Tr::kQKSteps; ++kk)
        for (int r = 0; r < 4; ++r) T.qf[kk][r] = lds32(reinterpret_cast<const uint8_t*>(q_g) + sm90_q_frag_offset<D>(w, g, t, kk, r));
      T.q_sc = bf.q_scale[sm90_q_scale_index(bh, d.len_q_pad, wg_row0, w, g)];
      for (int hh = 0; hh < 2; ++hh) {
        const KeySpan ks = visible_keys(bf.mask, wg_row0 + wg_acc_row(w, g, 2 * hh), d.len_q, d.len_k);
        T.lo[hh] = static_cast<int>(ks.lo);
        T.hi[hh] = static_cast<int>(ks.hi);
        T.m[hh] = kNegInf;
        T.l[hh] = 0.f;
      }
      for (int cb = 0; cb < Tr::kPVChunks; ++cb)
        for (int i = 0; i < Tr::kAccRegs; ++i) T.o[cb][i] = 0.f;
    }
  }

  uint8_t A[64][32], B[32][64];
  uint32_t regs[kWgThreads][4];
  // Producer and consumers walk the same live tiles (masked key blocks: no copy, no wgmma); the stage ring
  // advances per live tile.
  const uint8_t* mask_row = bf.bm.row(b, h, cta);
  int it = 0;
  for (int tile = next_live_tile(mask_row, span.first, n_tiles, Tr::kCtaK); tile < n_tiles;
       tile = next_live_tile(mask_row, tile + 1, n_tiles, Tr::kCtaK), ++it) {
    // The producer's two bulk copies of this tile into stage it % kStages (consumers of the previous use of
    // the stage are done: the empty barrier).
    const int s = it % Tr::kStages;
    const uint32_t k_addr = s * Tr::kStageBytes, v_addr = k_addr + Tr::kKTileBytes;
    const int64_t base = sm90_tile_base(bkv, d.len_k_pad, tile, D);
    std::memcpy(smem.data() + k_addr, k_tiles.data() + base, Tr::kKTileBytes);
    std::memcpy(smem.data() + v_addr, v_tiles.data() + base, Tr::kVTileBytes);
    for (int wg = 0; wg < Tr::kConsumerWarpgroups; ++wg) {
      Thread* W = th.data() + wg * kWgThreads;
      for (int half = 0; half < Tr::kHalves; ++half) {
        const int key0 = tile * Tr::kCtaK + half * Tr::kHalfK;
        if (key0 >= wg_kv_end[wg]) break;
        if (key0 + Tr::kHalfK <= wg_kv_begin[wg]) continue;
        // ---- S = Q K^T: exact integer sums over the k-steps ----
        int64_t S64[64][64] = {};
        for (int kk = 0; kk < Tr::kQKSteps; ++kk) {
          for (int tid = 0; tid < kWgThreads; ++tid) std::memcpy(regs[tid], W[tid].qf[kk], sizeof(regs[tid]));
          hw_wgmma_gather(regs, smem, sm90_k_desc<D>(k_addr, half, kk), A, B);
          for (int m = 0; m < 64; ++m)
            for (int n = 0; n < 64; ++n) {
              int64_t acc = 0;
              for (int k = 0; k < 32; ++k) acc += static_cast<int8_t>(A[m][k]) * static_cast<int8_t>(B[k][n]);
              S64[m][n] += acc;
            }
        }
        static thread_local std::vector<float> sc_buf;
        sc_buf.resize(kWgThreads * Tr::kAccRegs);
        auto SC = [&](int tid, int i) -> float& { return sc_buf[tid * Tr::kAccRegs + i]; };
        for (int tid = 0; tid < kWgThreads; ++tid) {
          const int t = tid % 4;
          const float dq = W[tid].q_sc * k_sc[sm90_k_scale_in_slice(tile, half, t)];
          for (int i = 0; i < Tr::kAccRegs; ++i) {
            const int32_t acc = static_cast<int32_t>(S64[hw_wgmma_row(tid, i)][hw_wgmma_col(tid, i)]);
            const int key = key0 + wg_acc_col(t, i), hh = (i >> 1) & 1;
            const uint8_t* key_pad = bf.key_pad.row(b, d.len_k);
            const bool vis = key < W[tid].hi[hh] && key >= W[tid].lo[hh] && (key_pad == nullptr || key_pad[key] != 0);
            SC(tid, i) = vis ? static_cast<float>(acc) * dq : kNegInf;
          }
        }
        // ---- online softmax over the half ----
        for (int hh = 0; hh < 2; ++hh) {
          float mx[kWgThreads];
          for (int tid = 0; tid < kWgThreads; ++tid) {
            mx[tid] = kNegInf;
            for (int i = 0; i < Tr::kAccRegs; ++i)
              if (((i >> 1) & 1) == hh) mx[tid] = std::fmax(mx[tid], SC(tid, i));
          }
          for (int w = 0; w < 4; ++w) {
            shfl_xor_apply(mx + 32 * w, 1, [](float x, float y) { return std::fmax(x, y); });
            shfl_xor_apply(mx + 32 * w, 2, [](float x, float y) { return std::fmax(x, y); });
          }
          for (int tid = 0; tid < kWgThreads; ++tid) {
            Thread& T = W[tid];
            const float m_new = std::fmax(T.m[hh], mx[tid]);
            const bool none = m_new == kNegInf;
            const float alpha = none ? 1.f : ex2_ftz(T.m[hh] - m_new);
            const float m_shift = none ? 0.f : m_new - kFp8POffset;
            T.m[hh] = m_new;
            T.l[hh] *= alpha;
            for (int cb = 0; cb < Tr::kPVChunks; ++cb)
              for (int i = 0; i < Tr::kAccRegs; ++i)
                if (((i >> 1) & 1) == hh) T.o[cb][i] *= alpha;
            for (int i = 0; i < Tr::kAccRegs; ++i)
              if (((i >> 1) & 1) == hh) SC(tid, i) = ex2_ftz(SC(tid, i) - m_shift);
          }
        }
        // ---- P~ into A registers; row sums of the rounded values ----
        uint32_t pa[Tr::kPVSteps][kWgThreads][4];
        for (int tid = 0; tid < kWgThreads; ++tid)
          for (int kk = 0; kk < Tr::kPVSteps; ++kk)
            for (int r = 0; r < 4; ++r) {
              uint8_t c[4];
              for (int j = 0; j < 4; ++j) c[j] = float_to_e4m3(SC(tid, sm90_p_acc_reg(kk, r, j)));
              pa[kk][tid][r] = uint32_t{c[0]} | (uint32_t{c[1]} << 8) | (uint32_t{c[2]} << 16) | (uint32_t{c[3]} << 24);
              W[tid].l[r & 1] += (e4m3_to_float(c[0]) + e4m3_to_float(c[1])) + (e4m3_to_float(c[2]) + e4m3_to_float(c[3]));
            }
        // ---- O += (P~ V~ over the half, from zero; replayed as the exact sum rounded once) ----
        for (int cb = 0; cb < Tr::kPVChunks; ++cb) {
          double P64[64][64] = {};
          for (int kk = 0; kk < Tr::kPVSteps; ++kk) {
            hw_wgmma_gather(pa[kk], smem, sm90_v_desc(v_addr, cb, half, kk), A, B);
            for (int m = 0; m < 64; ++m)
              for (int n = 0; n < 64; ++n) {
                double acc = 0;
                for (int k = 0; k < 32; ++k) acc += static_cast<double>(e4m3_to_float(A[m][k])) * e4m3_to_float(B[k][n]);
                P64[m][n] += acc;
              }
          }
          for (int tid = 0; tid < kWgThreads; ++tid)
            for (int i = 0; i < Tr::kAccRegs; ++i)
              W[tid].o[cb][i] += static_cast<float>(P64[hw_wgmma_row(tid, i)][hw_wgmma_col(tid, i)]);
        }
      }
    }
  }

  // ---- epilogue ----
  const float* v_sc = bf.v_scale.data() + bkv * D;
  for (int wg = 0; wg < Tr::kConsumerWarpgroups; ++wg) {
    Thread* W = th.data() + wg * kWgThreads;
    const int64_t wg_row0 = r0 + wg * Tr::kRowsPerWarpgroup;
    for (int hh = 0; hh < 2; ++hh) {
      float lsum[kWgThreads];
      for (int tid = 0; tid < kWgThreads; ++tid) lsum[tid] = W[tid].l[hh];
      for (int w = 0; w < 4; ++w) {
        shfl_xor_apply(lsum + 32 * w, 1, [](float x, float y) { return x + y; });
        shfl_xor_apply(lsum + 32 * w, 2, [](float x, float y) { return x + y; });
      }
      for (int tid = 0; tid < kWgThreads; ++tid) {
        const int w = tid / 32, g = (tid % 32) / 4, t = tid % 4;
        const int64_t row = wg_row0 + wg_acc_row(w, g, 2 * hh);
        if (row >= d.len_q) continue;
        const bool dead = !(lsum[tid] > 0.f);
        const float inv_l = dead ? 0.f : 1.f / lsum[tid];
        uint16_t* orow = out + (bh * d.len_q + row) * D;
        for (int cb = 0; cb < Tr::kPVChunks; ++cb)
          for (int i = 2 * hh; i < Tr::kAccRegs; i += 4) {
            const int c = cb * 64 + wg_acc_col(t, i);
            float v0 = W[tid].o[cb][i] * v_sc[c] * inv_l, v1 = W[tid].o[cb][i + 1] * v_sc[c + 1] * inv_l;
            if (dead) v0 = v1 = 0.f;
            orow[c] = float_to_bits16<kBf16>(v0);
            orow[c + 1] = float_to_bits16<kBf16>(v1);
          }
        if (t == 0)
          lse[bh * d.len_q + row] = dead ? kNegInf
                                         : std::fma(W[tid].m[hh] - kFp8POffset + std::log2(lsum[tid]),
                                                    0.6931471805599453f, bf.lse_corr[bh * d.len_q + row]);
      }
    }
  }
}

template <int D, bool kBf16>
void replay_attention_sm90(const Buffers& bf, uint16_t* out, float* lse) {
  const SageDims& d = bf.d;
  // The relayout kernel, chunk by chunk, into tile-native blocks.
  std::vector<uint8_t> k_tiles(bf.k_int.size()), v_tiles(bf.v_t.size());
  const int64_t n_kv = d.batch * d.heads_kv, tiles = d.len_k_pad / 128;
  for (int64_t bkv = 0; bkv < n_kv; ++bkv)
    for (int64_t tile = 0; tile < tiles; ++tile) {
      const int64_t base = sm90_tile_base(bkv, d.len_k_pad, tile, D);
      for (int i = 0; i < 128 * D / 16; ++i) {
        const int n = sm90_relayout_k_token<D>(i), c = sm90_relayout_k_byte<D>(i);
        std::memcpy(k_tiles.data() + base + sm90_k_tile_offset<D>(n, c),
                    bf.k_int.data() + (bkv * d.len_k_pad + tile * 128 + n) * D + c, 16);
        const int ch = sm90_relayout_v_channel(i), p = sm90_relayout_v_position(i);
        std::memcpy(v_tiles.data() + base + sm90_v_tile_offset(ch, p),
                    bf.v_t.data() + (bkv * D + ch) * d.len_k_pad + tile * 128 + p, 16);
      }
    }
  const int64_t ctas = d.len_q_pad / SageAttnSm90KernelTraits<D>::kCtaQ;
  tersor::parallel_for(0, d.batch * d.heads_q * ctas, 1, [&](int64_t b0, int64_t b1) {
    std::vector<uint8_t> smem;
    for (int64_t w = b0; w < b1; ++w)
      replay_cta_sm90<D, kBf16>(bf, k_tiles, v_tiles, w / ctas, w % ctas, out, lse, smem);
  });
}

// The packed varlen rows of sage_attention_varlen_fwd (the replays take its [1, H, total, D] views): the
// offsets are checked as the CPU op checks them, then the mask points into them (they outlive the replay).
void set_varlen_replay(Buffers& bf, const SageCall& c, const std::optional<Tensor>& cu_q,
                       const std::optional<Tensor>& cu_k) {
  TERSOR_CHECK_VALUE(cu_q.has_value() == cu_k.has_value(), "sage replay: pass both cu_seqlens_q and cu_seqlens_k");
  if (!cu_q) return;
  TERSOR_CHECK_VALUE(c.batch == 1, "sage replay: varlen rows need batch 1 (the packed [1, H, total, D] views)");
  for (const Tensor* t : {&*cu_q, &*cu_k})
    TERSOR_CHECK_VALUE(t->scalar_type() == ScalarType::Long && t->dim() == 1 && t->is_contiguous() &&
                           t->size(0) == cu_q->size(0) && t->size(0) >= 2 && t->is_cpu(),
                       "sage replay: cu_seqlens_q/k must be contiguous int64 CPU [n_seq + 1] of one length");
  VarlenCall vc{Tensor{}, Tensor{}, Tensor{}, *cu_q, *cu_k, c};
  vc.call.mask.cu_q = cu_q->const_data_ptr<int64_t>();
  vc.call.mask.cu_k = cu_k->const_data_ptr<int64_t>();
  vc.call.mask.n_seq = cu_q->size(0) - 1;
  check_varlen_offsets(vc);
  bf.mask = vc.call.mask;
}

// The front both replays share: the outputs, fp32 copies of the inputs and the prologue replayed into `bf`
// (whose dims the caller set: the sm90 path pads keys to 128). Empty outputs skip the prologue.
struct ReplayOutputs {
  Tensor out, lse;
  uint16_t* out16() const { return reinterpret_cast<uint16_t*>(out.mutable_data_ptr()); }
  float* lse_ptr() const { return lse.mutable_data_ptr<float>(); }
};
ReplayOutputs replay_front(const SageCall& c, const Tensor& q, const Tensor& k, const Tensor& v, bool fp8,
                           int64_t fault, Buffers& bf) {
  ReplayOutputs r{empty({c.batch, c.heads_q, c.len_q, c.head_dim}, q.scalar_type(), q.device()),
                  empty({c.batch, c.heads_q, c.len_q}, ScalarType::Float, q.device())};
  if (r.out.numel() == 0) return r;
  const Tensor qf = as_contiguous(as_dtype(q, ScalarType::Float));
  const Tensor kf = as_contiguous(as_dtype(k, ScalarType::Float));
  const Tensor vf = as_contiguous(as_dtype(v, ScalarType::Float)), v16 = as_contiguous(v);
  const float *qp = qf.const_data_ptr<float>(), *kp = kf.const_data_ptr<float>(), *vp = vf.const_data_ptr<float>();
  if (q.scalar_type() == ScalarType::BFloat16)
    replay_prologue<true>(c, qp, kp, vp, v16, fp8, static_cast<int>(fault), bf);
  else
    replay_prologue<false>(c, qp, kp, vp, v16, fp8, static_cast<int>(fault), bf);
  return r;
}

// _sage_emulate_sm90_attention: the sm90a CUDA path (sm8x prologue with keys padded to 128, relayout, the
// wgmma kernel) replayed on the CPU; pv "fp8", qk int8 only (what the glue routes to it).
std::tuple<Tensor, Tensor> sage_emulate_sm90_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                                       bool is_causal, double scale, bool smooth_k,
                                                       std::optional<Tensor> block_mask, int64_t window_left,
                                                       int64_t window_right, std::optional<Tensor> key_padding_mask,
                                                       std::optional<Tensor> cu_seqlens_q,
                                                       std::optional<Tensor> cu_seqlens_k) {
  constexpr const char* op = "_sage_emulate_sm90_attention";
  const SageCall c = check_call(q, k, v, is_causal, scale, 8, "fp8", smooth_k, false, window_left, window_right);
  TERSOR_CHECK(q.is_cpu() && k.is_cpu() && v.is_cpu(), op, ": expects CPU tensors");
  const bool bf16 = q.scalar_type() == ScalarType::BFloat16;
  Buffers bf;
  bf.bm = check_block_mask(block_mask, c, q);
  bf.mask = c.mask;
  bf.key_pad = check_key_padding(key_padding_mask, c, q);
  set_varlen_replay(bf, c, cu_seqlens_q, cu_seqlens_k);
  bf.d = SageDims{c.batch, c.heads_q, c.heads_kv, c.len_q, c.len_k, c.head_dim,
                  (c.len_q + SageTraitsSm8x::kCtaQ - 1) / SageTraitsSm8x::kCtaQ * SageTraitsSm8x::kCtaQ,
                  (c.len_k + 127) / 128 * 128};
  const ReplayOutputs r = replay_front(c, q, k, v, /*fp8=*/true, /*fault=*/0, bf);
  if (r.out.numel() == 0) return {r.out, r.lse};
  uint16_t* op16 = r.out16();
  float* lp = r.lse_ptr();
  const int key = (c.head_dim == 128 ? 2 : 0) + (bf16 ? 1 : 0);
  switch (key) {
    case 0: replay_attention_sm90<64, false>(bf, op16, lp); break;
    case 1: replay_attention_sm90<64, true>(bf, op16, lp); break;
    case 2: replay_attention_sm90<128, false>(bf, op16, lp); break;
    default: replay_attention_sm90<128, true>(bf, op16, lp); break;
  }
  return {r.out, r.lse};
}

template <int BITS>
void dispatch_replay(int key, const Buffers& bf, int fault, uint16_t* out, float* lse) {
  switch (key) {
    case 0: replay_attention<64, false, false, BITS>(bf, fault, out, lse); break;
    case 1: replay_attention<64, false, true, BITS>(bf, fault, out, lse); break;
    case 2: replay_attention<64, true, false, BITS>(bf, fault, out, lse); break;
    case 3: replay_attention<64, true, true, BITS>(bf, fault, out, lse); break;
    case 4: replay_attention<128, false, false, BITS>(bf, fault, out, lse); break;
    case 5: replay_attention<128, false, true, BITS>(bf, fault, out, lse); break;
    case 6: replay_attention<128, true, false, BITS>(bf, fault, out, lse); break;
    default: replay_attention<128, true, true, BITS>(bf, fault, out, lse); break;
  }
}

std::tuple<Tensor, Tensor> sage_emulate_cuda_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                                       bool is_causal, double scale, std::string pv, bool smooth_k,
                                                       int64_t fault, int64_t qk_bits, bool smooth_q,
                                                       std::optional<Tensor> block_mask, int64_t window_left,
                                                       int64_t window_right, std::optional<Tensor> key_padding_mask,
                                                       std::optional<Tensor> cu_seqlens_q,
                                                       std::optional<Tensor> cu_seqlens_k) {
  constexpr const char* op = "_sage_emulate_cuda_attention";
  TERSOR_CHECK_VALUE(qk_bits == 8 || qk_bits == 4, op, ": the CUDA kernel has qk_bits 8 or 4, got ", qk_bits);
  const SageCall c = check_call(q, k, v, is_causal, scale, qk_bits, pv, smooth_k, smooth_q, window_left, window_right);
  TERSOR_CHECK_VALUE(c.pv != PVMode::kFp32, op, ": the CUDA kernel has pv \"fp8\" or \"fp16\" only");
  TERSOR_CHECK_VALUE(fault >= 0 && fault <= 7, op, ": fault must be in [0, 7], got ", fault);
  TERSOR_CHECK(q.is_cpu() && k.is_cpu() && v.is_cpu(), op, ": expects CPU tensors");
  const bool fp8 = c.pv == PVMode::kFp8, bf16 = q.scalar_type() == ScalarType::BFloat16;
  Buffers bf;
  bf.bm = check_block_mask(block_mask, c, q);
  bf.mask = c.mask;
  bf.key_pad = check_key_padding(key_padding_mask, c, q);
  set_varlen_replay(bf, c, cu_seqlens_q, cu_seqlens_k);
  bf.bits = static_cast<int>(qk_bits);
  bf.smooth_q = smooth_q;
  bf.d = SageDims{c.batch, c.heads_q, c.heads_kv, c.len_q, c.len_k, c.head_dim,
                  (c.len_q + SageTraitsSm8x::kCtaQ - 1) / SageTraitsSm8x::kCtaQ * SageTraitsSm8x::kCtaQ,
                  (c.len_k + SageTraitsSm8x::kCtaK - 1) / SageTraitsSm8x::kCtaK * SageTraitsSm8x::kCtaK};
  const ReplayOutputs r = replay_front(c, q, k, v, fp8, fault, bf);
  if (r.out.numel() == 0) return {r.out, r.lse};
  uint16_t* op16 = r.out16();
  float* lp = r.lse_ptr();
  const int key = (c.head_dim == 128 ? 4 : 0) + (fp8 ? 2 : 0) + (bf16 ? 1 : 0);
  if (qk_bits == 4)
    dispatch_replay<4>(key, bf, static_cast<int>(fault), op16, lp);
  else
    dispatch_replay<8>(key, bf, static_cast<int>(fault), op16, lp);
  return {r.out, r.lse};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(tersor_testing, CPU, m) {
  m.impl("_sage_emulate_cuda_attention", TORCH_BOX(&sage_emulate_cuda_attention));
  m.impl("_sage_emulate_sm90_attention", TORCH_BOX(&sage_emulate_sm90_attention));
}

}  // namespace tersor::attention
