// Which CUDA code path a codebook op takes on a device of a given compute capability: the one routing
// decision of the CUDA glue (codebook_cuda_glue.cpp), as a plain host function (no torch, no CUDA) so that
// the CPU tests walk it for every architecture through the shipped op _codebook_route, and Python's
// path-name helper and the benchmarks ask it instead of mirroring the table.
//
// Table (the kernels are portable sm80+ code: mma.sync m16n8k16 f16, built for every listed arch plus PTX):
//   cc < 80                       every op: NotImplementedError (no codebook kernel for the device)
//   e8p_decode                    "e8p_decode"
//   e8p_linear, rows <= 8         "e8p_gemv_mma"           fused decode + m16n8k16 tensor-core GEMV (x in fp16)
//   e8p_linear, rows > 8          "e8p_decode+mm_fp32out"  decode to fp16, aten::mm.dtype (fp16 x fp16 -> fp32)
//   aqlm_decode                   "aqlm_decode"
//   aqlm_linear, rows <= 8        "aqlm_gemv_smem"         fused decode GEMV, codebooks (<= 1024 entries) in smem
//                                 "aqlm_gemv_l2"           the same, larger codebooks (1x16) read through L2
//   aqlm_linear, rows > 8         "aqlm_decode+linear"     decode to x's dtype, aten::linear
//   *_linear, rows == 0           "empty"                  nothing to launch
#pragma once

#include <cstdint>
#include <string>

#include "codebook/codebook_cuda_traits.h"

namespace tersor::codebook {

enum class CodebookOp { kE8PDecode, kE8PLinear, kAQLMDecode, kAQLMLinear };

enum class CodebookPath {
  kUnsupported,
  kEmpty,
  kE8PDecode,
  kE8PGemv,
  kE8PDecodeMatmul,
  kAQLMDecode,
  kAQLMGemvSmem,
  kAQLMGemvL2,
  kAQLMDecodeLinear,
};

// The oldest compute capability the codebook kernels run on (mma.sync m16n8k16 with f16 operands).
inline constexpr int kCodebookMinCC = 80;

inline const char* codebook_op_name(CodebookOp op) {
  switch (op) {
    case CodebookOp::kE8PDecode: return "e8p_decode";
    case CodebookOp::kE8PLinear: return "e8p_linear";
    case CodebookOp::kAQLMDecode: return "aqlm_decode";
    case CodebookOp::kAQLMLinear: return "aqlm_linear";
  }
  return "?";
}

// The op of a name ("e8p_decode", "e8p_linear", "aqlm_decode", "aqlm_linear"); false for any other.
inline bool parse_codebook_op(const std::string& name, CodebookOp* op) {
  for (CodebookOp o : {CodebookOp::kE8PDecode, CodebookOp::kE8PLinear, CodebookOp::kAQLMDecode,
                       CodebookOp::kAQLMLinear}) {
    if (name == codebook_op_name(o)) {
      *op = o;
      return true;
    }
  }
  return false;
}

inline const char* codebook_path_name(CodebookPath p) {
  switch (p) {
    case CodebookPath::kUnsupported: return "unsupported";
    case CodebookPath::kEmpty: return "empty";
    case CodebookPath::kE8PDecode: return "e8p_decode";
    case CodebookPath::kE8PGemv: return "e8p_gemv_mma";
    case CodebookPath::kE8PDecodeMatmul: return "e8p_decode+mm_fp32out";
    case CodebookPath::kAQLMDecode: return "aqlm_decode";
    case CodebookPath::kAQLMGemvSmem: return "aqlm_gemv_smem";
    case CodebookPath::kAQLMGemvL2: return "aqlm_gemv_l2";
    case CodebookPath::kAQLMDecodeLinear: return "aqlm_decode+linear";
  }
  return "?";
}

// `rows`: rows of x (the *_linear ops; ignored by the decodes). `codebook_entries`: AQLM's entries over
// all codebooks (num_codebooks * 2^nbits; aqlm_linear only).
inline CodebookPath codebook_route(CodebookOp op, int cc, int64_t rows, int64_t codebook_entries) {
  if (cc < kCodebookMinCC) return CodebookPath::kUnsupported;
  switch (op) {
    case CodebookOp::kE8PDecode: return CodebookPath::kE8PDecode;
    case CodebookOp::kE8PLinear:
      if (rows == 0) return CodebookPath::kEmpty;
      return rows <= E8PGemvTraits::kMaxBatch ? CodebookPath::kE8PGemv : CodebookPath::kE8PDecodeMatmul;
    case CodebookOp::kAQLMDecode: return CodebookPath::kAQLMDecode;
    case CodebookOp::kAQLMLinear:
      if (rows == 0) return CodebookPath::kEmpty;
      if (rows > AQLMGemvTraits::kMaxBatch) return CodebookPath::kAQLMDecodeLinear;
      return aqlm_gemv_uses_smem(codebook_entries) ? CodebookPath::kAQLMGemvSmem : CodebookPath::kAQLMGemvL2;
  }
  return CodebookPath::kUnsupported;
}

// The NotImplementedError text for kUnsupported (without the "NotImplementedError: " prefix).
inline std::string codebook_unsupported_message(CodebookOp op, int cc) {
  return std::string(codebook_op_name(op)) + ": no CUDA kernel for compute capability " + std::to_string(cc / 10) +
         "." + std::to_string(cc % 10) + ": the codebook kernels (e8p_decode, e8p_linear, aqlm_decode, aqlm_linear) " +
         "need compute capability 8.0 or newer; this architecture supports none of them (run the op on the CPU)";
}

}  // namespace tersor::codebook
