// The element types kernels are instantiated for. Kernel headers use this instead of at::ScalarType
// so they stay free of torch headers (fast, parallel, reusable compilation).
#pragma once

namespace tersor {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

constexpr int dtype_bytes(DType t) { return t == DType::kFloat32 ? 4 : 2; }

}  // namespace tersor
