// _xattn_emulate_cuda: the XAttention scoring kernel (xattn_cuda.cu) replayed thread by thread on the CPU, with
// the kernel's own per-thread code (xattn_kernel.h): the CTA's shared Q' buffer, per thread the strided reduced
// keys j = tid, tid + 256, ... with an online (max, sum) per row, the warp butterfly (shfl_xor 16..1) and the
// cross-warp combine, pass 2's per-thread probability sums added into the block masses, the rank sort and
// thread 0's selection. The one thing the GPU does in an unspecified order, the shared-memory atomicAdd of pass
// 2, is replayed in thread order (the GPU's order changes the masses by float rounding only); expf is the host's
// (CUDA's expf is within 2 ulp).
//
// qk = "int8" replays xattn_int8_cuda.cu instead: the prologue's per-row INT8 codes, the CTA's shared Q' codes
// (pad bytes poisoned), per warp and 8-key n-tile the mma.m16n8k32 fragments read at the kernel's addresses
// (xattn_kernel.h) and multiplied by a model of the PTX fragment rules written independently of them, per-lane
// online (max, sum), the quad and cross-warp combines, pass 2's warp sums.
//
// fault (tests only): 1 loads the query rows in natural order within the stride (XAttention's "slash" mode,
// not the antidiagonal), 2 puts key j's probability into block j / per + 1 (a wrong reduction index), 3 (int8)
// swaps A fragment registers 0 and 1 (rows g and g + 8).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "attention/xattn_glue.h"
#include "attention/xattn_kernel.h"

namespace tersor::attention {
namespace {

struct FloatLoad {
  const float* kh;
  int64_t D;
  float operator()(int64_t row, int64_t d) const { return kh[row * D + d]; }
};

// The CTA's epilogue, shared by both kernels: ranks the query block's key-block masses, writes them and the
// selected blocks.
void rank_and_select(const XattnCall& c, int64_t w, int64_t qb, const std::vector<float>& mass, uint8_t* mask_out,
                     float* mass_out) {
  std::vector<int> order(c.k_blocks);
  for (int64_t j = 0; j < c.k_blocks; ++j) {
    order[xattn_rank(mass.data(), c.k_blocks, j)] = static_cast<int>(j);
    mass_out[w * c.k_blocks + j] = mass[j];
  }
  xattn_select(mass.data(), order.data(), c.k_blocks, xattn_diagonal_block(qb, c.block, c.len_q, c.len_k), c.causal,
               c.threshold, mask_out + w * c.k_blocks);
}

void replay_cta(const XattnCall& c, const float* qp, const float* kp, int64_t w, int fault, uint8_t* mask_out,
                float* mass_out) {
  const int64_t S = c.stride, D = c.head_dim, SD = S * D, per = c.block / S;
  const int64_t nq = (c.len_q + S - 1) / S;
  const int64_t bh = w / c.q_blocks, qb = w % c.q_blocks;
  const int64_t b = bh / c.heads_q, h = bh % c.heads_q, hk = h / (c.heads_q / c.heads_kv);
  const float* qh = qp + (b * c.heads_q + h) * c.len_q * D;
  const FloatLoad load{kp + (b * c.heads_kv + hk) * c.len_k * D, D};
  const int64_t i0 = qb * per, rows = std::min(per, nq - i0), rows_pad = xattn_rows_padded(c.block, S);
  std::vector<float> qs(rows_pad * SD), mass(c.k_blocks, 0.f);
  for (int64_t e = 0; e < rows_pad * SD; ++e) {
    const int64_t r = e / SD, col = e % SD, s = col / D, d = col % D;
    const int64_t row = fault == 1 ? (i0 + r) * S + s : xattn_query_row(i0 + r, s, S);
    qs[e] = r < rows && row < c.len_q ? qh[row * D + d] : 0.f;
  }
  const float mul = static_cast<float>(c.scale) / static_cast<float>(S);
  constexpr int G = kXattnRowGroup, NT = kXattnThreads;
  std::vector<float> m(NT * G), l(NT * G);
  for (int64_t g0 = 0; g0 < rows; g0 += G) {
    int64_t nv[G];
    int64_t nv_max = 0;
    for (int r = 0; r < G; ++r) {
      nv[r] = g0 + r < rows ? xattn_visible_reduced_keys(i0 + g0 + r, S, c.len_q, c.len_k, c.causal) : 0;
      nv_max = std::max(nv_max, nv[r]);
    }
    // pass 1, per thread
    std::fill(m.begin(), m.end(), -INFINITY);
    std::fill(l.begin(), l.end(), 0.f);
    for (int tid = 0; tid < NT; ++tid)
      for (int64_t j = tid; j < nv_max; j += NT) {
        float acc[G];
        xattn_score_group(qs.data(), S, D, c.len_k, g0, j, load, acc);
        for (int r = 0; r < G; ++r)
          if (j < nv[r]) xattn_combine(m[tid * G + r], l[tid * G + r], acc[r] * mul, 1.f);
      }
    // warp butterfly: every lane combines with lane ^ off, all lanes at once
    std::vector<float> wm(kXattnWarps * G), wl(kXattnWarps * G);
    for (int warp = 0; warp < kXattnWarps; ++warp)
      for (int r = 0; r < G; ++r) {
        float lm[32], ll[32];
        for (int lane = 0; lane < 32; ++lane) lm[lane] = m[(warp * 32 + lane) * G + r], ll[lane] = l[(warp * 32 + lane) * G + r];
        for (int off = 16; off > 0; off >>= 1) {
          float nm[32], nl[32];
          for (int lane = 0; lane < 32; ++lane) {
            nm[lane] = lm[lane];
            nl[lane] = ll[lane];
            xattn_combine(nm[lane], nl[lane], lm[lane ^ off], ll[lane ^ off]);
          }
          std::copy(nm, nm + 32, lm);
          std::copy(nl, nl + 32, ll);
        }
        wm[warp * G + r] = lm[0];
        wl[warp * G + r] = ll[0];
      }
    float row_m[G], row_l[G];
    for (int r = 0; r < G; ++r) {
      float mm = -INFINITY, lsum = 0.f;
      for (int wi = 0; wi < kXattnWarps; ++wi) xattn_combine(mm, lsum, wm[wi * G + r], wl[wi * G + r]);
      row_m[r] = mm;
      row_l[r] = lsum;
    }
    // pass 2: the atomicAdds in thread order, round by round
    for (int64_t base = 0; base < nv_max; base += NT)
      for (int tid = 0; tid < NT; ++tid) {
        const int64_t j = base + tid;
        if (j >= nv_max) break;
        float acc[G];
        xattn_score_group(qs.data(), S, D, c.len_k, g0, j, load, acc);
        float psum = 0.f;
        for (int r = 0; r < G; ++r)
          if (j < nv[r]) psum += expf(acc[r] * mul - row_m[r]) / row_l[r];
        int64_t blk = j / per;
        if (fault == 2) blk = std::min(blk + 1, c.k_blocks - 1);
        mass[blk] += psum;
      }
  }
  rank_and_select(c, w, qb, mass, mask_out, mass_out);
}

// ---- qk = "int8" ----
// mma.m16n8k32 .s8 per the PTX ISA: A reg r of lane (g, t) = row g (+8 if r odd), k = 4t + x (+16 if r >= 2);
// B reg j = column g, k = 4t + x + 16j; C element i = row g (+8 if i >= 2), column 2t + (i & 1).
void hw_mma_s8(int32_t c[32][4], const uint32_t a[32][4], const uint32_t b[32][2]) {
  int32_t A[16][32], B[32][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int r = 0; r < 4; ++r)
      for (int x = 0; x < 4; ++x)
        A[g + ((r & 1) ? 8 : 0)][4 * t + x + ((r & 2) ? 16 : 0)] = static_cast<int8_t>(a[lane][r] >> (8 * x));
    for (int j = 0; j < 2; ++j)
      for (int x = 0; x < 4; ++x) B[4 * t + x + 16 * j][g] = static_cast<int8_t>(b[lane][j] >> (8 * x));
  }
  for (int lane = 0; lane < 32; ++lane)
    for (int i = 0; i < 4; ++i) {
      const int row = lane / 4 + (i >= 2 ? 8 : 0), col = 2 * (lane % 4) + (i & 1);
      int32_t sum = 0;
      for (int k = 0; k < 32; ++k) sum += A[row][k] * B[k][col];
      c[lane][i] += sum;
    }
}

uint32_t ld32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// The prologue (one warp per row; amax and the codes do not depend on the lanes' order): codes and scale of one
// reduced row whose values value(e), e < n, are given.
template <typename Value>
float quant_row(int64_t n, const Value& value, int8_t* codes) {
  float amax = 0.f;
  for (int64_t e = 0; e < n; ++e) amax = std::max(amax, std::fabs(value(e)));
  const IntQuantParams p = int_quant_params(amax, 8);
  for (int64_t e = 0; e < n; ++e) codes[e] = static_cast<int8_t>(quantize_int(value(e), p.inv_scale, 8));
  return p.scale;
}

struct Int8Buffers {
  std::vector<int8_t> q_codes, k_codes;
  std::vector<float> q_scale, k_scale;
};

void replay_prologue_int8(const XattnCall& c, const float* qp, const float* kp, int fault, Int8Buffers& bf) {
  const int64_t S = c.stride, D = c.head_dim, SD = S * D, per = c.block / S, rows_pad = xattn_rows_padded(c.block, S);
  const int64_t nq = (c.len_q + S - 1) / S, nk = (c.len_k + S - 1) / S, nk_pad = xattn_nk_pad(c.len_k, S);
  const int64_t q_rows = c.batch * c.heads_q * c.q_blocks * rows_pad, k_rows = c.batch * c.heads_kv * nk_pad;
  bf.q_codes.assign(q_rows * SD, 0);
  bf.k_codes.assign(k_rows * SD, 0);
  bf.q_scale.assign(q_rows, 0.f);
  bf.k_scale.assign(k_rows, 0.f);
  tersor::parallel_for(0, q_rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t id = r0; id < r1; ++id) {
      const int64_t bh = id / (c.q_blocks * rows_pad), rem = id % (c.q_blocks * rows_pad);
      const int64_t r = rem % rows_pad, i = (rem / rows_pad) * per + r;
      const bool valid = r < per && i < nq;
      const float* qh = qp + bh * c.len_q * D;
      auto value = [&](int64_t e) -> float {
        const int64_t row = fault == 1 ? i * S + e / D : xattn_query_row(i, e / D, S);
        return valid && row < c.len_q ? qh[row * D + e % D] : 0.f;
      };
      bf.q_scale[id] = quant_row(SD, value, bf.q_codes.data() + id * SD);
    }
  });
  tersor::parallel_for(0, k_rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t id = r0; id < r1; ++id) {
      const int64_t bkv = id / nk_pad, j = id % nk_pad;
      const float* kh = kp + bkv * c.len_k * D;
      auto value = [&](int64_t e) -> float {
        const int64_t row = xattn_key_row(j, e / D, S);
        return j < nk && row < c.len_k ? kh[row * D + e % D] : 0.f;
      };
      bf.k_scale[id] = quant_row(SD, value, bf.k_codes.data() + id * SD);
    }
  });
}

void replay_cta_int8(const XattnCall& c, const Int8Buffers& bf, int64_t w, int fault, uint8_t* mask_out,
                     float* mass_out) {
  constexpr int kW = 4;  // warps of the CTA
  const int64_t S = c.stride, SD = S * c.head_dim, per = c.block / S, rows_pad = xattn_rows_padded(c.block, S);
  const int64_t row_bytes = xattn_int8_row_bytes(SD), nq = (c.len_q + S - 1) / S, nk_pad = xattn_nk_pad(c.len_k, S);
  const int64_t bh = w / c.q_blocks, qb = w % c.q_blocks;
  const int64_t bkv = (bh / c.heads_q) * c.heads_kv + (bh % c.heads_q) / (c.heads_q / c.heads_kv);
  std::vector<uint8_t> qs(rows_pad * row_bytes, 0x5A);  // poisoned: the row padding must never be read
  std::vector<float> q_scale(rows_pad), mass(c.k_blocks, 0.f);
  for (int64_t r = 0; r < rows_pad; ++r) {
    const int64_t id = xattn_int8_q_row(bh, qb, r, c.q_blocks, rows_pad);
    std::memcpy(qs.data() + r * row_bytes, bf.q_codes.data() + id * SD, SD);
    q_scale[r] = bf.q_scale[id];
  }
  const uint8_t* k_base = reinterpret_cast<const uint8_t*>(bf.k_codes.data()) + xattn_int8_k_row(bkv, 0, nk_pad) * SD;
  const float* k_scale = bf.k_scale.data() + xattn_int8_k_row(bkv, 0, nk_pad);
  const float mul = static_cast<float>(c.scale) / static_cast<float>(S);
  const int64_t i0 = qb * per, rows = std::min(per, nq - i0);
  auto mma_tile = [&](int mt, int64_t nt, int32_t acc[32][4]) {
    for (int lane = 0; lane < 32; ++lane) acc[lane][0] = acc[lane][1] = acc[lane][2] = acc[lane][3] = 0;
    const uint8_t* kt = k_base + nt * 8 * SD;
    for (int kk = 0; kk < SD / 32; ++kk) {
      uint32_t a[32][4], b[32][2];
      for (int lane = 0; lane < 32; ++lane) {
        const int g = lane / 4, t = lane % 4;
        for (int r = 0; r < 4; ++r) {
          const int rr = fault == 3 && r < 2 ? 1 - r : r;
          a[lane][r] = ld32(qs.data() + xattn_a_frag_byte(mt, g, t, kk, rr, row_bytes));
        }
        for (int j = 0; j < 2; ++j) b[lane][j] = ld32(kt + xattn_b_frag_byte(g, t, kk, j, SD));
      }
      hw_mma_s8(acc, a, b);
    }
  };
  for (int mt = 0; mt * 16 < rows; ++mt) {
    int64_t nv[16], nv_max = 0;
    for (int r = 0; r < 16; ++r) {
      const int64_t rr = mt * 16 + r;
      nv[r] = rr < rows ? xattn_visible_reduced_keys(i0 + rr, S, c.len_q, c.len_k, c.causal) : 0;
      nv_max = std::max(nv_max, nv[r]);
    }
    const int64_t n_tiles = (nv_max + 7) / 8;
    float m[kW][32][2], l[kW][32][2];
    int32_t acc[32][4];
    for (int warp = 0; warp < kW; ++warp) {
      for (int lane = 0; lane < 32; ++lane) m[warp][lane][0] = m[warp][lane][1] = -INFINITY, l[warp][lane][0] = l[warp][lane][1] = 0.f;
      for (int64_t nt = warp; nt < n_tiles; nt += kW) {
        mma_tile(mt, nt, acc);
        for (int lane = 0; lane < 32; ++lane)
          for (int i = 0; i < 4; ++i) {
            const int g = lane / 4, t = lane % 4, rr = frag_c_row(g, i);
            const int64_t col = nt * 8 + frag_c_col(t, i);
            if (col < nv[rr])
              xattn_combine(m[warp][lane][i >> 1], l[warp][lane][i >> 1],
                            xattn_int8_score(acc[lane][i], q_scale[mt * 16 + rr], k_scale[col], mul), 1.f);
          }
      }
      for (int hh = 0; hh < 2; ++hh)
        for (int off = 1; off <= 2; off <<= 1) {
          float nm[32], nl[32];
          for (int lane = 0; lane < 32; ++lane) {
            nm[lane] = m[warp][lane][hh];
            nl[lane] = l[warp][lane][hh];
            xattn_combine(nm[lane], nl[lane], m[warp][lane ^ off][hh], l[warp][lane ^ off][hh]);
          }
          for (int lane = 0; lane < 32; ++lane) m[warp][lane][hh] = nm[lane], l[warp][lane][hh] = nl[lane];
        }
    }
    float row_m[16], row_l[16];
    for (int r = 0; r < 16; ++r) {
      float mm = -INFINITY, ll = 0.f;
      for (int warp = 0; warp < kW; ++warp) xattn_combine(mm, ll, m[warp][(r % 8) * 4][r / 8], l[warp][(r % 8) * 4][r / 8]);
      row_m[r] = mm;
      row_l[r] = ll;
    }
    for (int warp = 0; warp < kW; ++warp)
      for (int64_t nt = warp; nt < n_tiles; nt += kW) {
        mma_tile(mt, nt, acc);
        float ps[32];
        for (int lane = 0; lane < 32; ++lane) {
          const int g = lane / 4, t = lane % 4;
          ps[lane] = 0.f;
          for (int i = 0; i < 4; ++i) {
            const int rr = frag_c_row(g, i);
            const int64_t col = nt * 8 + frag_c_col(t, i);
            if (col < nv[rr])
              ps[lane] += expf(xattn_int8_score(acc[lane][i], q_scale[mt * 16 + rr], k_scale[col], mul) - row_m[rr]) /
                          row_l[rr];
          }
        }
        for (int off = 16; off > 0; off >>= 1) {
          float np[32];
          for (int lane = 0; lane < 32; ++lane) np[lane] = ps[lane] + ps[lane ^ off];
          std::copy(np, np + 32, ps);
        }
        int64_t blk = nt * 8 / per;
        if (fault == 2) blk = std::min(blk + 1, c.k_blocks - 1);
        mass[blk] += ps[0];
      }
  }
  rank_and_select(c, w, qb, mass, mask_out, mass_out);
}

std::tuple<Tensor, Tensor> xattn_emulate_cuda(const Tensor& q, const Tensor& k, int64_t block_size, int64_t stride,
                                              double threshold, bool is_causal, double scale, int64_t fault,
                                              std::string qk) {
  const char* op = "_xattn_emulate_cuda";
  const XattnCall c = check_xattn(q, k, block_size, stride, threshold, is_causal, scale, qk);
  TERSOR_CHECK_VALUE(fault >= 0 && fault <= (c.int8 ? 3 : 2), op, ": fault must be in [0, ", c.int8 ? 3 : 2, "], got ",
                     fault);
  TERSOR_CHECK_VALUE(!c.int8 || ((c.block / c.stride) % 8 == 0 && (c.stride * c.head_dim) % 32 == 0), op,
                     ": qk=\"int8\" needs (block_size / stride) % 8 == 0 and (stride * head_dim) % 32 == 0");
  TERSOR_CHECK(q.is_cpu() && k.is_cpu(), op, ": expects CPU tensors");
  const Tensor qf = as_contiguous(as_dtype(q, ScalarType::Float));  // exact for float16 / bfloat16
  const Tensor kf = as_contiguous(as_dtype(k, ScalarType::Float));
  Tensor mask = empty({c.batch, c.heads_q, c.q_blocks, c.k_blocks}, ScalarType::Bool, q.device());
  Tensor mass = empty({c.batch, c.heads_q, c.q_blocks, c.k_blocks}, ScalarType::Float, q.device());
  const float* qp = qf.const_data_ptr<float>();
  const float* kp = kf.const_data_ptr<float>();
  uint8_t* mp = static_cast<uint8_t*>(mask.mutable_data_ptr());
  float* wp = mass.mutable_data_ptr<float>();
  if (c.int8) {
    Int8Buffers bf;
    replay_prologue_int8(c, qp, kp, static_cast<int>(fault), bf);
    tersor::parallel_for(0, c.batch * c.heads_q * c.q_blocks, 1, [&](int64_t w0, int64_t w1) {
      for (int64_t w = w0; w < w1; ++w) replay_cta_int8(c, bf, w, static_cast<int>(fault), mp, wp);
    });
    return {mask, mass};
  }
  tersor::parallel_for(0, c.batch * c.heads_q * c.q_blocks, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) replay_cta(c, qp, kp, w, static_cast<int>(fault), mp, wp);
  });
  return {mask, mass};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(tersor_testing, CPU, m) { m.impl("_xattn_emulate_cuda", TORCH_BOX(&xattn_emulate_cuda)); }

}  // namespace tersor::attention
