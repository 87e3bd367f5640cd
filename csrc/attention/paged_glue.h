// Argument checks of the paged-KV-cache ops shared by the CPU twin (paged_cpu.cpp), the CUDA registration
// (paged_cuda_glue.cpp) and the lane-by-lane replay (decode_cuda_emulate.cpp): the same errors on every device.
// Host C++ only (stable ABI).
#pragma once

#include <cmath>
#include <string>

#include "attention/decode_cuda_layout.h"
#include "attention/paged_format.h"
#include "attention/sage_glue.h"  // sizes_str

namespace tersor::attention {

constexpr int64_t kDecodeMaxQ = 16;   // queries per sequence (the MMA M dimension holds Lq * group rows)
constexpr int64_t kDecodeTile = 64;   // keys per softmax tile (a page of more tokens is walked in 64-key tiles)
static_assert(kDecodeTile == DecodeTraits<64, false>::kTile, "the CUDA kernels walk the twin's tiles");

inline bool is_float_input(ScalarType t) {
  return t == ScalarType::Half || t == ScalarType::BFloat16 || t == ScalarType::Float;
}

// The cache tensors' shapes and dtypes (both ops), returning the layout.
inline PagedLayout check_paged_cache(const char* op, const Tensor& k_codes, const Tensor& k_scale, const Tensor& v_codes,
                        const Tensor& page_meta) {
  TERSOR_CHECK_TYPE(k_codes.scalar_type() == ScalarType::Char, op, ": k_codes must be int8, got ",
                    dtype_name(k_codes.scalar_type()));
  TERSOR_CHECK_TYPE(v_codes.scalar_type() == ScalarType::Byte, op, ": v_codes must be uint8 (e4m3 bits), got ",
                    dtype_name(v_codes.scalar_type()));
  TERSOR_CHECK_TYPE(k_scale.scalar_type() == ScalarType::Float && page_meta.scalar_type() == ScalarType::Float, op,
                    ": k_scale and page_meta must be float32, got ", dtype_name(k_scale.scalar_type()), " and ",
                    dtype_name(page_meta.scalar_type()));
  TERSOR_CHECK_VALUE(k_codes.dim() == 4, op, ": k_codes must be [num_pages, heads_kv, page_size, head_dim], got ",
                     sizes_str(k_codes));
  const PagedLayout l{k_codes.size(0), k_codes.size(1), k_codes.size(2), k_codes.size(3)};
  TERSOR_CHECK_VALUE(l.page_size >= 16 && l.page_size <= 256 && l.page_size % 16 == 0, op,
                     ": page_size must be a multiple of 16 in [16, 256], got ", l.page_size);
  TERSOR_CHECK_VALUE(l.head_dim == 64 || l.head_dim == 128 || l.head_dim == 256, op,
                     ": head_dim must be 64, 128 or 256, got ", l.head_dim);
  TERSOR_CHECK_VALUE(l.num_pages >= 1 && l.heads_kv >= 1, op, ": k_codes ", sizes_str(k_codes), " has no pages");
  const bool same = v_codes.dim() == 4 && v_codes.size(0) == l.num_pages && v_codes.size(1) == l.heads_kv &&
                    v_codes.size(2) == l.page_size && v_codes.size(3) == l.head_dim && k_scale.dim() == 3 &&
                    k_scale.size(0) == l.num_pages && k_scale.size(1) == l.heads_kv &&
                    k_scale.size(2) == l.page_size && page_meta.dim() == 4 && page_meta.size(0) == l.num_pages &&
                    page_meta.size(1) == l.heads_kv && page_meta.size(2) == 2 && page_meta.size(3) == l.head_dim;
  TERSOR_CHECK_VALUE(same, op, ": cache tensors disagree: k_codes ", sizes_str(k_codes), ", k_scale ",
                     sizes_str(k_scale), ", v_codes ", sizes_str(v_codes), ", page_meta ", sizes_str(page_meta),
                     " (expected [P, H, S, D], [P, H, S], [P, H, S, D], [P, H, 2, D])");
  for (const Tensor* t : {&k_codes, &k_scale, &v_codes, &page_meta})
    TERSOR_CHECK_VALUE(t->is_contiguous(), op, ": the cache tensors must be contiguous");
  return l;
}

// block_table int32 [B, max_pages] and an int32 [B] vector.
inline void check_paged_index(const char* op, const char* name, const Tensor& t, int64_t batch, int64_t dim) {
  TERSOR_CHECK_TYPE(t.scalar_type() == ScalarType::Int, op, ": ", name, " must be int32, got ",
                    dtype_name(t.scalar_type()));
  TERSOR_CHECK_VALUE(t.dim() == dim && t.size(0) == batch, op, ": ", name, " must be ",
                     dim == 1 ? "[batch]" : "[batch, max_pages]", " with batch = ", batch, ", got ", sizes_str(t));
}

// paged_kv_append_'s shapes and dtypes (no tensor data is read: the CUDA glue calls it too); the layout.
inline PagedLayout check_append_args(const char* op, const Tensor& k_codes, const Tensor& k_scale,
                                     const Tensor& v_codes, const Tensor& page_meta, const Tensor& k, const Tensor& v,
                                     const Tensor& block_table, const Tensor& start, const Tensor& lengths) {
  const PagedLayout l = check_paged_cache(op, k_codes, k_scale, v_codes, page_meta);
  TERSOR_CHECK_VALUE(k.dim() == 4 && v.dim() == 4, op, ": k and v must be [batch, len, heads_kv, head_dim], got ",
                     sizes_str(k), " and ", sizes_str(v));
  TERSOR_CHECK_TYPE(k.scalar_type() == v.scalar_type() && is_float_input(k.scalar_type()), op,
                    ": k and v must be float16, bfloat16 or float32 of one dtype, got ", dtype_name(k.scalar_type()),
                    " and ", dtype_name(v.scalar_type()));
  const int64_t B = k.size(0), L = k.size(1);
  TERSOR_CHECK_VALUE(v.size(0) == B && v.size(1) == L && k.size(2) == l.heads_kv && v.size(2) == l.heads_kv &&
                         k.size(3) == l.head_dim && v.size(3) == l.head_dim,
                     op, ": k ", sizes_str(k), " and v ", sizes_str(v), " must both be [batch, len, ", l.heads_kv,
                     ", ", l.head_dim, "] for this cache");
  check_paged_index(op, "block_table", block_table, B, 2);
  check_paged_index(op, "start", start, B, 1);
  check_paged_index(op, "lengths", lengths, B, 1);
  return l;
}

struct DecodeCall {
  PagedLayout l;
  int64_t batch, len_q, heads_q, group;
};

// sage_decode_paged's shapes, dtypes and scalars (no tensor data is read: the CUDA glue calls it too).
// num_workers: >= 0 as the twin's split, -1 = automatic (CUDA: the planner; CPU: one pass).
inline DecodeCall check_decode_args(const char* op, const Tensor& q, const Tensor& k_codes, const Tensor& k_scale,
                                    const Tensor& v_codes, const Tensor& page_meta, const Tensor& block_table,
                                    const Tensor& seqlens, double scale, int64_t num_workers) {
  const PagedLayout l = check_paged_cache(op, k_codes, k_scale, v_codes, page_meta);
  TERSOR_CHECK_VALUE(q.dim() == 4, op, ": q must be [batch, len_q, heads_q, head_dim], got ", sizes_str(q));
  TERSOR_CHECK_TYPE(q.scalar_type() == ScalarType::Half || q.scalar_type() == ScalarType::BFloat16, op,
                    ": q must be float16 or bfloat16, got ", dtype_name(q.scalar_type()));
  const int64_t B = q.size(0), Lq = q.size(1), Hq = q.size(2), D = l.head_dim, H = l.heads_kv;
  TERSOR_CHECK_VALUE(Lq >= 1 && Lq <= kDecodeMaxQ, op, ": len_q must be in [1, ", kDecodeMaxQ, "], got ", Lq);
  TERSOR_CHECK_VALUE(q.size(3) == D, op, ": q's head_dim ", q.size(3), " differs from the cache's ", D);
  TERSOR_CHECK_VALUE(Hq >= H && Hq % H == 0, op, ": heads_q (", Hq, ") must be a multiple of the cache's heads_kv (",
                     H, ")");
  TERSOR_CHECK_VALUE(std::isfinite(scale) && scale > 0, op, ": scale must be finite and positive, got ", scale);
  check_paged_index(op, "block_table", block_table, B, 2);
  check_paged_index(op, "seqlens", seqlens, B, 1);
  TERSOR_CHECK_VALUE(num_workers >= -1, op, ": num_workers must be >= 0 (or -1: automatic), got ", num_workers);
  return {l, B, Lq, Hq, Hq / H};
}

// The sequence lengths against the block table, and every page id a sequence's length reaches (host data).
inline void check_decode_indices(const char* op, const PagedLayout& l, const int32_t* btp, const int32_t* slp,
                                 int64_t batch, int64_t max_pages) {
  const int64_t S = l.page_size;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = slp[b];
    TERSOR_CHECK_VALUE(n >= 0 && n <= max_pages * S, op, ": seqlens[", b, "] = ", n, " is outside [0, ",
                       max_pages * S, "] (block_table has ", max_pages, " pages of ", S, " tokens per sequence)");
    for (int64_t c = 0; c < (n + S - 1) / S; ++c) {
      const int64_t page = btp[b * max_pages + c];
      TERSOR_CHECK_VALUE(page >= 0 && page < l.num_pages, op, ": block_table[", b, ", ", c, "] = ", page,
                         " is not a page of this cache (", l.num_pages, " pages)");
    }
  }
}

// The CUDA decode's plan (rows of a KV head's query block, blocks of 16 rows, workers, the split bound) and its
// kernel arguments, which the CUDA glue and its CPU replay both build (the workspaces, the quota, out and lse
// are the caller's). sm_count: the device's SMs, for num_workers -1 (the planner's choice).
struct DecodePlan {
  int64_t rows, row_blocks, max_pages, workers, max_splits;
};
inline DecodePlan plan_decode(const DecodeCall& c, int64_t max_pages, int64_t num_workers, int64_t sm_count) {
  DecodePlan p{};
  p.rows = c.len_q * c.group;
  p.row_blocks = (p.rows + 15) / 16;
  p.max_pages = max_pages;
  p.workers = num_workers >= 0 ? num_workers : decode_auto_workers(sm_count, c.batch * c.l.heads_kv * p.row_blocks);
  p.max_splits = decode_max_splits(p.workers, max_pages, c.l.page_size, kDecodeTile);
  return p;
}
// qf: q widened to contiguous float32 (the twin's widening); bt / sl: the contiguous block table and seqlens.
inline DecodeArgs decode_args(const DecodeCall& c, const DecodePlan& p, const Tensor& qf, const Tensor& k_codes,
                              const Tensor& k_scale, const Tensor& v_codes, const Tensor& page_meta, const Tensor& bt,
                              const Tensor& sl, double scale, int64_t window_left, int64_t window_right) {
  DecodeArgs a{};
  a.batch = c.batch;
  a.len_q = c.len_q;
  a.heads_q = c.heads_q;
  a.heads_kv = c.l.heads_kv;
  a.head_dim = c.l.head_dim;
  a.page_size = c.l.page_size;
  a.num_pages = c.l.num_pages;
  a.max_pages = p.max_pages;
  a.window_left = window_left;
  a.window_right = window_right;
  a.workers = p.workers;
  a.max_splits = p.max_splits;
  a.rows = p.rows;
  a.row_blocks = p.row_blocks;
  a.qk_mul = static_cast<float>(scale) * kLog2e;
  a.q = qf.const_data_ptr<float>();
  a.k_codes = k_codes.const_data_ptr<int8_t>();
  a.k_scale = k_scale.const_data_ptr<float>();
  a.v_codes = v_codes.const_data_ptr<uint8_t>();
  a.page_meta = page_meta.const_data_ptr<float>();
  a.block_table = bt.const_data_ptr<int32_t>();
  a.seqlens = sl.const_data_ptr<int32_t>();
  return a;
}

}  // namespace tersor::attention
