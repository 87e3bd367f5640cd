// Test-only ops of the hadamard family (tersor._C_testing): the CUDA kernel's work plan and shared-memory
// layout, computed by the same __host__ __device__ functions the kernel uses, for CPU tests.
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

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(tersor_testing, CompositeExplicitAutograd, m) {
  m.impl("_hadamard_plan", TORCH_BOX(&hadamard_plan));
  m.impl("_hadamard_smem_index", TORCH_BOX(&hadamard_smem_index));
}

}  // namespace tersor::hadamard
