// Paged KV cache v1 (docs/formats.md, "Paged KV cache v1"): the layout, the page-statistics rule and the
// visibility rule of decode, shared by the CPU twin (paged_cpu.cpp), the CUDA kernels (decode_kernel.cuh,
// paged_append_cuda.cu) and the CPU tests. Torch-free, host and device.
//
// Storage, per page p (block-table entry), KV head h, slot s (token position % page_size), channel d:
//   k_codes  int8    [P, Hkv, S, D]  K - k_mean(page, h), symmetric INT8 with one scale per token
//   k_scale  float32 [P, Hkv, S]     amax_d |K - k_mean| / 127 (0 for an all-zero row)
//   v_codes  uint8   [P, Hkv, S, D]  e4m3 bits of V / v_scale(page, h, d)
//   page_meta float32 [P, Hkv, 2, D]  [0] = k_mean, [1] = v_scale of the page
// Head-major inside a page (HND): a decode CTA reads one (page, head) slab of S * D contiguous bytes.
//
// Why one K scale per token (not per group of tokens as in prefill): decode writes one token at a time, and a
// group scale would have to grow, and the group be requantized, when a later token raises the group's amax.
// Why page statistics (k_mean, v_scale) instead of per-call ones: tokens are quantized once, on write, so the
// smoothing mean and V's channel scale must be fixed before the tokens that use them arrive. The rule
// (page_stats_source): the chunk that starts a sequence (start == 0, the prompt) fixes them from its own
// tokens; every page opened later copies them from the sequence's previous page. A page's tokens always
// share its statistics, so a decode reads them once per page (scores add q . k_mean(page) back exactly, and
// the P V of a page is scaled by its v_scale before it joins the accumulator), and a sequence's pages all
// carry its prompt's statistics.
#pragma once

#include <cstdint>

#include "attention/sage_format.h"  // quantize_int, float_to_e4m3, fp8_channel_params
#include "common/macros.h"

namespace tersor::attention {

struct PagedLayout {
  int64_t num_pages, heads_kv, page_size, head_dim;
};

// Offset (in elements) of token slot `slot` of KV head `h` in page `page`, channel 0, in k_codes / v_codes.
TERSOR_HD constexpr int64_t paged_token_offset(const PagedLayout& l, int64_t page, int64_t h, int64_t slot) {
  return ((page * l.heads_kv + h) * l.page_size + slot) * l.head_dim;
}
// Offset of a token's K scale in k_scale.
TERSOR_HD constexpr int64_t paged_scale_offset(const PagedLayout& l, int64_t page, int64_t h, int64_t slot) {
  return (page * l.heads_kv + h) * l.page_size + slot;
}
// Offset of k_mean (which = 0) or v_scale (which = 1), channel 0, of (page, h) in page_meta.
TERSOR_HD constexpr int64_t paged_meta_offset(const PagedLayout& l, int64_t page, int64_t h, int which) {
  return ((page * l.heads_kv + h) * 2 + which) * l.head_dim;
}

// V's e4m3 scale leaves this much headroom above the prompt's channel amax (amax maps to 448 / 16 = 28): later
// tokens up to 16x the prompt's amax stay in range (beyond, e4m3 saturates at 448). Headroom costs no
// precision for normal e4m3 values (3 mantissa bits at every exponent); it moves 4 binades of the smallest
// values (below amax * 2^-6 / 28) into subnormals, whose share of a softmax-weighted sum is negligible.
constexpr float kPagedVHeadroom = 16.f;

// The quantize-on-write arithmetic of one element, shared by the CPU twin (paged_cpu.cpp) and the CUDA append
// kernel (paged_append_cuda.cu) so both run the same fp32 operations in the same order (bit-identical codes):
// K: the INT8 code of k - k_mean at the token's inv_scale (int_quant_params(amax_d |k - k_mean|, 8));
// V: the e4m3 code of v * (1 / v_scale), 0 when the channel's scale is 0 (an all-zero prompt channel).
TERSOR_HD inline int8_t paged_k_code(float k_minus_mean, float inv_scale) {
  return static_cast<int8_t>(quantize_int(k_minus_mean, inv_scale, 8));
}
TERSOR_HD inline uint8_t paged_v_code(float v, float v_scale) {
  return v_scale > 0.f ? float_to_e4m3(v * (1.f / v_scale)) : 0;
}
// A prompt channel's V scale from its amax (|v| over the chunk's tokens), with the headroom.
TERSOR_HD inline float paged_v_scale(float amax) { return fp8_channel_params(kPagedVHeadroom * amax).scale; }

// Where a page's statistics come from when token `pos` (0-based in its sequence) is written to slot 0 of a
// page: the chunk's own tokens when the chunk starts the sequence (chunk_start == 0), else the page holding
// token pos - 1 (the sequence's previous page). Returns -1 for "the chunk" or the page-table column of the
// source page.
TERSOR_HD constexpr int64_t page_stats_source(int64_t chunk_start, int64_t pos, int64_t page_size) {
  return chunk_start == 0 ? -1 : (pos - 1) / page_size;
}

// Keys a decode query sees: query i of Lq (the last Lq tokens of a sequence of seqlen tokens, so at position
// p = seqlen - Lq + i) sees keys j with max(0, p - left) <= j <= min(p, p + right) (bottom-right causal, and
// FlashAttention's window convention: left/right < 0 mean unbounded). Returns [lo, hi) with hi <= lo when
// none (a query before the sequence's start, or seqlen == 0: output 0, LSE -inf).
using KeyRange = KeySpan;
// Prefill's rule (sage_format.h visible_keys_dense) with is_causal: the Lq queries are the sequence's last
// tokens, so the bottom-right alignment is the same.
TERSOR_HD constexpr KeyRange decode_visible_keys(int64_t i, int64_t len_q, int64_t seqlen, int64_t left,
                                                 int64_t right) {
  return visible_keys_dense(KeyMask{true, left < 0 ? -1 : left, right < 0 ? -1 : right}, i, len_q, seqlen);
}

// The keys any of the Lq queries sees: the union of their ranges (contiguous: each query's range is the
// previous one's shifted by one key). {0, 0} when none does.
TERSOR_HD constexpr KeyRange decode_span(int64_t len_q, int64_t seqlen, int64_t left, int64_t right) {
  KeyRange u{0, 0};
  bool any = false;
  for (int64_t i = 0; i < len_q; ++i) {
    const KeyRange r = decode_visible_keys(i, len_q, seqlen, left, right);
    if (r.hi <= r.lo) continue;
    u.lo = any && u.lo < r.lo ? u.lo : r.lo;
    u.hi = any && u.hi > r.hi ? u.hi : r.hi;
    any = true;
  }
  return u;
}

// Decode walks keys in tiles: the cells of a grid of `tile` keys laid over each page (a page of S > tile tokens
// has ceil(S / tile) cells, the last one short when tile does not divide S), clipped to the span [lo, hi).
// Tiles are numbered over the sequence (cell g = page column g / cells_per_page, cell g % cells_per_page);
// the span's tiles are `count` consecutive numbers from `first` (none when hi <= lo).
struct DecodeTiles {
  int64_t first, count;
};
TERSOR_HD constexpr int64_t decode_cells_per_page(int64_t page_size, int64_t tile) {
  return (page_size + tile - 1) / tile;
}
TERSOR_HD constexpr int64_t decode_cell_of(int64_t key, int64_t page_size, int64_t tile) {
  return (key / page_size) * decode_cells_per_page(page_size, tile) + (key % page_size) / tile;
}
TERSOR_HD constexpr DecodeTiles decode_tiles(int64_t lo, int64_t hi, int64_t page_size, int64_t tile) {
  if (hi <= lo) return {0, 0};
  const int64_t first = decode_cell_of(lo, page_size, tile);
  return {first, decode_cell_of(hi - 1, page_size, tile) - first + 1};
}
// Keys [lo, hi) of tile g, clipped to the span.
TERSOR_HD constexpr KeyRange decode_tile_keys(int64_t g, int64_t lo, int64_t hi, int64_t page_size, int64_t tile) {
  const int64_t cpp = decode_cells_per_page(page_size, tile);
  const int64_t page_start = (g / cpp) * page_size;
  int64_t a = page_start + (g % cpp) * tile, z = a + tile;
  if (z > page_start + page_size) z = page_start + page_size;
  return {a > lo ? a : lo, z < hi ? z : hi};
}

// Split-KV (Lean Attention's stream-K, at tile granularity within each (sequence, KV head)): the total key
// tiles of a call shared out over `workers` work items, `quota` tiles each; a (sequence, head) of n tiles is
// ceil(n / quota) chunks, each merged into the result by its LSE. workers <= 0: no split (one chunk each).
TERSOR_HD constexpr int64_t decode_split_quota(int64_t total_tiles, int64_t workers) {
  if (workers <= 0 || total_tiles <= 0) return total_tiles > 0 ? total_tiles : 1;
  const int64_t q = (total_tiles + workers - 1) / workers;
  return q > 0 ? q : 1;
}

}  // namespace tersor::attention
