// Helpers for the CUDA torch glue (host C++ compiled only into CUDA builds; never included by kernels).
//
// A CUDA build of tersor._C links libtorch_cuda (for the C shim's current-stream query) and the shared CUDA
// runtime libcudart.so.13, both already loaded by a CUDA 13 build of torch (the PyPI default for Linux
// x86_64 since 2.11): the wheel carries neither (scripts/build_wheel.sh excludes them).
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <torch/csrc/stable/accelerator.h>

#include "common/torch_glue.h"

// Declared by torch/csrc/inductor/aoti_torch/c/shim.h only under USE_CUDA (a macro torch's own build sets);
// the signature is part of the stable C shim.
extern "C" AOTITorchError aoti_torch_get_current_cuda_stream(int32_t device_index, void** ret_stream);

namespace tersor {

// Throws a RuntimeError naming the CUDA error (STD_CUDA_CHECK would need the 2.10 torch_c10_cuda_check_msg
// shim; this keeps the message and costs nothing on success).
#define TERSOR_CUDA_CHECK(expr)                                                                      \
  do {                                                                                               \
    const cudaError_t tersor_err_ = (expr);                                                          \
    if (tersor_err_ != cudaSuccess)                                                                  \
      ::tersor::detail::fail(nullptr, ::tersor::detail::cat("CUDA error: ", cudaGetErrorString(tersor_err_), \
                                                          " (", #expr, " at ", __FILE__, ":", __LINE__, ")")); \
  } while (0)

// torch's current CUDA stream on `device` (what c10::cuda::getCurrentCUDAStream returns). At the 2.11 ABI
// floor the C shim's aoti_torch_get_current_cuda_stream is the only stable route to the raw stream
// (torch::stable::accelerator::Stream::nativeHandle needs 2.13).
inline cudaStream_t current_cuda_stream(int device) {
  void* stream = nullptr;
  TERSOR_CHECK(aoti_torch_get_current_cuda_stream(device, &stream) == AOTI_TORCH_SUCCESS,
               "tersor: could not get torch's current CUDA stream on device ", device);
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
