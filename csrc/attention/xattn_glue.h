// Argument checks of xattention_mask shared by the CPU and CUDA registrations (the same errors on every
// device). Host C++ only (stable ABI, common/torch_glue.h).
#pragma once

#include <cmath>
#include <string>

#include "common/torch_glue.h"

namespace tersor::attention {

struct XattnCall {
  int64_t batch, heads_q, heads_kv, len_q, len_k, head_dim, block, stride;
  int64_t q_blocks, k_blocks;
  double threshold, scale;
  bool causal;
  bool int8;  // qk = "int8": quantized scores (else "none": exact)
};

inline XattnCall check_xattn(const Tensor& q, const Tensor& k, int64_t block_size, int64_t stride, double threshold,
                      bool is_causal, double scale, const std::string& qk) {
  const char* op = "xattention_mask";
  TERSOR_CHECK_VALUE(q.dim() == 4 && k.dim() == 4, op, ": q and k must be 4-d [batch, heads, seq, head_dim], got ",
                     q.dim(), "-d and ", k.dim(), "-d");
  const ScalarType t = q.scalar_type();
  TERSOR_CHECK_TYPE(t == ScalarType::Half || t == ScalarType::BFloat16 || t == ScalarType::Float, op,
                    ": expected float16, bfloat16 or float32, got ", dtype_name(t));
  TERSOR_CHECK_TYPE(k.scalar_type() == t, op, ": q and k must have the same dtype, got ", dtype_name(t), " and ",
                    dtype_name(k.scalar_type()));
  XattnCall c{};
  c.batch = q.size(0);
  c.heads_q = q.size(1);
  c.len_q = q.size(2);
  c.head_dim = q.size(3);
  c.heads_kv = k.size(1);
  c.len_k = k.size(2);
  TERSOR_CHECK_VALUE(k.size(0) == c.batch, op, ": batch of k (", k.size(0), ") differs from q (", c.batch, ")");
  TERSOR_CHECK_VALUE(k.size(3) == c.head_dim, op, ": head_dim of k (", k.size(3), ") differs from q (", c.head_dim,
                     ")");
  TERSOR_CHECK_VALUE(c.heads_kv >= 1 && c.heads_q % c.heads_kv == 0, op, ": query heads (", c.heads_q,
                     ") must be a multiple of key heads (", c.heads_kv, ")");
  TERSOR_CHECK_VALUE(c.len_k >= 1, op, ": needs at least one key");
  TERSOR_CHECK_VALUE(stride >= 1, op, ": stride must be >= 1, got ", stride);
  TERSOR_CHECK_VALUE(block_size >= stride && block_size % stride == 0, op,
                     ": block_size must be a positive multiple of stride, got block_size ", block_size, ", stride ",
                     stride);
  TERSOR_CHECK_VALUE(threshold > 0 && threshold <= 1, op, ": threshold must be in (0, 1], got ", threshold);
  TERSOR_CHECK_VALUE(std::isfinite(scale) && scale > 0, op, ": scale must be finite and positive, got ", scale);
  c.block = block_size;
  c.stride = stride;
  c.threshold = threshold;
  c.scale = scale;
  c.causal = is_causal;
  TERSOR_CHECK_VALUE(qk == "none" || qk == "int8", op, ": qk must be \"none\" or \"int8\", got \"", qk, "\"");
  c.int8 = qk == "int8";
  c.q_blocks = (c.len_q + block_size - 1) / block_size;
  c.k_blocks = (c.len_k + block_size - 1) / block_size;
  return c;
}

}  // namespace tersor::attention
