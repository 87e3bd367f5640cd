// Tile choices, split-KV planner and fragment math of the CUDA decode kernels (decode_kernel.cuh), shared with
// their lane-by-lane CPU replay (decode_cuda_emulate.cpp) so the replay exercises the very mappings the kernels
// use. Torch-free, host + device. Numerics contract: the CPU twin, paged_cpu.cpp (sage_decode_paged_cpu).
//
// One CTA = one split-KV work item: (sequence b, KV head h, row block rb, chunk s). Its 16 rows are rows
// rb*16 .. rb*16+15 of the (b, h) block of R = Lq * group rows (row r = query token r / group of query head
// h * group + r % group: GQA packed into the MMA's M dimension, padded to 16). The chunk is `quota` consecutive
// 64-key tiles of the sequence (paged_format.h: decode_tiles, decode_split_quota), walked in order with one
// online softmax, exactly as the twin walks one chunk. Per tile, the 4 warps split the work:
//   Q K^T  warp w: keys 16w .. 16w+15 of the tile (two 8-key n-tiles), all D channels (mma.m16n8k32.s8);
//   row max / row sum across warps through shared memory; P~ (e4m3) to shared memory;
//   P~ V   warp w: channels w*D/4 .. (w+1)*D/4 - 1, all 64 keys (FP8: mma.m16n8k32.e4m3 on sm_89; FP16:
//          mma.m16n8k16.f16 on the exact fp16 images of the e4m3 values, sm_80 / sm_90a).
// So the fp32 accumulator of a row is spread over the 4 warps by channel and never crosses warps.
//
// Lane l of a warp is (g, t) = (l / 4, l % 4); the PTX fragment rules are sage_cuda_layout.h's (frag_a_row,
// frag_k_byte, frag_c_row, frag_c_col).
#pragma once

#include <cstdint>

#include "attention/paged_format.h"
#include "attention/sage_cuda_layout.h"
#include "common/macros.h"

namespace tersor::attention {

// The one place for the decode kernels' tile and arch choices.
template <int kHeadDim, bool kFp8Pv>
struct DecodeTraits {
  static_assert(kHeadDim == 64 || kHeadDim == 128 || kHeadDim == 256, "paged head dims");
  static constexpr int kD = kHeadDim;
  static constexpr bool kFp8 = kFp8Pv;         // P~ V by e4m3 mma (sm_89) or by fp16 mma on e4m3 images
  static constexpr int kRows = 16;             // rows per CTA: one MMA m-tile
  static constexpr int kTile = 64;             // keys per tile (the twin's kDecodeTile)
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kWarpKeys = kTile / kWarps;   // Q K^T keys per warp: 16 (two n-tiles)
  static constexpr int kWarpCh = kD / kWarps;        // P~ V channels per warp
  static constexpr int kDn = kWarpCh / 8;            // P~ V n-tiles per warp (2, 4, 8)
  static constexpr int kQKSteps = kD / 32;           // 32-channel k-steps of Q K^T
  static constexpr int kPElemBytes = kFp8 ? 1 : 2;   // P~ in shared memory: e4m3 bytes or fp16
  static constexpr int kPVSteps = kTile * kPElemBytes / 32;  // 32-byte k-steps of P~ V (2 FP8, 4 FP16)
  // Shared rows padded by 16 bytes (consecutive rows 4 banks apart; cp.async needs 16-byte alignment).
  static constexpr int kQRowBytes = kD + 16;         // Q codes
  static constexpr int kKRowBytes = kD + 16;         // K codes, token-major as in the page
  static constexpr int kVRowBytes = kD + 16;         // V codes, token-major as in the page
  static constexpr int kPRowBytes = kTile * kPElemBytes + 16;
  static constexpr int kStages = 2;                  // cp.async double buffer of K and V tiles
  static constexpr int kQBytes = kRows * kQRowBytes;
  static constexpr int kQsBytes = kRows * kD * 4;    // Q * scale * log2 e in fp32 (for q . k_mean)
  static constexpr int kKBytes = kTile * kKRowBytes;
  static constexpr int kVBytes = kTile * kVRowBytes;
  static constexpr int kPBytes = kRows * kPRowBytes;
  static constexpr int kRedBytes = (2 * kWarps * kRows + 2 * kRows) * 4;  // row max, row sum partials, q scale, bias
  static constexpr int kSmemBytes = kQBytes + kQsBytes + kStages * (kKBytes + kVBytes) + kPBytes + kRedBytes;
  static constexpr int kMergeThreads = 128;
};

// Arguments of the decode kernels (and of their CPU replay): plain pointers, no CUDA or torch types.
struct DecodeArgs {
  int64_t batch, len_q, heads_q, heads_kv, head_dim, page_size, num_pages, max_pages;
  int64_t window_left, window_right;
  int64_t workers;     // split-KV work items (0: one chunk per (b, h)); the quota is decode_split_quota(total, workers)
  int64_t max_splits;  // grid size along the chunks (decode_max_splits)
  int64_t rows;        // len_q * group
  int64_t row_blocks;  // ceil(rows / 16)
  float qk_mul;        // scale * log2(e)
  const float* q;      // [B, Lq, Hq, D] fp32 (q in fp32, exactly as the twin widens it)
  const int8_t* k_codes;
  const float* k_scale;
  const uint8_t* v_codes;
  const float* page_meta;
  const int32_t* block_table;  // [B, max_pages]
  const int32_t* seqlens;      // [B]
  float* ws_acc;   // [B, Hkv, max_splits, rows, D]
  float* ws_ml;    // [B, Hkv, max_splits, rows, 2]: m, l
  int64_t* ws_quota;  // [1]
  float* out;      // [B, Lq, Hq, D] fp32
  float* lse;      // [B, Hq, Lq]
};

// The cache slots of tile gt (decode_tile_keys over the keys [span.lo, span.hi)) of sequence b: its keys, the page
// holding them, the first slot there and the number of keys. A block-table entry that is not a page of this cache
// gives page 0, slot 0 and no keys, so nothing outside the cache is read (the wrappers validate the table first).
// The kernel's loads and its scale reads and the CPU replay all resolve a tile here.
struct DecodeTileSlots {
  KeyRange keys;
  int64_t page, slot0;
  int nt;
};
TERSOR_HD inline DecodeTileSlots decode_tile_slots(const DecodeArgs& a, int64_t b, int64_t gt, const KeyRange& span,
                                                   int64_t tile) {
  const int64_t S = a.page_size;
  const KeyRange kr = decode_tile_keys(gt, span.lo, span.hi, S, tile);
  const int64_t id = a.block_table[b * a.max_pages + kr.lo / S];
  const bool ok = id >= 0 && id < a.num_pages;
  return {kr, ok ? id : 0, ok ? kr.lo % S : 0, ok ? static_cast<int>(kr.hi - kr.lo) : 0};
}

// ---- split-KV planner ----
// CTAs per SM the planner aims at: 2. The kernel's 128 threads and 28 / 49 / 91 KiB of shared memory at D = 64 /
// 128 / 256 let 2 CTAs reside per SM at D <= 128 on sm_80 / sm_90 (164 / 228 KiB per SM) and at D = 64 on sm_89
// (100 KiB); where only one fits, the second wave of a 2-per-SM grid runs after the first (the split sizes still
// balance). Two resident CTAs hide one CTA's barriers and workspace writes behind the other's loads.
constexpr int64_t kDecodeCtasPerSm = 2;

// Work items for an automatic split: (b, h, row block) triples `pairs` already give one CTA each; when they
// fill fewer than the device's slots, each is split into s = slots / pairs chunks, i.e. num_workers = s * pairs
// (with equal lengths, decode_split_quota then gives every triple exactly s chunks). 0 = no split (pairs alone
// fill the device, or s would be 1).
TERSOR_HD constexpr int64_t decode_auto_workers(int64_t sm_count, int64_t pairs) {
  if (sm_count <= 0 || pairs <= 0) return 0;
  const int64_t s = sm_count * kDecodeCtasPerSm / pairs;
  return s >= 2 ? s * pairs : 0;
}

// Grid size along the splits: the most chunks any (b, h) can have. With quota = ceil(total / workers) >=
// count_b / workers, ceil(count_b / quota) <= workers; and <= count_b <= seq_tiles (the tiles of a full block
// table row). 1 when workers <= 0 (no split).
TERSOR_HD constexpr int64_t decode_max_splits(int64_t workers, int64_t max_pages, int64_t page_size, int64_t tile) {
  const int64_t seq_tiles = max_pages * decode_cells_per_page(page_size, tile);
  if (workers <= 0) return 1;
  const int64_t m = workers < seq_tiles ? workers : seq_tiles;
  return m > 0 ? m : 1;
}

// Chunks of a (b, h) of `count` tiles at this quota, and the tiles [first, end) of chunk s.
TERSOR_HD constexpr int64_t decode_num_chunks(int64_t count, int64_t quota) {
  return count <= 0 ? 0 : (count + quota - 1) / quota;
}
TERSOR_HD constexpr DecodeTiles decode_chunk_tiles(DecodeTiles all, int64_t quota, int64_t s) {
  const int64_t first = all.first + s * quota;
  const int64_t end = all.first + all.count;
  const int64_t z = first + quota < end ? first + quota : end;
  return {first, z > first ? z - first : 0};
}

// Total key tiles of sequence b's span, times heads (the twin's total_tiles summand).
TERSOR_HD constexpr int64_t decode_seq_tiles(int64_t len_q, int64_t seqlen, int64_t left, int64_t right,
                                             int64_t page_size, int64_t tile) {
  const KeyRange span = decode_span(len_q, seqlen, left, right);
  return decode_tiles(span.lo, span.hi, page_size, tile).count;
}

// ---- rows ----
// Row r (< len_q * group) of KV head h: query token and query head.
TERSOR_HD constexpr int64_t decode_row_token(int64_t r, int64_t group) { return r / group; }
TERSOR_HD constexpr int64_t decode_row_head(int64_t r, int64_t h, int64_t group) { return h * group + r % group; }
// Element offset of q / out [B, Lq, Hq, D] row (b, token i, head hq).
TERSOR_HD constexpr int64_t decode_q_offset(int64_t b, int64_t i, int64_t hq, int64_t len_q, int64_t heads_q,
                                            int64_t head_dim) {
  return ((b * len_q + i) * heads_q + hq) * head_dim;
}
// Workspace row of chunk s of row r of (b, h): partial acc [.., D], m and l [..].
TERSOR_HD constexpr int64_t decode_partial_row(int64_t b, int64_t h, int64_t s, int64_t r, int64_t heads_kv,
                                               int64_t max_splits, int64_t rows) {
  return ((b * heads_kv + h) * max_splits + s) * rows + r;
}

// ---- fragments (warp w, lane (g, t)) ----
// Q K^T: key (within the 64-key tile) of accumulator element i of n-tile nt.
TERSOR_HD constexpr int decode_qk_key(int w, int nt, int t, int i) { return 16 * w + 8 * nt + frag_c_col(t, i); }
// Q A-fragment register r of k-step kk (shared Q codes, kQRowBytes per row).
template <typename Tr>
TERSOR_HD constexpr int decode_q_frag_offset(int g, int t, int kk, int r) {
  return frag_a_row(g, r) * Tr::kQRowBytes + kk * 32 + frag_k_byte(t, r >> 1);
}
// K B-fragment register j of n-tile nt, k-step kk: key 16w + 8nt + g, channels 4t + 16j + 32kk .. +3 (the
// K row as stored in the page is the MMA's column-major B: no transpose).
template <typename Tr>
TERSOR_HD constexpr int decode_k_frag_offset(int w, int nt, int g, int t, int kk, int j) {
  return (16 * w + 8 * nt + g) * Tr::kKRowBytes + kk * 32 + frag_k_byte(t, j);
}
// P~ in shared memory: byte offset of (row, key).
template <typename Tr>
TERSOR_HD constexpr int decode_p_offset(int row, int key) {
  return row * Tr::kPRowBytes + key * Tr::kPElemBytes;
}
// P~ V A-fragment register r of 32-byte k-step kk: row g + 8 (r & 1), bytes 4t + 16 (r >> 1) of the step (FP8:
// 4 keys; FP16 m16n8k16: 2 keys at the same byte positions).
template <typename Tr>
TERSOR_HD constexpr int decode_p_frag_offset(int g, int t, int kk, int r) {
  return frag_a_row(g, r) * Tr::kPRowBytes + kk * 32 + frag_k_byte(t, r >> 1);
}
// P~ V B-fragment: register j of k-step kk holds channel decode_pv_channel(w, dn, g) of the keys
// decode_pv_key(kk, t, j, i), i < 4 (FP8) or i < 2 (FP16); V is token-major in shared memory, so each is a
// byte gathered from its own token row (no 8-bit ldmatrix.trans before sm_100).
TERSOR_HD constexpr int decode_pv_channel(int w, int dn, int g, int warp_ch) { return w * warp_ch + 8 * dn + g; }
template <typename Tr>
TERSOR_HD constexpr int decode_pv_key(int kk, int t, int j, int i) {
  return Tr::kFp8 ? 32 * kk + 16 * j + 4 * t + i : 16 * kk + 8 * j + 2 * t + i;
}
template <typename Tr>
TERSOR_HD constexpr int decode_v_offset(int key, int channel) {
  return key * Tr::kVRowBytes + channel;
}
// P~ V accumulator element i of n-tile dn: its channel (its row is frag_c_row(g, i)).
TERSOR_HD constexpr int decode_pv_out_channel(int w, int dn, int t, int i, int warp_ch) {
  return w * warp_ch + 8 * dn + frag_c_col(t, i);
}

// e4m3 bits -> fp16 bits, exactly (sm_80 has no cvt from e4m3): e4m3 s.eeee.mmm is fp16 s.0eeee.mmm0000000
// times 2^8 (exponent biases 7 and 15), subnormals included; NaN (0x7f) never occurs in the cache (satfinite).
// The kernel multiplies the fp16 by 256 (exact); this returns the pre-multiply bits of one byte.
TERSOR_HD constexpr uint16_t decode_e4m3_to_f16_prescaled_bits(uint8_t x) {
  return static_cast<uint16_t>(((x & 0x80u) << 8) | ((x & 0x7fu) << 7));
}

}  // namespace tersor::attention
