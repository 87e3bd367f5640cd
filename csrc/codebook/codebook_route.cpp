// The shipped op _codebook_route: the CUDA glue's routing decision (codebook_route.h) for any compute
// capability, asked by the CPU tests, tersor.ops.codebook_cuda_path and the benchmarks. No tensor and no
// device: it answers the same on a CPU-only build.
#include <string>

#include "codebook/codebook_route.h"
#include "common/torch_glue.h"

namespace tersor::codebook {
namespace {

std::string codebook_route_op(std::string op, int64_t cc, int64_t rows, int64_t codebook_entries) {
  CodebookOp o;
  TERSOR_CHECK_VALUE(parse_codebook_op(op, &o), "_codebook_route: unknown op '", op,
                     "'; expected e8p_decode, e8p_linear, aqlm_decode or aqlm_linear");
  TERSOR_CHECK_VALUE(cc >= 10 && cc < 1000, "_codebook_route: cc must be 10 * major + minor (e.g. 90), got ", cc);
  TERSOR_CHECK_VALUE(rows >= 0, "_codebook_route: rows must be >= 0, got ", rows);
  TERSOR_CHECK_VALUE(codebook_entries >= 0, "_codebook_route: codebook_entries must be >= 0, got ", codebook_entries);
  const CodebookPath p = codebook_route(o, static_cast<int>(cc), rows, codebook_entries);
  TERSOR_CHECK_NOT_IMPL(p != CodebookPath::kUnsupported, codebook_unsupported_message(o, static_cast<int>(cc)));
  return codebook_path_name(p);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(tersor, CompositeExplicitAutograd, m) {
  m.impl("_codebook_route", TORCH_BOX(&codebook_route_op));
}

}  // namespace tersor::codebook
