// The CUDA E8P GEMV's arithmetic replayed on the CPU (op _e8p_emulate_cuda_linear), so the fragment
// layouts, the fp16 bit tricks and the warp split are tested without a GPU. It calls the same
// e8p_format.h functions the kernel calls, assembles each MMA's A and B tiles from the lanes'
// registers by the PTX fragment rules of mma.m16n8k16, multiplies them in fp32, and reduces the warps
// in the kernel's order. (The hardware's summation order inside one MMA is unspecified, so the
// kernel agrees with this replay to fp32 rounding, not bitwise.) Also the test-only _e8p_packed_abs_table.
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "codebook/aqlm_format.h"
#include "codebook/codebook_cuda_traits.h"
#include "codebook/codebook_glue.h"
#include "codebook/e81b_table.h"
#include "codebook/e8p_format.h"

namespace tersor::codebook {
namespace {

float half_bits_to_float(uint32_t bits16) {
  return static_cast<float>(Half(static_cast<uint16_t>(bits16), Half::from_bits()));
}
float half2_lo(uint32_t h2) { return half_bits_to_float(h2 & 0xffffu); }
float half2_hi(uint32_t h2) { return half_bits_to_float(h2 >> 16); }

using Traits = E8PGemvTraits;

// One warp's 16 x 8 accumulator over its column blocks.
struct WarpAcc {
  float c[16][8];
};

void mma_m16n8k16(const float a[16][16], const float b[16][8], float c[16][8]) {
  for (int r = 0; r < 16; ++r)
    for (int nn = 0; nn < 8; ++nn) {
      float s = c[r][nn];
      for (int kk = 0; kk < 16; ++kk) s += a[r][kk] * b[kk][nn];
      c[r][nn] = s;
    }
}

// Places lane (g, q)'s four A registers (each an fp16x2: MMA k = 2q+e or 2q+8+e) into the tile.
void scatter_a(float a[16][16], int g, int q, const uint32_t regs[4], const uint32_t* bias) {
  for (int r = 0; r < 4; ++r) {
    const int row = g + 8 * (r & 1), k0 = 2 * q + 8 * (r >> 1);
    const float b_lo = bias ? half2_lo(bias[r]) : 0.f, b_hi = bias ? half2_hi(bias[r]) : 0.f;
    a[row][k0] = half2_lo(regs[r]) - b_lo;  // exact: both are small multiples of 1/32 (hsub2)
    a[row][k0 + 1] = half2_hi(regs[r]) - b_hi;
  }
}

// QuIP#'s packed abs table as the kernels use it (int32[256]).
Tensor e8p_packed_abs_table() {
  Tensor t = empty({256}, ScalarType::Int, Device(DeviceType::CPU));
  std::memcpy(t.mutable_data_ptr<int32_t>(), kE8PTables.packed_abs, sizeof kE8PTables.packed_abs);
  return t;
}

Tensor emulate_cuda_linear(const Tensor& x, const Tensor& qidxs, int64_t in_features,
                           std::optional<double> resid_scale) {
  constexpr const char* op = "_e8p_emulate_cuda_linear";
  const E8PCall c = check_e8p_call(qidxs, in_features, resid_scale, op);
  TERSOR_CHECK_VALUE(x.dim() == 2 && x.size(1) == c.n && x.size(0) >= 1 && x.size(0) <= Traits::kMaxBatch, op,
                     ": x must be [1..", Traits::kMaxBatch, ", ", c.n, "], got ", sizes_str(x));
  // The kernel multiplies fp16 x (the glue rounds x to fp16 first).
  const Tensor x16 = as_contiguous(as_dtype(x, ScalarType::Half));
  const Tensor q = as_contiguous(qidxs);
  const int64_t B = x.size(0), n = c.n, m = c.m;
  const Half* xh = x16.const_data_ptr<Half>();
  const int64_t* qp = q.const_data_ptr<int64_t>();
  const uint8_t* qbytes = reinterpret_cast<const uint8_t*>(qp);
  Tensor out = empty({B, m}, ScalarType::Float, x.device());
  float* outp = out.mutable_data_ptr<float>();
  auto x_half2 = [&](int64_t b, int64_t col) -> uint32_t {  // the 32-bit word (x[col], x[col+1]) of row b
    if (b >= B) return 0u;  // the kernel loads zeros for rows of x past B
    uint32_t w;
    std::memcpy(&w, xh + b * n + col, 4);
    return w;
  };

  tersor::parallel_for(0, m / 16, 1, [&](int64_t ib, int64_t ie) {
    for (int64_t I = ib; I < ie; ++I) {
      float partial[Traits::kWarps][16][8];
      for (int w = 0; w < Traits::kWarps; ++w) {
        WarpAcc acc1{}, acc2{};
        for (int64_t J = w; J < n / 64; J += Traits::kWarps) {
          float a1[4][16][16], a2[4][16][16], bt[4][16][8];
          for (int lane = 0; lane < 32; ++lane) {
            const int g = lane >> 2, qq = lane & 3;
            E8PWordCursor cur{16 * I, 0, n / 32};
            cur.advance(32 * J + lane);
            const E8PHalfWord h1 = e8p_word_to_halves(static_cast<uint64_t>(qp[cur.offset(c.row_words, 0)]),
                                                      kE8PTables.packed_abs);
            E8PHalfWord h2{};
            uint32_t r0_codes = 0, r1_codes = 0;
            if (c.bits == 4) {
              h2 = e8p_word_to_halves(static_cast<uint64_t>(qp[cur.offset(c.row_words, 1)]), kE8PTables.packed_abs);
            } else if (c.bits == 3) {
              const int64_t R0 = 16 * I + 2 * g, code_col = (64 * J + 16 * qq) / 8;
              const int64_t i0 = e81b_byte_index(R0, code_col, n), i1 = e81b_byte_index(R0 + 1, code_col, n);
              r0_codes = qbytes[i0] | (uint32_t{qbytes[i0 + 1]} << 8);
              r1_codes = qbytes[i1] | (uint32_t{qbytes[i1 + 1]} << 8);
            }
            const int64_t xcol = e8p_lane_x_col(J, qq);
            for (int t = 0; t < 4; ++t) {
              uint32_t regs[4], bias[4];
              e8p_a_frag(h1, t, regs, bias);
              scatter_a(a1[t], g, qq, regs, bias);
              if (c.bits == 4) {
                e8p_a_frag(h2, t, regs, bias);
                scatter_a(a2[t], g, qq, regs, bias);
              } else if (c.bits == 3) {
                e81b_a_frag(kE81BTable.half2, r0_codes, r1_codes, t, regs);
                scatter_a(a2[t], g, qq, regs, nullptr);
              }
              // b0b1: k = 2q, 2q+1 <- x word t of the first 8 columns; b2b3: k = 2q+8, +9 <- of the second 8.
              const uint32_t b01 = x_half2(g, xcol + 2 * t), b23 = x_half2(g, xcol + 8 + 2 * t);
              bt[t][2 * qq][g] = half2_lo(b01);
              bt[t][2 * qq + 1][g] = half2_hi(b01);
              bt[t][2 * qq + 8][g] = half2_lo(b23);
              bt[t][2 * qq + 9][g] = half2_hi(b23);
            }
          }
          for (int t = 0; t < 4; ++t) {
            mma_m16n8k16(a1[t], bt[t], acc1.c);
            if (c.bits > 2) mma_m16n8k16(a2[t], bt[t], acc2.c);
          }
        }
        for (int r = 0; r < 16; ++r)
          for (int nn = 0; nn < 8; ++nn)
            partial[w][r][nn] = c.bits > 2 ? acc1.c[r][nn] + acc2.c[r][nn] / c.resid_scale : acc1.c[r][nn];
      }
      for (int r = 0; r < 16; ++r)
        for (int64_t b = 0; b < B; ++b) {
          float s = 0.f;
          for (int w = 0; w < Traits::kWarps; ++w) s += partial[w][r][b];
          outp[b * m + e8p_c_row(I, r)] = s;
        }
    }
  });
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(tersor_testing, CPU, m) {
  m.impl("_e8p_emulate_cuda_linear", TORCH_BOX(&emulate_cuda_linear));
}

namespace {

// The codebook kernels' 64-bit index functions (aqlm_format.h, e8p_format.h) evaluated on the host, so tests
// can check them at sizes past 2^31 without allocating anything.
std::vector<int64_t> codebook_index(std::string fn, std::vector<int64_t> a) {
  auto need = [&](size_t n) {
    TERSOR_CHECK_VALUE(a.size() == n, "_codebook_index: ", fn, " takes ", n, " arguments, got ", a.size());
  };
  auto i32 = [](int64_t v) { return static_cast<int>(v); };
  if (fn == "aqlm_code_offset") {  // [o, j, groups, num_codebooks]
    need(4);
    return {aqlm_code_offset(a[0], a[1], a[2], i32(a[3]))};
  }
  if (fn == "aqlm_weight_offset") {  // [o, j, in]
    need(3);
    return {aqlm_weight_offset(a[0], a[1], a[2])};
  }
  if (fn == "aqlm_entry_offset") {  // [c, entries, index]
    need(3);
    return {aqlm_entry_offset(i32(a[0]), a[1], static_cast<uint32_t>(a[2]))};
  }
  if (fn == "e8p_slot_pos") {  // [I, J, lane, slot] -> [row, col]
    need(4);
    const E8PSlotPos p = e8p_slot_pos(a[0], a[1], i32(a[2]), i32(a[3]));
    return {p.row, p.col};
  }
  if (fn == "e8p_elem_offset") {  // [row, col, n]
    need(3);
    return {e8p_elem_offset(a[0], a[1], a[2])};
  }
  if (fn == "e8p_word_index") {  // [I, J, lane, n]
    need(4);
    return {e8p_word_index(a[0], a[1], i32(a[2]), a[3])};
  }
  if (fn == "e8p_word_offset") {  // [I, t, n, row_words, stage]: word t of row block I's flat order, in Qidxs
    need(5);
    E8PWordCursor cur{16 * a[0], 0, a[2] / 32};
    cur.advance(a[1]);
    return {cur.offset(a[3], i32(a[4]))};
  }
  if (fn == "e81b_byte_index") {  // [row, code_col, n]
    need(3);
    return {e81b_byte_index(a[0], a[1], a[2])};
  }
  TERSOR_CHECK_VALUE(false, "_codebook_index: unknown function ", fn);
  return {};
}

}  // namespace

// Tensor-free: no backend to dispatch on, so it registers for every key.
STABLE_TORCH_LIBRARY_IMPL(tersor_testing, CompositeExplicitAutograd, m) {
  m.impl("_e8p_packed_abs_table", TORCH_BOX(&e8p_packed_abs_table));
  m.impl("_codebook_index", TORCH_BOX(&codebook_index));
}

}  // namespace tersor::codebook
