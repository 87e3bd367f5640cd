// The CUDA BSR kernel replayed on the CPU (op _bsr_emulate_cuda_linear), so the schedule, the cp.async
// copy map, the shared-memory swizzle, the ldmatrix address maps and the mma.m16n8k16 fragment layouts
// are tested without a GPU. Every index comes from the bsr_format.h functions and the BsrTile traits the
// kernel uses: tiles are written to a simulated stage by the copy map, each lane's registers are filled
// by ldmatrix's delivery rule from the addresses the lanes supply, MMA tiles are assembled from the
// registers by the PTX fragment rules and multiplied in fp32, and the accumulators leave through the
// kernel's epilogue map (direct or to the partial slots, then the partial pass in slot order).
// The hardware's summation order inside one MMA is unspecified, so the kernel agrees with this replay
// to fp32 rounding (then one 16-bit rounding), not bitwise.
#include <cstdint>
#include <array>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "common/torch_glue.h"
#include "sparse/bsr_cuda_traits.h"
#include "sparse/bsr_format.h"
#include "sparse/bsr_glue.h"

namespace tersor::sparse {
namespace {

template <typename T>
float bits_to_float(uint16_t b) {
  return static_cast<float>(T(b, typename T::from_bits_t{}));
}
template <typename T>
uint16_t float_to_bits(float f) {
  return T(f).x;
}

struct EmuInputs {
  const BsrCall* c;
  const uint16_t* x;       // [tokens, K] 16-bit bits
  const uint16_t* values;  // [nnzb, bs, bs]
  const int32_t* col;
  const int32_t* items;
  int64_t n_items;
  const int32_t* partial_ptr;
  const uint16_t* bias;  // or nullptr
  uint16_t* y;
  float* partial;
};

template <typename T, int BS, int TN>
void emulate_tile_kind(const EmuInputs& in) {
  using Tile = BsrTile<BS, TN>;
  const BsrCall& c = *in.c;
  const int64_t n_tok = c.tokens, K = c.in_features, N = c.out_features;
  const int64_t n_tt = (n_tok + TN - 1) / TN;
  constexpr int cpr = bsr_chunks_per_row(BS);
  std::vector<uint16_t> stage(Tile::kStageElems);
  auto u32 = [&](int64_t elem) { return uint32_t(stage[elem]) | (uint32_t(stage[elem + 1]) << 16); };
  auto lo = [](uint32_t r) { return bits_to_float<T>(uint16_t(r & 0xffffu)); };
  auto hi = [](uint32_t r) { return bits_to_float<T>(uint16_t(r >> 16)); };

  for (int64_t item = 0; item < in.n_items; ++item) {
    const int32_t* it = in.items + kItemInts * item;
    const int64_t row = it[kItemRow], slot = it[kItemSlot];
    for (int64_t tt = 0; tt < n_tt; ++tt) {  // blockIdx.y
      const int64_t tok0 = tt * TN;
      // acc[warp][frag][lane][e]
      std::vector<float> acc(Tile::kWarps * Tile::kNFrags * 32 * 4, 0.f);
      auto A = [&](int w, int f, int l, int e) -> float& { return acc[((w * Tile::kNFrags + f) * 32 + l) * 4 + e]; };
      for (int64_t j = it[kItemBegin]; j < it[kItemEnd]; ++j) {
        // cp.async: weight block, then x tile (zero-filled past the last token).
        for (int cp = 0; cp < BS * cpr; ++cp) {
          const int r = bsr_copy_row(BS, cp), ch = bsr_copy_chunk(BS, cp);
          std::memcpy(&stage[bsr_smem_chunk(BS, r, ch) * 8], in.values + bsr_value_offset(j, BS, r) + ch * 8, 16);
        }
        for (int cp = 0; cp < TN * cpr; ++cp) {
          const int t = bsr_copy_row(BS, cp), ch = bsr_copy_chunk(BS, cp);
          uint16_t* dst = &stage[BS * BS + bsr_smem_chunk(BS, t, ch) * 8];
          if (tok0 + t < n_tok)
            std::memcpy(dst, in.x + bsr_x_offset(tok0 + t, K, in.col[j], BS) + ch * 8, 16);
          else
            std::memset(dst, 0, 16);
        }
        for (int w = 0; w < Tile::kWarps; ++w) {
          const int wm = w % Tile::kWarpsM, wn = w / Tile::kWarpsM;
          for (int k16 = 0; k16 < Tile::kK16; ++k16) {
            uint32_t a[32][4];
            for (int mat = 0; mat < 4; ++mat)
              for (int l = 0; l < 32; ++l) {
                const int src = 8 * mat + ldmatrix_recv_row(l);
                const int r = wm * 16 + bsr_a_ld_row(src), ch = bsr_a_ld_chunk(src, k16);
                a[l][mat] = u32(bsr_smem_chunk(BS, r, ch) * 8 + ldmatrix_recv_col(l));
              }
            float at[16][16];
            for (int l = 0; l < 32; ++l)
              for (int r = 0; r < 4; ++r) {
                at[mma_a_row(l, r)][mma_a_k(l, r)] = lo(a[l][r]);
                at[mma_a_row(l, r)][mma_a_k(l, r) + 1] = hi(a[l][r]);
              }
            std::vector<std::array<std::array<uint32_t, 2>, 32>> b(Tile::kNFrags);
            const int n_mats = Tile::kNFrags == 1 ? 2 : 4;  // ldmatrix.x2 or .x4
            for (int f0 = 0; f0 < Tile::kNFrags; f0 += n_mats / 2)
              for (int mat = 0; mat < n_mats; ++mat)
                for (int l = 0; l < 32; ++l) {
                  const int src = 8 * mat + ldmatrix_recv_row(l);
                  const int t = wn * Tile::kWarpTokens + f0 * 8 + bsr_b_ld_token(src), ch = bsr_b_ld_chunk(src, k16);
                  b[f0 + mat / 2][l][mat % 2] = u32(BS * BS + bsr_smem_chunk(BS, t, ch) * 8 + ldmatrix_recv_col(l));
                }
            for (int f = 0; f < Tile::kNFrags; ++f) {
              float bt[16][8], ct[16][8];
              for (int l = 0; l < 32; ++l) {
                for (int r = 0; r < 2; ++r) {
                  bt[mma_b_k(l, r)][mma_b_col(l)] = lo(b[f][l][r]);
                  bt[mma_b_k(l, r) + 1][mma_b_col(l)] = hi(b[f][l][r]);
                }
                for (int e = 0; e < 4; ++e) ct[mma_c_row(l, e)][mma_c_col(l, e)] = A(w, f, l, e);
              }
              for (int r = 0; r < 16; ++r)
                for (int n = 0; n < 8; ++n) {
                  float s = ct[r][n];
                  for (int k = 0; k < 16; ++k) s += at[r][k] * bt[k][n];
                  ct[r][n] = s;
                }
              for (int l = 0; l < 32; ++l)
                for (int e = 0; e < 4; ++e) A(w, f, l, e) = ct[mma_c_row(l, e)][mma_c_col(l, e)];
            }
          }
        }
      }
      // Epilogue.
      for (int w = 0; w < Tile::kWarps; ++w) {
        const int wm = w % Tile::kWarpsM, wn = w / Tile::kWarpsM;
        for (int f = 0; f < Tile::kNFrags; ++f)
          for (int l = 0; l < 32; ++l)
            for (int e = 0; e < 4; ++e) {
              const int64_t m = wm * 16 + mma_c_row(l, e);
              const int64_t t = tok0 + wn * Tile::kWarpTokens + f * 8 + mma_c_col(l, e);
              if (t >= n_tok) continue;
              const float v = A(w, f, l, e);
              if (slot < 0) {
                const float b = in.bias ? bits_to_float<T>(in.bias[row * BS + m]) : 0.f;
                in.y[bsr_y_offset(t, N, row, BS, static_cast<int>(m))] = float_to_bits<T>(v + b);
              } else {
                in.partial[bsr_partial_index(slot, t, m, n_tok, BS)] = v;
              }
            }
      }
    }
  }
  if (!in.partial) return;
  // The partial pass: rows that were split, slots summed in order, then bias, one rounding.
  for (int64_t r = 0; r < c.mb; ++r) {
    const int64_t p0 = in.partial_ptr[r], p1 = in.partial_ptr[r + 1];
    if (p0 == p1) continue;
    for (int64_t t = 0; t < n_tok; ++t)
      for (int64_t m = 0; m < BS; ++m) {
        float s = 0.f;
        for (int64_t p = p0; p < p1; ++p) s += in.partial[bsr_partial_index(p, t, m, n_tok, BS)];
        const float b = in.bias ? bits_to_float<T>(in.bias[r * BS + m]) : 0.f;
        in.y[bsr_y_offset(t, N, r, BS, static_cast<int>(m))] = float_to_bits<T>(s + b);
      }
  }
}

template <typename T, int BS>
void emulate_bs(const EmuInputs& in) {
  if (bsr_tile_tokens(BS, in.c->tokens) == kBsrLargeTokens)
    emulate_tile_kind<T, BS, kBsrLargeTokens>(in);
  else
    emulate_tile_kind<T, BS, bsr_small_tokens(BS)>(in);
}

template <typename T>
void emulate_dtype(const EmuInputs& in) {
  switch (in.c->bs) {
    case 16: return emulate_bs<T, 16>(in);
    case 32: return emulate_bs<T, 32>(in);
    default: return emulate_bs<T, 64>(in);
  }
}

Tensor emulate_cuda_linear(const Tensor& x, const Tensor& crow_indices, const Tensor& col_indices,
                           const Tensor& values, const Tensor& schedule, int64_t in_features,
                           const std::optional<Tensor>& bias) {
  constexpr const char* op = "_bsr_emulate_cuda_linear";
  const BsrCall c = check_bsr_call(x, crow_indices, col_indices, values, schedule, in_features, bias, op);
  TERSOR_CHECK_TYPE(x.scalar_type() == ScalarType::Half || x.scalar_type() == ScalarType::BFloat16, op,
                    ": the tensor-core kernel takes float16 or bfloat16, got ", dtype_name(x.scalar_type()));
  const Tensor crow = as_contiguous(crow_indices), col = as_contiguous(col_indices), sched = as_contiguous(schedule);
  check_bsr_indices_cpu(c, crow, col, op);
  check_bsr_schedule_cpu(c, crow, sched, op);
  Tensor y = empty({c.tokens, c.out_features}, x.scalar_type(), x.device());
  if (c.tokens == 0) return torch::stable::reshape(y, c.out_shape);
  const Tensor x16 = as_contiguous(torch::stable::reshape(x, {c.tokens, c.in_features}));
  const Tensor v = as_contiguous(values);
  std::optional<Tensor> b;
  if (bias) b = as_contiguous(*bias);
  const bool split = bsr_use_split(c.tokens);
  const int32_t* s = sched.const_data_ptr<int32_t>();
  std::vector<float> partial;
  if (split) partial.assign(static_cast<size_t>(c.n_split * c.tokens * c.bs), 0.f);
  EmuInputs in;
  in.c = &c;
  in.x = static_cast<const uint16_t*>(x16.const_data_ptr());
  in.values = static_cast<const uint16_t*>(v.const_data_ptr());
  in.col = col.const_data_ptr<int32_t>();
  in.items = s + (split ? bsr_split_items_offset(c.mb) : bsr_row_items_offset(c.mb));
  in.n_items = split ? c.n_split : c.mb;
  in.partial_ptr = s + bsr_partial_ptr_offset(c.mb, c.n_split);
  in.bias = b ? static_cast<const uint16_t*>(b->const_data_ptr()) : nullptr;
  in.y = static_cast<uint16_t*>(y.mutable_data_ptr());
  in.partial = split ? partial.data() : nullptr;
  if (x.scalar_type() == ScalarType::Half)
    emulate_dtype<Half>(in);
  else
    emulate_dtype<BFloat16>(in);
  return torch::stable::reshape(y, c.out_shape);
}

// The kernel's int64 global offsets (bsr_format.h) and launch limit evaluated on the host, so tests can check
// them at sizes past 2^31 without allocating anything.
std::vector<int64_t> bsr_index(std::string fn, std::vector<int64_t> a) {
  auto need = [&](size_t n) {
    TERSOR_CHECK_VALUE(a.size() == n, "_bsr_index: ", fn, " takes ", n, " arguments, got ", a.size());
  };
  auto i32 = [](int64_t v) { return static_cast<int>(v); };
  if (fn == "value_offset") {  // [j, bs, r]
    need(3);
    return {bsr_value_offset(a[0], i32(a[1]), i32(a[2]))};
  }
  if (fn == "x_offset") {  // [token, in_features, col_block, bs]
    need(4);
    return {bsr_x_offset(a[0], a[1], a[2], i32(a[3]))};
  }
  if (fn == "y_offset") {  // [token, out_features, row, bs, m]
    need(5);
    return {bsr_y_offset(a[0], a[1], a[2], i32(a[3]), i32(a[4]))};
  }
  if (fn == "partial_index") {  // [slot, t, m, tokens, bs]
    need(5);
    return {bsr_partial_index(a[0], a[1], a[2], a[3], a[4])};
  }
  if (fn == "cuda_max_tokens") {
    need(0);
    return {bsr_cuda_max_tokens()};
  }
  TERSOR_CHECK_VALUE(false, "_bsr_index: unknown function ", fn);
  return {};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(tersor_testing, CPU, m) { m.impl("_bsr_emulate_cuda_linear", TORCH_BOX(&emulate_cuda_linear)); }
STABLE_TORCH_LIBRARY_IMPL(tersor_testing, CompositeExplicitAutograd, m) { m.impl("_bsr_index", TORCH_BOX(&bsr_index)); }

}  // namespace tersor::sparse
