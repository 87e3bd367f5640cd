// Helpers for the CUDA torch glue (host C++ compiled only into CUDA builds; never included by kernels).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <atomic>

namespace tersor {

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
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    cc = 10 * major + minor;
    if (cacheable) cached[device].store(cc, std::memory_order_relaxed);
  }
  return cc;
}

}  // namespace tersor
