// _decode_emulate_cuda: the CUDA decode kernels (decode_kernel.cuh, decode_cuda_f16.cu) replayed lane by lane on
// the CPU, with the kernels' own index and fragment functions (decode_cuda_layout.h): the plan kernel's quota,
// per CTA (chunk, (b, h), row block) the Q prologue (per-row INT8 in shared memory), per tile the shared K / V
// stage images (cp.async rows, zero-filled past the tile, pad bytes poisoned: e4m3 NaN in V, so a fragment that
// reads a pad poisons the output), the warp's q . k_mean butterfly, each warp's mma.m16n8k32.s8 fragments read
// at the kernel's addresses and multiplied by a model of the PTX fragment rules written independently of
// decode_cuda_layout.h, the shared row-max / row-sum partials, P~ written to its shared image and read back as
// the P~ V A fragment, V's B fragments gathered byte by byte, the e4m3 (k32) or fp16 (k16) MMA, the acc update,
// the workspace partials, then the merge kernel's chunk-order combine.
//
// What the replay cannot reproduce bit for bit: ex2.approx (the replay uses std::exp2, the twin's), and the
// tensor cores' fp32 accumulation order in P~ V (the model sums the exact products in double and rounds once).
// Everything else is the kernels' arithmetic in their order.
//
// fault (tests only): 1 swaps P~ V A-fragment registers 1 and 2 (rows g + 8 and keys + 16), 2 reads V's
// B fragment with j and the key half swapped, 3 gives the CTA's Q rows the head order of MHA (r % group
// ignored: every row reads query head h).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "attention/decode_cuda_layout.h"
#include "attention/paged_glue.h"
#include "attention/sage_format.h"

namespace tersor::attention {
namespace {

// ---- an independent model of the PTX fragment rules (PTX ISA, "Matrix Fragments for mma.m16n8k32" and
// "mma.m16n8k16 with floating point type"): groupID = lane >> 2, threadID_in_group = lane % 4.
// m16n8k32 (.s8 / .e4m3): A a_i (i < 4, 4 bytes each): row groupID (+8 for i = 1, 3), column
// threadID_in_group * 4 + byte (+16 for i >= 2). B b_i (i < 2): row threadID_in_group * 4 + byte (+16 for i = 1),
// column groupID. C c_i: row groupID (+8 for i >= 2), column threadID_in_group * 2 + (i & 1).
// m16n8k16 (.f16): A a_i: 2 halves, row groupID (+8 for i = 1, 3), column threadID_in_group * 2 + half (+8 for
// i >= 2); B b_i: row threadID_in_group * 2 + half (+8 for i = 1), column groupID; C as above.
struct Mma8Model {
  static int a_row(int lane, int i) { return (lane >> 2) + ((i == 1 || i == 3) ? 8 : 0); }
  static int a_col(int lane, int i, int byte) { return (lane % 4) * 4 + byte + (i >= 2 ? 16 : 0); }
  static int b_row(int lane, int i, int byte) { return (lane % 4) * 4 + byte + (i == 1 ? 16 : 0); }
  static int b_col(int lane) { return lane >> 2; }
};
struct Mma16Model {
  static int a_row(int lane, int i) { return (lane >> 2) + ((i == 1 || i == 3) ? 8 : 0); }
  static int a_col(int lane, int i, int half) { return (lane % 4) * 2 + half + (i >= 2 ? 8 : 0); }
  static int b_row(int lane, int i, int half) { return (lane % 4) * 2 + half + (i == 1 ? 8 : 0); }
  static int b_col(int lane) { return lane >> 2; }
};
int c_row(int lane, int i) { return (lane >> 2) + (i >= 2 ? 8 : 0); }
int c_col(int lane, int i) { return (lane % 4) * 2 + (i & 1); }

// D += A B (s8 x s8 -> s32, exact) over a warp's registers.
void mma_s8(int32_t c[32][4], const uint32_t a[32][4], const uint32_t b[32][2]) {
  int32_t A[16][32], B[32][8];
  for (int l = 0; l < 32; ++l)
    for (int i = 0; i < 4; ++i)
      for (int y = 0; y < 4; ++y)
        A[Mma8Model::a_row(l, i)][Mma8Model::a_col(l, i, y)] = static_cast<int8_t>((a[l][i] >> (8 * y)) & 0xff);
  for (int l = 0; l < 32; ++l)
    for (int i = 0; i < 2; ++i)
      for (int y = 0; y < 4; ++y)
        B[Mma8Model::b_row(l, i, y)][Mma8Model::b_col(l)] = static_cast<int8_t>((b[l][i] >> (8 * y)) & 0xff);
  for (int l = 0; l < 32; ++l)
    for (int i = 0; i < 4; ++i) {
      int32_t s = 0;
      for (int k = 0; k < 32; ++k) s += A[c_row(l, i)][k] * B[k][c_col(l, i)];
      c[l][i] += s;
    }
}

float half_bits_to_float(uint16_t h) {
  const int e = (h >> 10) & 31, m = h & 1023;
  float v = e == 0 ? std::ldexp(static_cast<float>(m), -24)
                   : (e == 31 ? (m ? std::numeric_limits<float>::quiet_NaN() : INFINITY)
                              : std::ldexp(static_cast<float>(1024 + m), e - 25));
  return (h & 0x8000) ? -v : v;
}
// Exactly representable, normal-or-zero fp16 values only (e4m3 images: 2^-9 <= |v| <= 448).
uint16_t float_to_half_exact(float v) {
  const uint16_t sign = std::signbit(v) ? 0x8000 : 0;
  v = std::fabs(v);
  if (v == 0.f) return sign;
  int e = 0;
  const float f = std::frexp(v, &e);  // v = f 2^e, f in [0.5, 1)
  const int mant = static_cast<int>(std::ldexp(f, 11)) - 1024;
  return static_cast<uint16_t>(sign | ((e - 1 + 15) << 10) | mant);
}
// The sm_80 path of e4m3x2_to_f16x2 for one byte: the prescaled bit map, times 2^8 in fp16 (exact).
uint16_t e4m3_to_f16_bits(uint8_t x) {
  return float_to_half_exact(half_bits_to_float(decode_e4m3_to_f16_prescaled_bits(x)) * 256.f);
}

// D += A B over a warp: e4m3 (k32, each 32-key product from 0 then added: two-level) or fp16 (k16, in the
// accumulator). Products exact; the tensor core's sum order is not modelled (double, one rounding).
void mma_pv(bool fp8, float c[32][4], const uint32_t a[32][4], const uint32_t b[32][2]) {
  double A[16][32] = {}, B[32][8] = {};
  for (int l = 0; l < 32; ++l)
    for (int i = 0; i < 4; ++i) {
      if (fp8) {
        for (int y = 0; y < 4; ++y)
          A[Mma8Model::a_row(l, i)][Mma8Model::a_col(l, i, y)] = e4m3_to_float((a[l][i] >> (8 * y)) & 0xff);
      } else {
        for (int y = 0; y < 2; ++y)
          A[Mma16Model::a_row(l, i)][Mma16Model::a_col(l, i, y)] = half_bits_to_float((a[l][i] >> (16 * y)) & 0xffff);
      }
    }
  for (int l = 0; l < 32; ++l)
    for (int i = 0; i < 2; ++i) {
      if (fp8) {
        for (int y = 0; y < 4; ++y)
          B[Mma8Model::b_row(l, i, y)][Mma8Model::b_col(l)] = e4m3_to_float((b[l][i] >> (8 * y)) & 0xff);
      } else {
        for (int y = 0; y < 2; ++y)
          B[Mma16Model::b_row(l, i, y)][Mma16Model::b_col(l)] = half_bits_to_float((b[l][i] >> (16 * y)) & 0xffff);
      }
    }
  const int K = fp8 ? 32 : 16;
  for (int l = 0; l < 32; ++l)
    for (int i = 0; i < 4; ++i) {
      double s = fp8 ? 0.0 : c[l][i];
      for (int k = 0; k < K; ++k) s += A[c_row(l, i)][k] * B[k][c_col(l, i)];
      c[l][i] = fp8 ? c[l][i] + static_cast<float>(s) : static_cast<float>(s);
    }
}

uint32_t ld32(const std::vector<uint8_t>& img, int off) {
  uint32_t v;
  std::memcpy(&v, img.data() + off, 4);
  return v;
}

// The warp butterfly sum (shfl_xor 16, 8, .., 1) of 32 lane values: lane 0's result.
float warp_sum(std::vector<float> v) {
  for (int o = 16; o > 0; o >>= 1) {
    std::vector<float> n(32);
    for (int l = 0; l < 32; ++l) n[l] = v[l] + v[l ^ o];
    v = n;
  }
  return v[0];
}

template <int D, bool FP8>
void replay_cta(const DecodeArgs& a, int64_t split, int64_t bh, int64_t rb, int fault) {
  using Tr = DecodeTraits<D, FP8>;
  constexpr int kR = Tr::kRows, kW = Tr::kWarps;
  const int64_t b = bh / a.heads_kv, h = bh % a.heads_kv, group = a.heads_q / a.heads_kv, S = a.page_size;
  const int64_t n = a.seqlens[b];
  const KeyRange span = decode_span(a.len_q, n, a.window_left, a.window_right);
  const DecodeTiles mine = decode_chunk_tiles(decode_tiles(span.lo, span.hi, S, Tr::kTile), *a.ws_quota, split);
  if (mine.count <= 0) return;
  const PagedLayout L{a.num_pages, a.heads_kv, S, D};

  // Q prologue
  std::vector<float> qs(kR * D), qsc(kR), bias(kR);
  std::vector<uint8_t> q_img(Tr::kQBytes, 0x55);
  for (int i = 0; i < kR; ++i) {
    const int64_t r = rb * kR + i;
    for (int d = 0; d < D; ++d) {
      float v = 0.f;
      if (r < a.rows) {
        const int64_t hq = fault == 3 ? h * group : decode_row_head(r, h, group);
        v = a.q[decode_q_offset(b, decode_row_token(r, group), hq, a.len_q, a.heads_q, D) + d] * a.qk_mul;
      }
      qs[i * D + d] = v;
    }
    float amax = 0.f;
    for (int d = 0; d < D; ++d) amax = std::max(amax, std::fabs(qs[i * D + d]));
    const IntQuantParams p = int_quant_params(amax, 8);
    for (int d = 0; d < D; ++d)
      q_img[i * Tr::kQRowBytes + d] = static_cast<uint8_t>(static_cast<int8_t>(quantize_int(qs[i * D + d], p.inv_scale, 8)));
    qsc[i] = p.scale;
  }
  // Rows' visible keys, by C-fragment row.
  std::vector<KeyRange> vis(kR);
  for (int i = 0; i < kR; ++i) {
    const int64_t r = rb * kR + i;
    vis[i] = r < a.rows ? decode_visible_keys(decode_row_token(r, group), a.len_q, n, a.window_left, a.window_right)
                        : KeyRange{0, 0};
  }

  // Per warp, per lane: acc[dn][i] (channels of warp w), m and l per row (identical in every warp and lane
  // of a row: kept per row).
  std::vector<float> acc(kW * 32 * Tr::kDn * 4, 0.f);
  auto accv = [&](int w, int l, int dn, int i) -> float& { return acc[((w * 32 + l) * Tr::kDn + dn) * 4 + i]; };
  std::vector<float> m(kR, -INFINITY), lsum(kR, 0.f);
  std::vector<uint8_t> k_img(Tr::kKBytes), v_img(Tr::kVBytes), p_img(Tr::kPBytes);

  for (int64_t it = 0; it < mine.count; ++it) {
    const int64_t gt = mine.first + it;
    const DecodeTileSlots ts = decode_tile_slots(a, b, gt, span, Tr::kTile);
    const KeyRange kr = ts.keys;
    const int64_t page = ts.page, slot0 = ts.slot0;
    const int nt = ts.nt;
    // stage images: cp.async 16-byte chunks (zero fill past nt), pads poisoned
    std::fill(k_img.begin(), k_img.end(), 0x55);
    std::fill(v_img.begin(), v_img.end(), 0x7f);
    const int64_t off = paged_token_offset(L, page, h, slot0);
    constexpr int kChunks = D / 16;
    for (int i = 0; i < Tr::kTile * kChunks; ++i) {
      const int row = chunk_row(i, kChunks), cb = chunk_col_byte(i, kChunks);
      for (int x = 0; x < 16; ++x) {
        k_img[row * Tr::kKRowBytes + cb + x] = row < nt ? static_cast<uint8_t>(a.k_codes[off + row * D + cb + x]) : 0;
        v_img[row * Tr::kVRowBytes + cb + x] = row < nt ? a.v_codes[off + row * D + cb + x] : 0;
      }
    }
    const float* kmean = a.page_meta + paged_meta_offset(L, page, h, 0);
    const float* vscale = kmean + D;
    for (int i = 0; i < kR; ++i) {
      std::vector<float> part(32, 0.f);
      for (int lane = 0; lane < 32; ++lane)
        for (int d = lane; d < D; d += 32) part[lane] = part[lane] + qs[i * D + d] * kmean[d];
      bias[i] = warp_sum(part);
    }

    // ---- S = Q K^T, per warp ----
    std::vector<float> sc(kW * 32 * 8);  // [w][lane][nt2 * 4 + i]
    std::vector<float> red_max(kW * kR), red_sum(kW * kR);
    for (int w = 0; w < kW; ++w) {
      int32_t sacc[2][32][4] = {};
      for (int kk = 0; kk < Tr::kQKSteps; ++kk) {
        uint32_t af[32][4];
        for (int lane = 0; lane < 32; ++lane)
          for (int r = 0; r < 4; ++r) af[lane][r] = ld32(q_img, decode_q_frag_offset<Tr>(lane / 4, lane % 4, kk, r));
        for (int nt2 = 0; nt2 < 2; ++nt2) {
          uint32_t bf[32][2];
          for (int lane = 0; lane < 32; ++lane)
            for (int j = 0; j < 2; ++j) bf[lane][j] = ld32(k_img, decode_k_frag_offset<Tr>(w, nt2, lane / 4, lane % 4, kk, j));
          mma_s8(sacc[nt2], af, bf);
        }
      }
      for (int hh = 0; hh < 2; ++hh)
        for (int g = 0; g < 8; ++g) {
          const int row = frag_c_row(g, 2 * hh);
          float mx = -INFINITY;
          for (int t = 0; t < 4; ++t) {
            const int lane = 4 * g + t;
            for (int nt2 = 0; nt2 < 2; ++nt2)
              for (int e = 0; e < 2; ++e) {
                const int key = decode_qk_key(w, nt2, t, e);
                const int64_t j = kr.lo + key;
                const bool v = key < nt && j >= vis[row].lo && j < vis[row].hi;
                const float ksc = v ? a.k_scale[paged_scale_offset(L, page, h, slot0 + key)] : 0.f;
                const float s = static_cast<float>(sacc[nt2][lane][2 * hh + e]) * (qsc[row] * ksc) + bias[row];
                sc[(w * 32 + lane) * 8 + nt2 * 4 + 2 * hh + e] = v ? s : -INFINITY;
                mx = std::max(mx, v ? s : -INFINITY);
              }
          }
          red_max[w * kR + row] = mx;
        }
    }
    // ---- softmax, P~ image ----
    std::fill(p_img.begin(), p_img.end(), FP8 ? 0x7f : 0xff);
    std::vector<float> alpha(kR, 1.f), m_new(kR);
    std::vector<char> any(kR);
    for (int row = 0; row < kR; ++row) {
      float tm = red_max[row];
      for (int w = 1; w < kW; ++w) tm = std::max(tm, red_max[w * kR + row]);
      any[row] = tm != -INFINITY;
      m_new[row] = any[row] ? std::max(m[row], tm) : m[row];
      alpha[row] = !any[row] || m_new[row] == m[row] ? 1.f : std::exp2(m[row] - m_new[row]);
    }
    for (int w = 0; w < kW; ++w)
      for (int lane = 0; lane < 32; ++lane) {
        const int g = lane / 4, t = lane % 4;
        for (int hh = 0; hh < 2; ++hh) {
          const int row = frag_c_row(g, 2 * hh);
          const float m_shift = any[row] ? m_new[row] - kFp8POffset : 0.f;
          for (int nt2 = 0; nt2 < 2; ++nt2) {
            uint8_t x[2];
            for (int e = 0; e < 2; ++e) {
              x[e] = float_to_e4m3(std::exp2(sc[(w * 32 + lane) * 8 + nt2 * 4 + 2 * hh + e] - m_shift));
              red_sum[w * kR + row] += e4m3_to_float(x[e]);  // exact in any order (multiples of 2^-9, < 2^15)
            }
            const int off_p = decode_p_offset<Tr>(row, decode_qk_key(w, nt2, t, 0));
            if (FP8) {
              p_img[off_p] = x[0];
              p_img[off_p + 1] = x[1];
            } else {
              for (int e = 0; e < 2; ++e) {
                const uint16_t hb = e4m3_to_f16_bits(x[e]);
                p_img[off_p + 2 * e] = hb & 0xff;
                p_img[off_p + 2 * e + 1] = hb >> 8;
              }
            }
          }
        }
      }
    for (int row = 0; row < kR; ++row) {
      if (!any[row]) continue;
      float ts = 0.f;
      for (int w = 0; w < kW; ++w) ts += red_sum[w * kR + row];
      lsum[row] = lsum[row] * alpha[row] + ts;
      m[row] = m_new[row];
    }
    // ---- pv = P~ V, acc update ----
    for (int w = 0; w < kW; ++w) {
      std::vector<float> pv(32 * Tr::kDn * 4, 0.f);
      for (int kk = 0; kk < Tr::kPVSteps; ++kk) {
        uint32_t pa[32][4];
        for (int lane = 0; lane < 32; ++lane) {
          for (int r = 0; r < 4; ++r) pa[lane][r] = ld32(p_img, decode_p_frag_offset<Tr>(lane / 4, lane % 4, kk, r));
          if (fault == 1) std::swap(pa[lane][1], pa[lane][2]);
        }
        for (int dn = 0; dn < Tr::kDn; ++dn) {
          uint32_t bf[32][2];
          for (int lane = 0; lane < 32; ++lane) {
            const int g = lane / 4, t = lane % 4, ch = decode_pv_channel(w, dn, g, Tr::kWarpCh);
            for (int j = 0; j < 2; ++j) {
              const int jj = fault == 2 ? 1 - j : j;
              if (FP8) {
                uint32_t w32 = 0;
                for (int i = 0; i < 4; ++i)
                  w32 |= static_cast<uint32_t>(v_img[decode_v_offset<Tr>(decode_pv_key<Tr>(kk, t, jj, i), ch)]) << (8 * i);
                bf[lane][j] = w32;
              } else {
                const uint32_t lo = e4m3_to_f16_bits(v_img[decode_v_offset<Tr>(decode_pv_key<Tr>(kk, t, jj, 0), ch)]);
                const uint32_t hi = e4m3_to_f16_bits(v_img[decode_v_offset<Tr>(decode_pv_key<Tr>(kk, t, jj, 1), ch)]);
                bf[lane][j] = lo | (hi << 16);
              }
            }
          }
          float c[32][4];
          for (int lane = 0; lane < 32; ++lane)
            for (int i = 0; i < 4; ++i) c[lane][i] = pv[(lane * Tr::kDn + dn) * 4 + i];
          mma_pv(FP8, c, pa, bf);
          for (int lane = 0; lane < 32; ++lane)
            for (int i = 0; i < 4; ++i) pv[(lane * Tr::kDn + dn) * 4 + i] = c[lane][i];
        }
      }
      for (int lane = 0; lane < 32; ++lane)
        for (int dn = 0; dn < Tr::kDn; ++dn)
          for (int i = 0; i < 4; ++i) {
            const int row = frag_c_row(lane / 4, i);
            const int c = decode_pv_out_channel(w, dn, lane % 4, i, Tr::kWarpCh);
            float& av = accv(w, lane, dn, i);
            av = av * alpha[row] + pv[(lane * Tr::kDn + dn) * 4 + i] * vscale[c];
          }
    }
  }
  // ---- partials ----
  for (int w = 0; w < kW; ++w)
    for (int lane = 0; lane < 32; ++lane)
      for (int dn = 0; dn < Tr::kDn; ++dn)
        for (int i = 0; i < 4; ++i) {
          const int row = frag_c_row(lane / 4, i);
          const int64_t r = rb * kR + row;
          if (r >= a.rows) continue;
          const int64_t prow = decode_partial_row(b, h, split, r, a.heads_kv, a.max_splits, a.rows);
          a.ws_acc[prow * D + decode_pv_out_channel(w, dn, lane % 4, i, Tr::kWarpCh)] = accv(w, lane, dn, i);
        }
  for (int row = 0; row < kR; ++row) {
    const int64_t r = rb * kR + row;
    if (r >= a.rows) continue;
    const int64_t prow = decode_partial_row(b, h, split, r, a.heads_kv, a.max_splits, a.rows);
    a.ws_ml[prow * 2] = m[row];
    a.ws_ml[prow * 2 + 1] = lsum[row];
  }
}

template <bool FP8>
void replay_split(const DecodeArgs& a, int64_t split, int64_t bh, int64_t rb, int fault) {
  if (a.head_dim == 64) return replay_cta<64, FP8>(a, split, bh, rb, fault);
  if (a.head_dim == 128) return replay_cta<128, FP8>(a, split, bh, rb, fault);
  return replay_cta<256, FP8>(a, split, bh, rb, fault);
}

void replay_merge(const DecodeArgs& a) {
  const int64_t D = a.head_dim, group = a.heads_q / a.heads_kv;
  for (int64_t bh = 0; bh < a.batch * a.heads_kv; ++bh)
    for (int64_t r = 0; r < a.rows; ++r) {
      const int64_t b = bh / a.heads_kv, h = bh % a.heads_kv, n = a.seqlens[b];
      const KeyRange span = decode_span(a.len_q, n, a.window_left, a.window_right);
      const int64_t chunks = decode_num_chunks(decode_tiles(span.lo, span.hi, a.page_size, kDecodeTile).count, *a.ws_quota);
      std::vector<float> acc(D, 0.f);
      float m_tot = -INFINITY, l_tot = 0.f;
      for (int64_t s = 0; s < chunks; ++s) {
        const int64_t prow = decode_partial_row(b, h, s, r, a.heads_kv, a.max_splits, a.rows);
        const float m = a.ws_ml[prow * 2], l = a.ws_ml[prow * 2 + 1];
        if (!(l > 0.f)) continue;
        const float m_new = std::max(m_tot, m);
        const float a_tot = std::exp2(m_tot - m_new), a_chunk = std::exp2(m - m_new);
        l_tot = l_tot * a_tot + l * a_chunk;
        for (int64_t c = 0; c < D; ++c) acc[c] = acc[c] * a_tot + a.ws_acc[prow * D + c] * a_chunk;
        m_tot = m_new;
      }
      const int64_t i = decode_row_token(r, group), hq = decode_row_head(r, h, group);
      const KeyRange vis = decode_visible_keys(i, a.len_q, n, a.window_left, a.window_right);
      const bool dead = vis.hi <= vis.lo || !(l_tot > 0.f);
      const float inv_l = dead ? 0.f : 1.f / l_tot;
      float* o = a.out + decode_q_offset(b, i, hq, a.len_q, a.heads_q, D);
      for (int64_t c = 0; c < D; ++c) o[c] = dead ? 0.f : acc[c] * inv_l;
      a.lse[(b * a.heads_q + hq) * a.len_q + i] =
          dead ? -INFINITY : (m_tot - kFp8POffset + std::log2(l_tot)) * 0.6931471805599453f;
    }
}

std::tuple<Tensor, Tensor> decode_emulate_cuda(const Tensor& q, const Tensor& k_codes, const Tensor& k_scale,
                                               const Tensor& v_codes, const Tensor& page_meta,
                                               const Tensor& block_table, const Tensor& seqlens, double scale,
                                               int64_t window_left, int64_t window_right, int64_t num_workers,
                                               int64_t sm_count, std::string pv, int64_t fault) {
  const char* op = "_decode_emulate_cuda";
  const DecodeCall call = check_decode_args(op, q, k_codes, k_scale, v_codes, page_meta, block_table, seqlens, scale,
                                            num_workers);
  TERSOR_CHECK_VALUE(pv == "fp8" || pv == "fp16", op, ": pv must be \"fp8\" or \"fp16\", got \"", pv, "\"");
  const PagedLayout l = call.l;
  const Tensor bt = as_contiguous(block_table), sl = as_contiguous(seqlens);
  const int64_t max_pages = bt.size(1);
  check_decode_indices(op, l, bt.const_data_ptr<int32_t>(), sl.const_data_ptr<int32_t>(), call.batch, max_pages);
  // The CUDA glue's plan: num_workers -1 asks the planner for this SM count.
  const DecodePlan plan = plan_decode(call, max_pages, num_workers, sm_count);
  const int64_t rows = plan.rows, row_blocks = plan.row_blocks, workers = plan.workers, max_splits = plan.max_splits;
  const Tensor qf = as_contiguous(as_dtype(q, ScalarType::Float));
  Tensor out = empty({call.batch, call.len_q, call.heads_q, l.head_dim}, ScalarType::Float, q.device());
  Tensor lse = empty({call.batch, call.heads_q, call.len_q}, ScalarType::Float, q.device());
  std::vector<float> ws_acc(call.batch * l.heads_kv * max_splits * rows * l.head_dim, std::nanf("")),
      ws_ml(call.batch * l.heads_kv * max_splits * rows * 2, std::nanf(""));
  int64_t quota = 0;
  DecodeArgs a = decode_args(call, plan, qf, k_codes, k_scale, v_codes, page_meta, bt, sl, scale, window_left,
                             window_right);
  a.ws_acc = ws_acc.data();
  a.ws_ml = ws_ml.data();
  a.ws_quota = &quota;
  a.out = out.mutable_data_ptr<float>();
  a.lse = lse.mutable_data_ptr<float>();
  // plan kernel
  int64_t total = 0;
  for (int64_t b = 0; b < a.batch; ++b)
    total += decode_seq_tiles(a.len_q, a.seqlens[b], window_left, window_right, a.page_size, kDecodeTile) * a.heads_kv;
  quota = decode_split_quota(total, workers);
  // split kernel: every CTA of the grid (parallel over (b, h): CTAs write disjoint workspace rows)
  const bool fp8 = pv == "fp8";
  const int f = static_cast<int>(fault);
  tersor::parallel_for(0, a.batch * a.heads_kv, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t bh = w0; bh < w1; ++bh)
      for (int64_t s = 0; s < max_splits; ++s)
        for (int64_t rb = 0; rb < row_blocks; ++rb) fp8 ? replay_split<true>(a, s, bh, rb, f) : replay_split<false>(a, s, bh, rb, f);
  });
  replay_merge(a);
  return {as_dtype(out, q.scalar_type()), lse};
}

// The planner's functions on the host: "auto_workers" (sm_count, pairs), "max_splits" (workers, max_pages,
// page_size), "quota" (total_tiles, workers), "chunks" (count, quota), "smem" (head_dim, fp8).
std::vector<int64_t> decode_plan(std::string fn, std::vector<int64_t> args) {
  const char* op = "_decode_plan";
  auto need = [&](size_t k) {
    TERSOR_CHECK_VALUE(args.size() == k, op, ": ", fn, " takes ", k, " arguments, got ", args.size());
  };
  if (fn == "auto_workers") {
    need(2);
    return {decode_auto_workers(args[0], args[1])};
  }
  if (fn == "max_splits") {
    need(3);
    return {decode_max_splits(args[0], args[1], args[2], kDecodeTile)};
  }
  if (fn == "quota") {
    need(2);
    return {decode_split_quota(args[0], args[1])};
  }
  if (fn == "chunks") {
    need(2);
    return {decode_num_chunks(args[0], args[1])};
  }
  if (fn == "smem") {
    need(2);
    const bool f8 = args[1] != 0;
    if (args[0] == 64) return {f8 ? DecodeTraits<64, true>::kSmemBytes : DecodeTraits<64, false>::kSmemBytes};
    if (args[0] == 128) return {f8 ? DecodeTraits<128, true>::kSmemBytes : DecodeTraits<128, false>::kSmemBytes};
    if (args[0] == 256) return {f8 ? DecodeTraits<256, true>::kSmemBytes : DecodeTraits<256, false>::kSmemBytes};
    TERSOR_CHECK_VALUE(false, op, ": smem: head_dim must be 64, 128 or 256");
  }
  TERSOR_CHECK_VALUE(false, op, ": unknown function \"", fn, "\"");
  return {};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(tersor_testing, CPU, m) {
  m.impl("_decode_emulate_cuda", TORCH_BOX(&decode_emulate_cuda));
}
STABLE_TORCH_LIBRARY_IMPL(tersor_testing, CompositeExplicitAutograd, m) {
  m.impl("_decode_plan", TORCH_BOX(&decode_plan));
}

}  // namespace tersor::attention
