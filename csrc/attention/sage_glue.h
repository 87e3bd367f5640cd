// Argument checks of sage_attention_fwd shared by the CPU and CUDA registrations (the same errors on
// every device), and the checks of the `kernel` argument. Host C++ only (stable ABI, common/torch_glue.h).
#pragma once

#include <cmath>
#include <optional>
#include <string>

#include "attention/sage_format.h"
#include "attention/sage_route.h"
#include "common/torch_glue.h"

namespace tersor::attention {

struct SageCall {
  int64_t batch, heads_q, heads_kv, len_q, len_k, head_dim;
  KeyMask mask;  // causal and sliding window (sage_format.h)
  double scale;
  int qk_bits;
  PVMode pv;
  bool smooth_k, smooth_q;
  bool exact() const { return qk_bits == 0 && pv == PVMode::kFp32; }
};

inline PVMode parse_pv(const std::string& pv, const char* op = "sage_attention_fwd") {
  PVMode m{};
  TERSOR_CHECK_VALUE(parse_pv_mode(pv, &m), op, ": pv must be \"fp8\", \"fp16\" or \"fp32\", got \"", pv, "\"");
  return m;
}

inline SageKernel parse_kernel(const std::string& kernel, const char* op = "sage_attention_fwd") {
  SageKernel k{};
  TERSOR_CHECK_VALUE(parse_sage_kernel(kernel, &k), op, ": kernel must be ", kSageKernelChoices, ", got \"", kernel,
                     "\"");
  return k;
}


inline SageCall check_call(const Tensor& q, const Tensor& k, const Tensor& v, bool is_causal, double scale,
                           int64_t qk_bits, const std::string& pv, bool smooth_k, bool smooth_q,
                           int64_t window_left = -1, int64_t window_right = -1) {
  const char* op = "sage_attention_fwd";
  TERSOR_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op,
                     ": q, k, v must be 4-d [batch, heads, seq, head_dim], got ", q.dim(), "-d, ", k.dim(), "-d, ",
                     v.dim(), "-d");
  TERSOR_CHECK_TYPE(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), op,
                    ": q, k, v must have the same dtype, got ", dtype_name(q.scalar_type()), ", ",
                    dtype_name(k.scalar_type()), ", ", dtype_name(v.scalar_type()));
  TERSOR_CHECK_VALUE(qk_bits == 0 || qk_bits == 4 || qk_bits == 8, op, ": qk_bits must be 0, 4 or 8, got ", qk_bits);
  SageCall c{};
  c.pv = parse_pv(pv);
  c.qk_bits = static_cast<int>(qk_bits);
  const ScalarType t = q.scalar_type();
  if (c.exact()) {
    TERSOR_CHECK_TYPE(t == ScalarType::Half || t == ScalarType::BFloat16 || t == ScalarType::Float, op,
                      ": expected float16, bfloat16 or (exact mode only) float32, got ", dtype_name(t));
  } else {
    TERSOR_CHECK_TYPE(t == ScalarType::Half || t == ScalarType::BFloat16, op, ": expected float16 or bfloat16, got ",
                      dtype_name(t), " (float32 only in the exact mode qk_bits=0, pv=\"fp32\")");
  }
  c.batch = q.size(0);
  c.heads_q = q.size(1);
  c.len_q = q.size(2);
  c.head_dim = q.size(3);
  c.heads_kv = k.size(1);
  c.len_k = k.size(2);
  bool same_kv = true;
  for (int64_t d = 0; d < 4; ++d) same_kv = same_kv && k.size(d) == v.size(d);
  TERSOR_CHECK_VALUE(same_kv, op, ": k and v must have the same shape, got ", sizes_str(k), " and ", sizes_str(v));
  TERSOR_CHECK_VALUE(k.size(0) == c.batch, op, ": batch of k/v (", k.size(0), ") differs from q (", c.batch, ")");
  TERSOR_CHECK_VALUE(k.size(3) == c.head_dim, op, ": head_dim of k/v (", k.size(3), ") differs from q (", c.head_dim,
                     ")");
  TERSOR_CHECK_VALUE(c.head_dim == 64 || c.head_dim == 128 || c.head_dim == 256, op,
                     ": head_dim must be 64, 128 or 256, got ", c.head_dim,
                     " (tersor.attention.sage_attention pads smaller head dims)");
  TERSOR_CHECK_VALUE(c.heads_kv >= 1 && c.heads_q % c.heads_kv == 0, op, ": query heads (", c.heads_q,
                     ") must be a multiple of key/value heads (", c.heads_kv, ")");
  TERSOR_CHECK_VALUE(c.len_k >= 1, op, ": needs at least one key");
  TERSOR_CHECK_VALUE(std::isfinite(scale) && scale > 0, op, ": scale must be finite and positive, got ", scale);
  // Any negative side of the window is unbounded (FlashAttention uses -1).
  c.mask = {is_causal, window_left < 0 ? -1 : window_left, window_right < 0 ? -1 : window_right};
  c.scale = scale;
  c.smooth_k = smooth_k;
  c.smooth_q = smooth_q;
  return c;
}

// ValueError unless tensor `t` (called `name`) is on q's device.
inline void check_on_device_of(const Tensor& t, const Tensor& q, const char* op, const char* name) {
  TERSOR_CHECK_VALUE(t.device().type() == q.device().type() && (!t.is_cuda() || t.get_device_index() == q.get_device_index()),
                     op, ": ", name, " must be on q's device (", device_str(q), "), got ", device_str(t));
}

// ---- varlen (packed sequences) ----
// sage_attention_varlen_fwd runs the packed q [total_q, Hq, D], k / v [total_k, Hkv, D] as one [1, H, total, D]
// sequence (strided views, no copy) whose rows see only their own sequence's keys (KeyMask's cu_q / cu_k).
struct VarlenCall {
  Tensor q4, k4, v4;      // [1, H, total, D] views of the packed tensors
  Tensor cu_q, cu_k;      // int64 contiguous [n_seq + 1] on q's device (KeyMask points into them)
  SageCall call;
};

inline VarlenCall check_varlen(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens_q,
                               const Tensor& cu_seqlens_k, bool is_causal, double scale, int64_t qk_bits,
                               const std::string& pv, bool smooth_k, bool smooth_q, int64_t window_left,
                               int64_t window_right) {
  const char* op = "sage_attention_varlen_fwd";
  TERSOR_CHECK_VALUE(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, op,
                     ": q, k, v must be packed 3-d [total, heads, head_dim], got ", q.dim(), "-d, ", k.dim(), "-d, ",
                     v.dim(), "-d");
  for (const Tensor* t : {&cu_seqlens_q, &cu_seqlens_k}) {
    const char* name = t == &cu_seqlens_q ? "cu_seqlens_q" : "cu_seqlens_k";
    TERSOR_CHECK_TYPE(t->scalar_type() == ScalarType::Int || t->scalar_type() == ScalarType::Long, op, ": ", name,
                      " must be int32 or int64, got ", dtype_name(t->scalar_type()));
    TERSOR_CHECK_VALUE(t->dim() == 1 && t->size(0) >= 2, op, ": ", name, " must be [n_seq + 1] (n_seq >= 1), got ",
                       sizes_str(*t));
    check_on_device_of(*t, q, op, name);
  }
  TERSOR_CHECK_VALUE(cu_seqlens_q.size(0) == cu_seqlens_k.size(0), op, ": cu_seqlens_q has ",
                     cu_seqlens_q.size(0) - 1, " sequences, cu_seqlens_k ", cu_seqlens_k.size(0) - 1);
  VarlenCall r{torch::stable::unsqueeze(torch::stable::transpose(q, 0, 1), 0),
               torch::stable::unsqueeze(torch::stable::transpose(k, 0, 1), 0),
               torch::stable::unsqueeze(torch::stable::transpose(v, 0, 1), 0),
               as_contiguous(as_dtype(cu_seqlens_q, ScalarType::Long)),
               as_contiguous(as_dtype(cu_seqlens_k, ScalarType::Long)), SageCall{}};
  r.call = check_call(r.q4, r.k4, r.v4, is_causal, scale, qk_bits, pv, smooth_k, smooth_q, window_left, window_right);
  r.call.mask.cu_q = r.cu_q.const_data_ptr<int64_t>();
  r.call.mask.cu_k = r.cu_k.const_data_ptr<int64_t>();
  r.call.mask.n_seq = r.cu_q.size(0) - 1;
  return r;
}

// The offsets' values (CPU tensors only: reading device memory would synchronize; the kernels clamp every key
// range to the tensor, and tersor.attention.sage_attention_varlen checks the values before the call).
inline void check_varlen_offsets(const VarlenCall& vc) {
  const char* op = "sage_attention_varlen_fwd";
  const int64_t n = vc.call.mask.n_seq;
  for (int which = 0; which < 2; ++which) {
    const int64_t* cu = which == 0 ? vc.call.mask.cu_q : vc.call.mask.cu_k;
    const int64_t total = which == 0 ? vc.call.len_q : vc.call.len_k;
    const char* name = which == 0 ? "cu_seqlens_q" : "cu_seqlens_k";
    TERSOR_CHECK_VALUE(cu[0] == 0 && cu[n] == total, op, ": ", name, " must rise from 0 to ", total,
                       " (the packed length), got ", cu[0], " .. ", cu[n]);
    for (int64_t s = 0; s < n; ++s)
      TERSOR_CHECK_VALUE(cu[s + 1] >= cu[s], op, ": ", name, " must not decrease, got ", cu[s], " then ", cu[s + 1],
                         " at sequence ", s);
  }
}

// (out [1, Hq, total_q, D], lse [1, Hq, total_q]) -> (out [total_q, Hq, D] contiguous, lse [Hq, total_q]).
inline std::tuple<Tensor, Tensor> varlen_outputs(const Tensor& out, const Tensor& lse) {
  return {as_contiguous(torch::stable::transpose(torch::stable::select(out, 0, 0), 0, 1)),
          as_contiguous(torch::stable::select(lse, 0, 0))};
}

// A checked block mask (sage_format.h, "block sparsity"): the contiguous bool tensor and its geometry, or
// none (dense). The mask must be on q's device.
struct SageBlockMask {
  std::optional<Tensor> mask;  // contiguous bool [B, heads, q_blocks, k_blocks]
  int64_t heads = 0, q_blocks = 0, k_blocks = 0;
  const uint8_t* data() const { return mask ? static_cast<const uint8_t*>(mask->const_data_ptr()) : nullptr; }
  // mask[b, h, qb, :] (nullptr without a mask)
  const uint8_t* row(int64_t b, int64_t h, int64_t qb) const {
    return mask ? data() + block_mask_row_offset(b, h, qb, heads, q_blocks, k_blocks) : nullptr;
  }
};

inline SageBlockMask check_block_mask(const std::optional<Tensor>& m, const SageCall& c, const Tensor& q) {
  const char* op = "sage_attention_fwd";
  SageBlockMask r;
  if (!m) return r;
  const Tensor& t = *m;
  TERSOR_CHECK_TYPE(t.scalar_type() == ScalarType::Bool, op, ": block_mask must be bool, got ",
                    dtype_name(t.scalar_type()));
  r.q_blocks = sparse_blocks(c.len_q, kSparseBlockQ);
  r.k_blocks = sparse_blocks(c.len_k, kSparseBlockK);
  TERSOR_CHECK_VALUE(t.dim() == 4 && t.size(0) == c.batch && (t.size(1) == 1 || t.size(1) == c.heads_q) &&
                         t.size(2) == r.q_blocks && t.size(3) == r.k_blocks,
                     op, ": block_mask must be [", c.batch, ", ", c.heads_q, " or 1, ", r.q_blocks, ", ", r.k_blocks,
                     "] ([B, Hq or 1, ceil(Lq / ", kSparseBlockQ, "), ceil(Lk / ", kSparseBlockK, ")]), got ",
                     sizes_str(t));
  check_on_device_of(t, q, op, "block_mask");
  r.heads = t.size(1);
  r.mask = as_contiguous(t);
  return r;
}

// A checked key padding mask: contiguous bool [B, Lk], true = the key takes part (transformers' attention_mask
// convention), or none. The mask must be on q's device.
struct SageKeyPadding {
  std::optional<Tensor> mask;
  const uint8_t* data() const { return mask ? static_cast<const uint8_t*>(mask->const_data_ptr()) : nullptr; }
  // mask[b, :] (nullptr without a mask)
  const uint8_t* row(int64_t b, int64_t len_k) const { return mask ? data() + b * len_k : nullptr; }
};

inline SageKeyPadding check_key_padding(const std::optional<Tensor>& m, const SageCall& c, const Tensor& q) {
  const char* op = "sage_attention_fwd";
  SageKeyPadding r;
  if (!m) return r;
  const Tensor& t = *m;
  TERSOR_CHECK_TYPE(t.scalar_type() == ScalarType::Bool, op, ": key_padding_mask must be bool, got ",
                    dtype_name(t.scalar_type()));
  TERSOR_CHECK_VALUE(t.dim() == 2 && t.size(0) == c.batch && t.size(1) == c.len_k, op,
                     ": key_padding_mask must be [", c.batch, ", ", c.len_k, "] ([B, Lk]), got ", sizes_str(t));
  check_on_device_of(t, q, op, "key_padding_mask");
  r.mask = as_contiguous(t);
  return r;
}

// The route of a CUDA call (sage_route.h) with the tersor error contract: a bad kernel/qk_bits/pv is a
// ValueError, a mode without a kernel here a NotImplementedError naming what this device supports.
inline SageRoute route_or_throw(int cc, int64_t qk_bits, const std::string& pv, bool smooth_q,
                                const std::string& kernel, const SageCubins& cubins, const char* op) {
  TERSOR_CHECK_VALUE(cc >= 0, op, ": compute capability must be >= 0 (10 * major + minor), got ", cc);
  TERSOR_CHECK_VALUE(qk_bits == 0 || qk_bits == 4 || qk_bits == 8, op, ": qk_bits must be 0, 4 or 8, got ", qk_bits);
  const PVMode pv_mode = parse_pv(pv, op);
  const SageKernel k = parse_kernel(kernel, op);
  const SageRoute r = sage_route(cc, static_cast<int>(qk_bits), pv_mode, smooth_q, k, cubins);
  TERSOR_CHECK_NOT_IMPL(r.path != SagePath::kNone, op, ": ", r.why);
  return r;
}

}  // namespace tersor::attention
