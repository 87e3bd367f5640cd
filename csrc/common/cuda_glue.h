// Helpers for the CUDA torch glue (host C++ compiled only into CUDA builds; never included by kernels).
//
// tersor._C links the CUDA runtime statically and does not link libtorch_cuda: the one wheel then imports
// in any torch >= 2.11, CPU or CUDA build, whatever CUDA runtime that torch carries. CUDA handles are
// driver handles, so torch's streams and memory are used as they are (both runtimes use the device's
// primary context). What tersor needs from torch's CUDA side (the current stream) is looked up at run
// time in the libtorch_cuda that torch has already loaded.
#pragma once

#include <cuda_runtime.h>
#include <dlfcn.h>

#include <atomic>
#include <torch/csrc/stable/accelerator.h>

#include "common/torch_glue.h"

namespace tersor {

// Throws a RuntimeError naming the CUDA error (the stable ABI's STD_CUDA_CHECK needs libtorch_cuda).
#define TERSOR_CUDA_CHECK(expr)                                                                      \
  do {                                                                                               \
    const cudaError_t tersor_err_ = (expr);                                                          \
    if (tersor_err_ != cudaSuccess)                                                                  \
      ::tersor::detail::fail(nullptr, ::tersor::detail::cat("CUDA error: ", cudaGetErrorString(tersor_err_), \
                                                          " (", #expr, " at ", __FILE__, ":", __LINE__, ")")); \
  } while (0)

// torch's current CUDA stream on `device` (what c10::cuda::getCurrentCUDAStream returns), through the C
// shim aoti_torch_get_current_cuda_stream. At the 2.11 ABI floor this is the only stable route to the raw
// stream (torch::stable::accelerator::Stream::nativeHandle needs 2.13). A CUDA tensor exists, so torch is a
// CUDA build and libtorch_cuda is loaded: RTLD_NOLOAD finds it without loading anything.
inline cudaStream_t current_cuda_stream(int device) {
  using GetStream = int32_t (*)(int32_t, void**);
  static const GetStream get_stream = []() -> GetStream {
    void* lib = dlopen("libtorch_cuda.so", RTLD_NOLOAD | RTLD_LAZY);
    void* sym = lib ? dlsym(lib, "aoti_torch_get_current_cuda_stream") : nullptr;
    return reinterpret_cast<GetStream>(sym);
  }();
  TERSOR_CHECK(get_stream != nullptr,
               "tersor: aoti_torch_get_current_cuda_stream not found in a loaded libtorch_cuda.so (a CUDA tensor "
               "on a torch without CUDA?)");
  void* stream = nullptr;
  TERSOR_CHECK(get_stream(device, &stream) == 0, "tersor: could not get torch's current CUDA stream on device ",
               device);
  return static_cast<cudaStream_t>(stream);
}

// Sets the current device for the scope (c10::cuda::CUDAGuard's role), through the device-generic shim.
class CudaDeviceGuard {
 public:
  explicit CudaDeviceGuard(const Tensor& t) : guard_(t.get_device_index()) {}

 private:
  torch::stable::accelerator::DeviceGuard guard_;
};

// 10 * major + minor of `device` (90 for H100/H200, 89 for Ada, 80 for A100). Asked once per device and
// remembered: routing runs on every op call, and two attribute queries per call cost more than a small
// GEMV. Concurrent first calls store the same answer.
inline int compute_capability(int device) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached[kMaxDevices] = {};
  const bool cacheable = device >= 0 && device < kMaxDevices;
  int cc = cacheable ? cached[device].load(std::memory_order_relaxed) : 0;
  if (cc == 0) {
    int major = 0, minor = 0;
    TERSOR_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    TERSOR_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    cc = 10 * major + minor;
    if (cacheable) cached[device].store(cc, std::memory_order_relaxed);
  }
  return cc;
}

}  // namespace tersor
