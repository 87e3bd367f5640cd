// Test-only ops of the hadamard family (tersor._C_testing): the CUDA kernel's work plan and shared-memory
// layout, computed by the same __host__ __device__ functions the kernel uses, for CPU tests.
#include <string>
#include <vector>

#include "common/torch_glue.h"
#include "hadamard/hadamard_plan.h"

namespace tersor::hadamard {
namespace {

std::vector<int64_t> hadamard_plan(int64_t log_n, int64_t elem_bytes) {
  const Pow2Plan p = make_pow2_plan(static_cast<int>(log_n), static_cast<int>(elem_bytes));
  TERSOR_CHECK_VALUE(p.ok, "_hadamard_plan: no plan for log_n=", log_n, " elem_bytes=", elem_bytes);
  return {p.log_n, p.n, p.elem_bytes, p.ept, p.vec_bytes, p.tpr, p.wpr, p.lane_bits, p.rows_per_block,
          p.block_threads, p.rounds, p.ept_round, p.groups, p.smem_bytes};
}

std::vector<int64_t> hadamard_smem_index(std::vector<int64_t> j) {
  for (auto& v : j) {
    TERSOR_CHECK_VALUE(v >= 0 && v < (int64_t{1} << 20), "_hadamard_smem_index: index out of range: ", v);
    v = smem_index(static_cast<int>(v));
  }
  return j;
}

// The CUDA kernels' 64-bit index functions (hadamard_plan.h) evaluated on the host, so tests can check them
// at sizes past 2^31 without allocating anything.
std::vector<int64_t> hadamard_index(std::string fn, std::vector<int64_t> a) {
  auto need = [&](size_t n) {
    TERSOR_CHECK_VALUE(a.size() == n, "_hadamard_index: ", fn, " takes ", n, " arguments, got ", a.size());
  };
  auto plan = [&](int64_t log_n, int64_t elem_bytes) {
    const Pow2Plan p = make_pow2_plan(static_cast<int>(log_n), static_cast<int>(elem_bytes));
    TERSOR_CHECK_VALUE(p.ok, "_hadamard_index: no plan for log_n=", log_n, " elem_bytes=", elem_bytes);
    return p;
  };
  if (fn == "pow2_blocks") {  // [log_n, elem_bytes, rows]
    need(3);
    return {pow2_blocks(plan(a[0], a[1]), a[2])};
  }
  if (fn == "pow2_row") {  // [log_n, elem_bytes, block, tid]
    need(4);
    return {pow2_row(plan(a[0], a[1]), a[2], static_cast<int>(a[3]))};
  }
  if (fn == "pow2_elem_offset") {  // [log_n, elem_bytes, row, t]
    need(4);
    return {pow2_elem_offset(plan(a[0], a[1]), a[2], static_cast<int>(a[3]))};
  }
  if (fn == "kmix_blocks") {  // [rows, log_n]
    need(2);
    return {kmix_blocks(a[0], static_cast<int>(a[1]))};
  }
  if (fn == "kmix_offset") {  // [row, k, log_n, a, col]
    need(5);
    return {kmix_offset(a[0], static_cast<int>(a[1]), static_cast<int>(a[2]), static_cast<int>(a[3]), a[4])};
  }
  if (fn == "cuda_max_rows") {  // [k, log_n, elem_bytes]
    need(3);
    return {cuda_max_rows(static_cast<int>(a[0]), static_cast<int>(a[1]), static_cast<int>(a[2]))};
  }
  TERSOR_CHECK_VALUE(false, "_hadamard_index: unknown function ", fn);
  return {};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(tersor_testing, CompositeExplicitAutograd, m) {
  m.impl("_hadamard_index", TORCH_BOX(&hadamard_index));
  m.impl("_hadamard_plan", TORCH_BOX(&hadamard_plan));
  m.impl("_hadamard_smem_index", TORCH_BOX(&hadamard_smem_index));
}

}  // namespace tersor::hadamard
