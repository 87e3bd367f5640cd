// Helpers for the thin torch glue layer (host C++ only; never included by kernel sources).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

#include "common/dtype.h"

namespace tersor {

// Maps a torch floating dtype to the kernel enum; any other dtype is a clear TypeError-style error.
inline DType to_kernel_dtype(c10::ScalarType t, const char* op) {
  switch (t) {
    case c10::ScalarType::Float: return DType::kFloat32;
    case c10::ScalarType::Half: return DType::kFloat16;
    case c10::ScalarType::BFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, op, ": expected float32, float16 or bfloat16, got ", t);
  }
}

// True when ptr is aligned to `bytes` (kernels use vector loads of up to 16 bytes).
inline bool is_aligned(const void* ptr, std::size_t bytes) {
  return reinterpret_cast<std::uintptr_t>(ptr) % bytes == 0;
}

}  // namespace tersor
