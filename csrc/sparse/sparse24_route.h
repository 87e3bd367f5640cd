// Which CUDA kernel sparse24_linear runs: a plain host function of (compute capability, rows of x, the
// `path` argument, whether this build has the sm90a cubin), so the routing table is tested on the CPU for
// every compute capability (op _sparse24_route, tests/test_sparse24_sm90.py) and Python helpers and the
// benchmark ask it instead of mirroring it. The CUDA glue calls it with the device's compute capability.
//
// path="auto": the mma.sp GEMV up to Sparse24GemvTraits::kMaxBatch rows of x, then on a compute-capability
// 9.0 device with the sm90a cubin built the wgmma.sp GEMM from Sparse24Sm90Traits::kMinBatch rows, else the
// mma.sp GEMM. path="gemv" | "gemm" | "sm90" forces one kernel (tests check every kernel against the CPU op;
// benchmarks time one beside another): "gemv" takes at most kMaxBatch rows (ValueError on every device), a
// kernel this architecture cannot run is NotImplementedError naming the paths it can run: never a silent
// fallback. (The argument is named `path`, not `kernel`: inductor lowers a custom op through
// FallbackKernel.create(kernel, *args, **kwargs), so an op argument named `kernel` breaks torch.compile.)
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "common/torch_glue.h"
#include "sparse/sparse24_cuda_traits.h"

namespace tersor::sparse24 {

// Whether this build carries the sm90a wgmma.sp GEMM (CMake defines TERSOR_SPARSE24_SM90 for tersor._C when
// the 9.0a cubin is built).
#ifdef TERSOR_SPARSE24_SM90
inline constexpr bool kBuildHasSm90Cubin = true;
#else
inline constexpr bool kBuildHasSm90Cubin = false;
#endif

enum class LinearKernel { kAuto, kGemv, kGemm, kSm90 };

inline const char* kernel_name(LinearKernel k) {
  switch (k) {
    case LinearKernel::kGemv: return "gemv";
    case LinearKernel::kGemm: return "gemm";
    case LinearKernel::kSm90: return "sm90";
    default: return "auto";
  }
}

// The `path` argument, checked the same way on every device (and by the fake): a known name, and "gemv"
// only for as many rows of x as the GEMV takes.
inline LinearKernel parse_path(std::string_view path, int64_t rows, const char* op) {
  LinearKernel k = LinearKernel::kAuto;
  if (path == "auto") {
    k = LinearKernel::kAuto;
  } else if (path == "gemv") {
    k = LinearKernel::kGemv;
  } else if (path == "gemm") {
    k = LinearKernel::kGemm;
  } else if (path == "sm90") {
    k = LinearKernel::kSm90;
  } else {
    TERSOR_CHECK_VALUE(false, op, ": path must be auto, gemv, gemm or sm90, got '", path, "'");
  }
  TERSOR_CHECK_VALUE(rows >= 0, op, ": rows must be non-negative, got ", rows);
  TERSOR_CHECK_VALUE(k != LinearKernel::kGemv || rows <= Sparse24GemvTraits::kMaxBatch, op,
                     ": path='gemv' takes at most ", Sparse24GemvTraits::kMaxBatch, " rows of x, got ", rows);
  return k;
}

// The mma.sp kernels (GEMV, GEMM) are sm80 code and run on every later architecture (the build carries
// their PTX for newer GPUs); the wgmma.sp GEMM exists only on sm90a (compute capability 9.0 exactly).
inline bool mma_sp_kernels_apply(int64_t cc) { return cc >= 80; }
inline bool sm90_kernel_applies(int64_t cc, bool has_sm90_cubin) { return has_sm90_cubin && cc == 90; }

inline std::string cc_str(int64_t cc) { return std::to_string(cc / 10) + "." + std::to_string(cc % 10); }

// "auto, gemv, gemm" (+ ", sm90"): the `path` values compute capability cc can run in this build.
inline std::string supported_paths(int64_t cc, bool has_sm90_cubin) {
  if (!mma_sp_kernels_apply(cc)) return "none";
  return sm90_kernel_applies(cc, has_sm90_cubin) ? "auto, gemv, gemm, sm90" : "auto, gemv, gemm";
}

// The kernel sparse24_linear runs for `rows` rows of x on a device of compute capability cc (10 * major +
// minor): kGemv, kGemm or kSm90 (never kAuto).
inline LinearKernel route_linear(int64_t cc, int64_t rows, std::string_view path, bool has_sm90_cubin,
                                 const char* op) {
  const LinearKernel k = parse_path(path, rows, op);
  TERSOR_CHECK_NOT_IMPL(mma_sp_kernels_apply(cc), op, ": no CUDA kernel for compute capability ", cc_str(cc),
                        ": the 2:4 kernels (mma.sp) need compute capability 8.0 or newer");
  switch (k) {
    case LinearKernel::kGemv:
    case LinearKernel::kGemm:
      return k;
    case LinearKernel::kSm90:
      TERSOR_CHECK_NOT_IMPL(sm90_kernel_applies(cc, has_sm90_cubin), op,
                            ": path='sm90' cannot run on compute capability ", cc_str(cc),
                            cc == 90 ? " in this build" : "",
                            " (the wgmma.sp GEMM needs a compute-capability 9.0 device and a build with the sm90a "
                            "cubin, TORCH_CUDA_ARCH_LIST containing 9.0a); this architecture supports path = ",
                            supported_paths(cc, has_sm90_cubin));
      return k;
    default:
      break;
  }
  static_assert(Sparse24GemmTraits::kMinBatch == Sparse24GemvTraits::kMaxBatch + 1, "every batch has a kernel");
  if (rows <= Sparse24GemvTraits::kMaxBatch) return LinearKernel::kGemv;
  if (rows >= Sparse24Sm90Traits::kMinBatch && sm90_kernel_applies(cc, has_sm90_cubin)) return LinearKernel::kSm90;
  return LinearKernel::kGemm;
}

}  // namespace tersor::sparse24
