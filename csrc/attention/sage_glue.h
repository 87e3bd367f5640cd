// Argument checks of sage_attention_fwd shared by the CPU and CUDA registrations (the same errors on
// every device). Host C++ only.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <string>

namespace tersor::attention {

enum class PVMode { kFp8, kFp16, kFp32 };

struct SageCall {
  int64_t batch, heads_q, heads_kv, len_q, len_k, head_dim;
  bool causal;
  double scale;
  int qk_bits;
  PVMode pv;
  bool smooth_k, smooth_q;
  bool exact() const { return qk_bits == 0 && pv == PVMode::kFp32; }
};

inline PVMode parse_pv(const std::string& pv) {
  if (pv == "fp8") return PVMode::kFp8;
  if (pv == "fp16") return PVMode::kFp16;
  if (pv == "fp32") return PVMode::kFp32;
  TORCH_CHECK_VALUE(false, "sage_attention_fwd: pv must be \"fp8\", \"fp16\" or \"fp32\", got \"", pv, "\"");
}

inline SageCall check_call(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool is_causal, double scale,
                    int64_t qk_bits, const std::string& pv, bool smooth_k, bool smooth_q) {
  const char* op = "sage_attention_fwd";
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op,
                    ": q, k, v must be 4-d [batch, heads, seq, head_dim], got ", q.dim(), "-d, ", k.dim(), "-d, ",
                    v.dim(), "-d");
  TORCH_CHECK_TYPE(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), op,
                   ": q, k, v must have the same dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
                   v.scalar_type());
  TORCH_CHECK_VALUE(qk_bits == 0 || qk_bits == 4 || qk_bits == 8, op, ": qk_bits must be 0, 4 or 8, got ", qk_bits);
  SageCall c{};
  c.pv = parse_pv(pv);
  c.qk_bits = static_cast<int>(qk_bits);
  const auto t = q.scalar_type();
  if (c.exact()) {
    TORCH_CHECK_TYPE(t == at::kHalf || t == at::kBFloat16 || t == at::kFloat, op,
                     ": expected float16, bfloat16 or (exact mode only) float32, got ", t);
  } else {
    TORCH_CHECK_TYPE(t == at::kHalf || t == at::kBFloat16, op, ": expected float16 or bfloat16, got ", t,
                     " (float32 only in the exact mode qk_bits=0, pv=\"fp32\")");
  }
  c.batch = q.size(0);
  c.heads_q = q.size(1);
  c.len_q = q.size(2);
  c.head_dim = q.size(3);
  c.heads_kv = k.size(1);
  c.len_k = k.size(2);
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), op, ": k and v must have the same shape, got ", k.sizes(), " and ",
                    v.sizes());
  TORCH_CHECK_VALUE(k.size(0) == c.batch, op, ": batch of k/v (", k.size(0), ") differs from q (", c.batch, ")");
  TORCH_CHECK_VALUE(k.size(3) == c.head_dim, op, ": head_dim of k/v (", k.size(3), ") differs from q (", c.head_dim,
                    ")");
  TORCH_CHECK_VALUE(c.head_dim == 64 || c.head_dim == 128, op, ": head_dim must be 64 or 128, got ", c.head_dim,
                    " (tersor.attention.sage_attention pads smaller head dims)");
  TORCH_CHECK_VALUE(c.heads_kv >= 1 && c.heads_q % c.heads_kv == 0, op, ": query heads (", c.heads_q,
                    ") must be a multiple of key/value heads (", c.heads_kv, ")");
  TORCH_CHECK_VALUE(c.len_k >= 1, op, ": needs at least one key");
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0, op, ": scale must be finite and positive, got ", scale);
  c.causal = is_causal;
  c.scale = scale;
  c.smooth_k = smooth_k;
  c.smooth_q = smooth_q;
  return c;
}

}  // namespace tersor::attention
