// Argument checking shared by the BSR CPU op, its CUDA glue and the CPU replay of the kernel (host C++).
#pragma once

#include <cstdint>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "common/torch_glue.h"
#include "sparse/bsr_format.h"

namespace tersor::sparse {

// "[2, 3, 4]" (torch's way of printing a shape, for error messages).
inline std::string bsr_sizes_str(const Tensor& t) {
  std::ostringstream os;
  os << "[";
  for (int64_t d = 0; d < t.dim(); ++d) os << (d ? ", " : "") << t.size(d);
  os << "]";
  return os.str();
}

struct BsrCall {
  int64_t bs = 0, mb = 0, kb = 0, nnzb = 0, n_split = 0;
  int64_t out_features = 0, in_features = 0, tokens = 0;
  std::vector<int64_t> out_shape;
};

// Metadata checks (no reads of tensor data, so the CUDA glue can run them without a sync).
inline BsrCall check_bsr_call(const Tensor& x, const Tensor& crow, const Tensor& col, const Tensor& values,
                              const Tensor& schedule, int64_t in_features, const std::optional<Tensor>& bias,
                              const char* op) {
  const ScalarType st = x.scalar_type();
  TERSOR_CHECK_TYPE(st == ScalarType::Float || st == ScalarType::Half || st == ScalarType::BFloat16, op,
                    ": x must be float32, float16 or bfloat16, got ", dtype_name(st));
  TERSOR_CHECK_TYPE(values.scalar_type() == st, op, ": values (", dtype_name(values.scalar_type()),
                    ") must have x's dtype (", dtype_name(st), ")");
  for (const Tensor* t : {&crow, &col, &schedule}) {
    TERSOR_CHECK_TYPE(t->scalar_type() == ScalarType::Int, op,
                      ": crow_indices, col_indices and schedule must be int32, got ", dtype_name(t->scalar_type()));
    TERSOR_CHECK_VALUE(t->dim() == 1, op, ": crow_indices, col_indices and schedule must be 1-d, got shape ",
                       bsr_sizes_str(*t));
  }
  TERSOR_CHECK_VALUE(values.dim() == 3 && values.size(1) == values.size(2), op,
                     ": values must be [nnz_blocks, bs, bs], got shape ", bsr_sizes_str(values));
  BsrCall c;
  c.bs = values.size(1);
  TERSOR_CHECK_VALUE(bsr_valid_blocksize(c.bs), op, ": blocksize must be 16, 32 or 64, got ", c.bs);
  c.nnzb = values.size(0);
  TERSOR_CHECK_VALUE(col.numel() == c.nnzb, op, ": col_indices has ", col.numel(), " entries for ", c.nnzb,
                    " value blocks");
  TERSOR_CHECK_VALUE(crow.numel() >= 2, op, ": crow_indices must have at least 2 entries (one block row)");
  c.mb = crow.numel() - 1;
  c.out_features = c.mb * c.bs;
  TERSOR_CHECK_VALUE(in_features > 0 && in_features % c.bs == 0, op, ": in_features must be a positive multiple of ",
                    "the blocksize ", c.bs, ", got ", in_features);
  // values may hold more than 2^31 elements (the kernels' offsets are int64, bsr_format.h); the limits left
  // are the int32 block indices of the format and the kernels' int32 feature indices.
  TERSOR_CHECK_VALUE(c.out_features < (int64_t{1} << 31) && in_features < (int64_t{1} << 31), op,
                    ": weight too large: out_features (", c.out_features, ") and in_features (", in_features,
                    ") must be below 2^31");
  TERSOR_CHECK_VALUE(c.nnzb < (int64_t{1} << 31), op, ": ", c.nnzb,
                    " value blocks; BSR v1 indexes blocks with int32 (at most 2^31 - 1)");
  c.in_features = in_features;
  c.kb = in_features / c.bs;
  c.n_split = bsr_split_items_from_numel(schedule.numel(), c.mb);
  TERSOR_CHECK_VALUE(c.n_split >= 0, op, ": schedule has ", schedule.numel(), " entries, which fits no schedule for ",
                    c.mb, " block rows (see docs/formats.md, BSR v1)");
  TERSOR_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == in_features, op, ": x must be [..., ", in_features,
                     "], got shape ", bsr_sizes_str(x));
  const Device dev = x.device();
  for (const Tensor* t : {&crow, &col, &values, &schedule})
    TERSOR_CHECK_VALUE(t->device() == dev, op, ": all tensors must be on x's device (", device_str(x), "), got one on ",
                 device_str(*t));
  if (bias) {
    TERSOR_CHECK_VALUE(bias->device() == dev, op, ": bias must be on x's device (", device_str(x), "), got ",
                 device_str(*bias));
    TERSOR_CHECK_TYPE(bias->scalar_type() == st, op, ": bias (", dtype_name(bias->scalar_type()),
                      ") must have x's dtype (", dtype_name(st), ")");
    TERSOR_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == c.out_features, op, ": bias must be [", c.out_features,
                       "], got shape ", bsr_sizes_str(*bias));
  }
  c.tokens = x.numel() / in_features;
  c.out_shape = sizes_vec(x);
  c.out_shape.back() = c.out_features;
  return c;
}

// Data checks of the index arrays (CPU tensors): they decide which memory is read.
inline void check_bsr_indices_cpu(const BsrCall& c, const Tensor& crow, const Tensor& col, const char* op) {
  const int32_t* cr = crow.const_data_ptr<int32_t>();
  const int32_t* ci = col.const_data_ptr<int32_t>();
  TERSOR_CHECK_VALUE(cr[0] == 0 && cr[c.mb] == c.nnzb, op, ": crow_indices must start at 0 and end at nnz_blocks (",
                    c.nnzb, "), got ", cr[0], " .. ", cr[c.mb]);
  // All of crow first: with crow[0] = 0, crow[mb] = nnzb and no decrease, every row's range lies inside
  // col_indices. (Checking row by row while reading its columns read past col_indices when a later entry
  // decreased: crow = [0, 100, 2] with nnzb = 2 read col_indices[0 .. 99].)
  for (int64_t r = 0; r < c.mb; ++r)
    TERSOR_CHECK_VALUE(cr[r] <= cr[r + 1], op, ": crow_indices must be non-decreasing (block row ", r, ")");
  for (int64_t j = 0; j < c.nnzb; ++j)
    TERSOR_CHECK_VALUE(ci[j] >= 0 && ci[j] < c.kb, op, ": col_indices[", j, "] = ", ci[j], " is outside [0, ", c.kb,
                       ")");
}

// Full check of a schedule against crow_indices (CPU tensors): every item inside its row, the row items a
// permutation of the rows covering them whole, the split items covering each row in order, slots
// consecutive per row and matching partial_ptr. The CUDA kernel trusts a schedule that passed this.
inline void check_bsr_schedule_cpu(const BsrCall& c, const Tensor& crow, const Tensor& schedule,
                                   const char* op) {
  const int32_t* cr = crow.const_data_ptr<int32_t>();
  const int32_t* s = schedule.const_data_ptr<int32_t>();
  std::vector<char> seen(c.mb, 0);
  for (int64_t i = 0; i < c.mb; ++i) {
    const int32_t* it = s + bsr_row_items_offset(c.mb) + kItemInts * i;
    const int32_t r = it[kItemRow];
    TERSOR_CHECK_VALUE(r >= 0 && r < c.mb && !seen[r], op, ": schedule row item ", i, " names block row ", r,
                      " (out of range or repeated)");
    seen[r] = 1;
    TERSOR_CHECK_VALUE(it[kItemBegin] == cr[r] && it[kItemEnd] == cr[r + 1] && it[kItemSlot] == -1, op,
                      ": schedule row item ", i, " does not cover block row ", r, " whole");
  }
  const int32_t* pp = s + bsr_partial_ptr_offset(c.mb, c.n_split);
  TERSOR_CHECK_VALUE(pp[0] == 0, op, ": schedule partial_ptr must start at 0");
  int64_t item = 0;
  for (int64_t r = 0; r < c.mb; ++r) {
    TERSOR_CHECK_VALUE(pp[r + 1] >= pp[r], op, ": schedule partial_ptr must be non-decreasing");
    const int64_t n_slots = pp[r + 1] - pp[r];
    TERSOR_CHECK_VALUE(n_slots != 1, op, ": schedule gives block row ", r, " a single partial (it must write directly)");
    int64_t pos = cr[r], slot = pp[r];
    const int64_t n_items = n_slots == 0 ? 1 : n_slots;
    for (int64_t k = 0; k < n_items; ++k, ++item) {
      TERSOR_CHECK_VALUE(item < c.n_split, op, ": schedule has too few split items");
      const int32_t* it = s + bsr_split_items_offset(c.mb) + kItemInts * item;
      TERSOR_CHECK_VALUE(it[kItemRow] == r && it[kItemBegin] == pos && it[kItemEnd] >= pos && it[kItemEnd] <= cr[r + 1],
                        op, ": schedule split item ", item, " does not continue block row ", r);
      TERSOR_CHECK_VALUE(it[kItemSlot] == (n_slots == 0 ? -1 : slot), op, ": schedule split item ", item,
                        " has slot ", it[kItemSlot]);
      pos = it[kItemEnd];
      ++slot;
    }
    TERSOR_CHECK_VALUE(pos == cr[r + 1], op, ": schedule split items do not cover block row ", r);
  }
  TERSOR_CHECK_VALUE(item == c.n_split, op, ": schedule has ", c.n_split - item, " extra split items");
}

}  // namespace tersor::sparse
