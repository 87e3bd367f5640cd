// _sage_sm90_layout_check: the sm90a attention kernel's addressing (sage_sm90_layout.h, the functions the
// kernel calls) replayed on the CPU against an independent model of the hardware, so layout bugs show up
// without a GPU. One (batch, kv head) slice of 2 key tiles and one consumer warpgroup (64 query rows):
//   writer  : the relayout kernel's chunks from the sm8x prologue layouts into tile-native blocks;
//   copy    : the producer's cp.async.bulk of a whole tile block into a shared stage (a memcpy);
//   "wgmma" : m64n64k32 8-bit with A from the 128 lanes' registers and B through the 64-bit descriptor the
//             kernel builds, decoded by the PTX rules (start/LBO/SBO, K-major core matrices) -- the rules
//             are written out here again, independently of the kernel-side helpers;
//   reader  : the kernel's accumulator -> (row, key / channel) maps, its Q register loads, its P packing.
// Products are of integer bytes (the layout is what is checked, not fp8 rounding). Returns mismatch counts:
// [k tile bijection, v tile bijection, Q K^T elements, P V elements, Q scale groups, K scale groups,
//  P fragment rows/tokens]. `fault` injects a kernel-side bug (tests show each one is caught).

#include <array>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "attention/sage_format.h"
#include "attention/sage_sm90_layout.h"
#include "attention/sage_sm90_traits.h"
#include "common/torch_glue.h"

namespace tersor::attention {
namespace {

// PTX "hardware" for one warpgroup: lane (w, g, t) register r byte j of the A fragment is element
// (16 w + g + 8 (r % 2), 4 t + 16 (r / 2) + j); accumulator register i is (16 w + g + 8 ((i / 2) % 2),
// 8 (i / 4) + 2 t + i % 2). Written without the kernel's helpers on purpose.
struct Lane {
  int w, g, t;
};
Lane lane_of(int tid) { return {tid / 32, (tid % 32) / 4, tid % 4}; }

// D[64][64] = A[64][32] B[32][64] from registers (a[tid][r] packed bytes) and shared memory through desc.
void hw_wgmma_m64n64k32(const std::vector<std::array<uint32_t, 4>>& a, const std::vector<uint8_t>& smem,
                        uint64_t desc, std::vector<int64_t>& d) {
  int8_t A[64][32];
  for (int tid = 0; tid < 128; ++tid) {
    const Lane L = lane_of(tid);
    for (int r = 0; r < 4; ++r)
      for (int j = 0; j < 4; ++j)
        A[16 * L.w + L.g + 8 * (r % 2)][4 * L.t + 16 * (r / 2) + j] = static_cast<int8_t>((a[tid][r] >> (8 * j)) & 0xFF);
  }
  const uint32_t start = static_cast<uint32_t>(desc & 0x3FFF) * 16;
  const uint32_t lbo = static_cast<uint32_t>((desc >> 16) & 0x3FFF) * 16;
  const uint32_t sbo = static_cast<uint32_t>((desc >> 32) & 0x3FFF) * 16;
  for (int m = 0; m < 64; ++m)
    for (int n = 0; n < 64; ++n) {
      int64_t s = 0;
      for (int k = 0; k < 32; ++k) {
        // K-major, no swizzle: core matrix (n / 8, k / 16), row n % 8 at 16 bytes, k % 16 within the row.
        const uint32_t addr = start + (n / 8) * sbo + (k / 16) * lbo + (n % 8) * 16 + k % 16;
        TERSOR_CHECK(addr < smem.size(), "_sage_sm90_layout_check: descriptor reads past the stage");
        s += static_cast<int64_t>(A[m][k]) * static_cast<int8_t>(smem[addr]);
      }
      d[m * 64 + n] += s;
    }
}
int64_t hw_acc(const std::vector<int64_t>& d, int tid, int i) {
  const Lane L = lane_of(tid);
  return d[(16 * L.w + L.g + 8 * ((i / 2) % 2)) * 64 + 8 * (i / 4) + 2 * L.t + i % 2];
}

template <int D>
std::vector<int64_t> check(int64_t fault) {
  using Tr = SageAttnSm90KernelTraits<D>;
  constexpr int kTiles = 2, kLenKPad = kTiles * 128;
  std::mt19937 rng(1234 + D);
  auto rnd = [&] { return static_cast<uint8_t>(rng() & 0xFF); };
  std::vector<int64_t> bad(7, 0);

  // Prologue outputs (sm8x layouts) of one slice: int8 K [Lk_pad, D]; e4m3 V^T [D, Lk_pad] with position p
  // holding token v_fp8_position_token(p); Q [64, D]. Small values keep every product exact in int64.
  std::vector<uint8_t> k_int(kLenKPad * D), v_t(D * kLenKPad), q_int(64 * D);
  for (auto& x : k_int) x = rnd();
  for (auto& x : v_t) x = rnd();
  for (auto& x : q_int) x = rnd();
  auto K = [&](int token, int c) { return static_cast<int64_t>(static_cast<int8_t>(k_int[token * D + c])); };
  std::vector<int> pos_of_token(kLenKPad);
  for (int p = 0; p < kLenKPad; ++p) pos_of_token[v_fp8_position_token(p)] = p;
  auto V = [&](int token, int ch) {
    return static_cast<int64_t>(static_cast<int8_t>(v_t[ch * kLenKPad + pos_of_token[token]]));
  };

  // ---- writer: the relayout kernel, chunk by chunk ----
  std::vector<uint8_t> k_tiles(kLenKPad * D, 0), v_tiles(D * kLenKPad, 0);
  std::vector<int> k_hits(kLenKPad * D, 0), v_hits(D * kLenKPad, 0);
  for (int tile = 0; tile < kTiles; ++tile) {
    const int64_t base = sm90_tile_base(0, kLenKPad, tile, D);
    for (int i = 0; i < 128 * D / 16; ++i) {
      const int n = sm90_relayout_k_token<D>(i), c = sm90_relayout_k_byte<D>(i);
      const int ch = sm90_relayout_v_channel(i), p = sm90_relayout_v_position(i);
      for (int b = 0; b < 16; ++b) {
        const int64_t kd = base + sm90_k_tile_offset<D>(n, c) + b;
        // fault 6: V^T core matrices ordered channel-fastest (the LBO/SBO roles swapped on the writer side).
        const int v_off = fault == 6 ? ((p / 16) * (D / 8) + ch / 8) * kSm90CoreBytes + (ch % 8) * 16 + p % 16
                                     : sm90_v_tile_offset(ch, p);
        const int64_t vd = base + v_off + b;
        const bool k_in = kd >= 0 && kd < static_cast<int64_t>(k_tiles.size());
        const bool v_in = vd >= 0 && vd < static_cast<int64_t>(v_tiles.size());
        bad[0] += !k_in;
        bad[1] += !v_in;
        if (k_in) k_tiles[kd] = k_int[(tile * 128 + n) * D + c + b], ++k_hits[kd];
        if (v_in) v_tiles[vd] = v_t[ch * kLenKPad + tile * 128 + p + b], ++v_hits[vd];
      }
    }
  }
  for (int x : k_hits) bad[0] += x != 1;
  for (int x : v_hits) bad[1] += x != 1;

  // ---- Q registers (loaded once by the kernel) ----
  std::vector<std::array<uint32_t, 4>> qf[Tr::kQKSteps];
  for (int kk = 0; kk < Tr::kQKSteps; ++kk) {
    qf[kk].resize(128);
    for (int tid = 0; tid < 128; ++tid) {
      const Lane L = lane_of(tid);
      for (int r = 0; r < 4; ++r) {
        const int rr = fault == 4 && (r == 1 || r == 2) ? 3 - r : r;
        uint32_t word;
        std::memcpy(&word, q_int.data() + sm90_q_frag_offset<D>(L.w, L.g, L.t, kk, rr), 4);
        qf[kk][tid][r] = word;
      }
    }
  }
  auto Q = [&](int row, int c) { return static_cast<int64_t>(static_cast<int8_t>(q_int[row * D + c])); };
  // A P value per (row, key of the tile): any distinct small integers do.
  auto P = [](int row, int key) { return static_cast<int64_t>((row * 7 + key * 13) % 23) - 11; };

  // ---- per tile: bulk copy into stage tile % 2, then both halves as the consumer runs them ----
  const uint32_t kStage0 = 0;  // the kernel's stages start at the dynamic smem base
  for (int tile = 0; tile < kTiles; ++tile) {
    const int s = tile % Tr::kStages;
    std::vector<uint8_t> smem(Tr::kStages * Tr::kStageBytes, 0xA5);  // poisoned
    const int64_t base = sm90_tile_base(0, kLenKPad, tile, D);
    const uint32_t k_addr = kStage0 + s * Tr::kStageBytes, v_addr = k_addr + Tr::kKTileBytes;
    std::memcpy(smem.data() + k_addr, k_tiles.data() + base, Tr::kKTileBytes);
    std::memcpy(smem.data() + v_addr, v_tiles.data() + base, Tr::kVTileBytes);
    for (int half = 0; half < Tr::kHalves; ++half) {
      std::vector<int64_t> dqk(64 * 64, 0);
      for (int kk = 0; kk < Tr::kQKSteps; ++kk) {
        uint64_t desc = sm90_k_desc<D>(k_addr, half, kk);
        if (fault == 1) desc = wgmma_smem_desc(k_addr + sm90_k_desc_start<D>(half, kk), sm90_k_sbo<D>(), kSm90KLbo);
        if (fault == 3) desc = wgmma_desc_advance(sm90_k_desc<D>(k_addr, half, 0), 32 * kk);
        hw_wgmma_m64n64k32(qf[kk], smem, desc, dqk);
      }
      // Kernel view of the accumulator: register i of a lane is S[wg_acc_row][key0 + wg_acc_col].
      for (int tid = 0; tid < 128; ++tid) {
        const Lane L = lane_of(tid);
        for (int i = 0; i < Tr::kAccRegs; ++i) {
          const int row = wg_acc_row(L.w, L.g, i), key = half * 64 + wg_acc_col(L.t, i);
          int64_t ref = 0;
          for (int c = 0; c < D; ++c) ref += Q(row, c) * K(tile * 128 + key, c);
          bad[2] += hw_acc(dqk, tid, i) != ref;
          // Scale groups: the lane's one Q scale / one K scale per half must be every element's group.
          for (int64_t wg_row0 : {int64_t{0}, int64_t{64}, int64_t{192}}) {
            const int64_t qs = sm90_q_scale_index(0, 256, wg_row0, L.w, L.g);
            bad[4] += qs != q_group(wg_row0 + row);
          }
          const int ks = sm90_k_scale_in_slice(tile, fault == 5 ? 0 : half, L.t);
          bad[5] += ks != k_group(tile * 128 + key);
        }
      }
      // P~ into A registers by the kernel's packing, from the accumulator-position values.
      std::vector<std::array<uint32_t, 4>> pa[Tr::kPVSteps];
      for (int kk = 0; kk < Tr::kPVSteps; ++kk) {
        pa[kk].resize(128);
        for (int tid = 0; tid < 128; ++tid) {
          const Lane L = lane_of(tid);
          for (int r = 0; r < 4; ++r) {
            uint32_t word = 0;
            for (int j = 0; j < 4; ++j) {
              const int i = sm90_p_acc_reg(kk, r, fault == 2 ? j ^ 2 : j);
              const int row = wg_acc_row(L.w, L.g, i), key = half * 64 + wg_acc_col(L.t, i);
              // The A element this byte feeds (PTX rule) must be this accumulator's row, and its k position
              // must hold this token in the permuted V^T.
              const int a_row = 16 * L.w + L.g + 8 * (r % 2), a_k = 4 * L.t + 16 * (r / 2) + j;
              bad[6] += a_row != row || v_fp8_position_token(half * 64 + kk * 32 + a_k) != key;
              word |= (static_cast<uint32_t>(static_cast<uint8_t>(P(row, key))) << (8 * j));
            }
            pa[kk][tid][r] = word;
          }
        }
      }
      for (int cb = 0; cb < Tr::kPVChunks; ++cb) {
        std::vector<int64_t> dpv(64 * 64, 0);
        for (int kk = 0; kk < Tr::kPVSteps; ++kk) hw_wgmma_m64n64k32(pa[kk], smem, sm90_v_desc(v_addr, cb, half, kk), dpv);
        for (int tid = 0; tid < 128; ++tid) {
          const Lane L = lane_of(tid);
          for (int i = 0; i < Tr::kAccRegs; ++i) {
            const int row = wg_acc_row(L.w, L.g, i), ch = cb * 64 + wg_acc_col(L.t, i);
            int64_t ref = 0;
            for (int key = half * 64; key < half * 64 + 64; ++key) ref += P(row, key) * V(tile * 128 + key, ch);
            bad[3] += hw_acc(dpv, tid, i) != ref;
          }
        }
      }
    }
  }
  return bad;
}

std::vector<int64_t> sage_sm90_layout_check(int64_t head_dim, int64_t fault) {
  TERSOR_CHECK_VALUE(head_dim == 64 || head_dim == 128, "_sage_sm90_layout_check: head_dim must be 64 or 128, got ",
                    head_dim);
  TERSOR_CHECK_VALUE(fault >= 0 && fault <= 6, "_sage_sm90_layout_check: fault must be in [0, 6], got ", fault);
  return head_dim == 64 ? check<64>(fault) : check<128>(fault);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(tersor_testing, CompositeExplicitAutograd, m) {
  m.impl("_sage_sm90_layout_check", TORCH_BOX(&sage_sm90_layout_check));
}

}  // namespace tersor::attention
