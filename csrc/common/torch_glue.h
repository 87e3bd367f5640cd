// The thin torch glue layer, on the libtorch stable ABI only (host C++; never included by kernel sources).
//
// Why the stable ABI: tersor._C must load in every torch >= 2.11 without a rebuild. Everything here goes
// through torch's C shim (torch/csrc/stable, torch/headeronly), compiled with TORCH_TARGET_VERSION = 2.11,
// so the binary uses no C++ symbol of c10/ATen/torch (tests/test_wheel.py lists the undefined symbols).
//
// Errors: through the stable boundary every C++ exception reaches Python as RuntimeError. A check states
// the Python type it means as the first word of its message ("ValueError: op: ..."); tersor's Python
// wrappers (tersor/_errors.py) re-raise such an error as that type, so users of tersor.* see ValueError /
// TypeError / NotImplementedError, and direct torch.ops callers still get a message that says which.
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Float8_e4m3fn.h>
#include <torch/headeronly/util/Half.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <mutex>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/dtype.h"

namespace tersor {

using Tensor = torch::stable::Tensor;
using ScalarType = torch::headeronly::ScalarType;
using Device = torch::stable::Device;
using DeviceType = torch::headeronly::DeviceType;
using IntArrayRef = torch::headeronly::IntHeaderOnlyArrayRef;
using Half = torch::headeronly::Half;
using BFloat16 = torch::headeronly::BFloat16;

namespace detail {

template <class... Args>
std::string cat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

[[noreturn]] inline void fail(const char* kind, const std::string& msg) {
  throw std::runtime_error(kind ? std::string(kind) + ": " + msg : msg);
}

}  // namespace detail

// torch::stable::parallel_for with the body's error message kept. Why: the body runs behind torch's C shim, and
// torch 2.11's shim turns an exception thrown there into "torch_parallel_for(...) API call failed at ops.h" (the
// real message only goes to stderr; 2.14 keeps it), so a check inside a loop ("ValueError: codec: chunk 7 ...")
// lost both its text and its kind. Here the first exception is caught inside the body, later chunks return
// at once, and the message is rethrown on the calling thread, where it crosses the op boundary intact.
template <class F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& body) {
  std::atomic<bool> failed{false};
  std::mutex mu;
  std::string message;
  torch::stable::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
    if (failed.load(std::memory_order_relaxed)) return;
    try {
      body(b, e);
    } catch (const std::exception& ex) {
      std::lock_guard<std::mutex> lock(mu);
      if (!failed.exchange(true)) message = ex.what();
    }
  });
  if (failed.load()) throw std::runtime_error(message);
}

// Throws the error a failed check means; `kind` (or nullptr) becomes the message's first word.
#define TERSOR_CHECK_KIND_(kind, cond, ...)                                              \
  do {                                                                                   \
    if (!(cond)) ::tersor::detail::fail(kind, ::tersor::detail::cat(__VA_ARGS__));       \
  } while (0)
// A bad argument value or shape (Python: ValueError).
#define TERSOR_CHECK_VALUE(cond, ...) TERSOR_CHECK_KIND_("ValueError", cond, __VA_ARGS__)
// A bad dtype (Python: TypeError).
#define TERSOR_CHECK_TYPE(cond, ...) TERSOR_CHECK_KIND_("TypeError", cond, __VA_ARGS__)
// A mode with no kernel here (Python: NotImplementedError).
#define TERSOR_CHECK_NOT_IMPL(cond, ...) TERSOR_CHECK_KIND_("NotImplementedError", cond, __VA_ARGS__)
// Anything else: a wrong device, corrupted data, an internal invariant (Python: RuntimeError).
#define TERSOR_CHECK(cond, ...) TERSOR_CHECK_KIND_(nullptr, cond, __VA_ARGS__)

// ---- dtypes ----

// "float32", "bfloat16", ... (torch's Python names, for error messages).
inline const char* dtype_name(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return "float32";
    case ScalarType::Double: return "float64";
    case ScalarType::Half: return "float16";
    case ScalarType::BFloat16: return "bfloat16";
    case ScalarType::Byte: return "uint8";
    case ScalarType::Char: return "int8";
    case ScalarType::Short: return "int16";
    case ScalarType::Int: return "int32";
    case ScalarType::Long: return "int64";
    case ScalarType::Bool: return "bool";
    case ScalarType::Float8_e4m3fn: return "float8_e4m3fn";
    case ScalarType::Float8_e5m2: return "float8_e5m2";
    default: return torch::headeronly::toString(t);
  }
}

// Maps a torch floating dtype to the kernel enum; any other dtype is a TypeError.
inline DType to_kernel_dtype(ScalarType t, const char* op) {
  switch (t) {
    case ScalarType::Float: return DType::kFloat32;
    case ScalarType::Half: return DType::kFloat16;
    case ScalarType::BFloat16: return DType::kBFloat16;
    default:
      TERSOR_CHECK_TYPE(false, op, ": expected float32, float16 or bfloat16, got ", dtype_name(t));
  }
  return DType::kFloat32;  // unreachable
}

// Calls fn(T{}) with T the C++ type of a float32 / float16 / bfloat16 dtype (TypeError otherwise): the
// stable ABI's replacement for AT_DISPATCH_FLOATING_TYPES_AND2(kHalf, kBFloat16, ...).
template <class Fn>
decltype(auto) dispatch_float(ScalarType t, const char* op, Fn&& fn) {
  switch (t) {
    case ScalarType::Half: return fn(Half{});
    case ScalarType::BFloat16: return fn(BFloat16{});
    case ScalarType::Float: return fn(float{});
    default:
      TERSOR_CHECK_TYPE(false, op, ": expected float32, float16 or bfloat16, got ", dtype_name(t));
  }
  return fn(float{});  // unreachable
}

// ---- devices ----

inline std::string device_str(const Tensor& t) {
  if (t.is_cpu()) return "cpu";
  if (t.is_cuda()) return "cuda:" + std::to_string(t.get_device_index());
  return "device type " + std::to_string(static_cast<int>(t.device().type()));
}

// ---- tensor creation and aten ops ----

inline Tensor empty(IntArrayRef sizes, ScalarType dtype, Device device) {
  return torch::stable::empty(sizes, dtype, std::nullopt, device);
}
inline Tensor zeros(IntArrayRef sizes, ScalarType dtype, Device device) {
  Tensor t = empty(sizes, dtype, device);
  torch::stable::zero_(t);
  return t;
}
// The stable ABI reaches aten through boxed dispatcher calls, a few microseconds each (ATen's inlined fast
// paths cost ~0.1 us). A small-batch GEMV makes a dozen such calls, so these skip the call where it would
// be a no-op (aten returns the tensor itself then, so the result is the same either way).
inline Tensor as_contiguous(const Tensor& t) { return t.is_contiguous() ? t : torch::stable::contiguous(t); }
inline Tensor as_dtype(const Tensor& t, ScalarType dtype) {
  return t.scalar_type() == dtype ? t : torch::stable::to(t, dtype);
}
inline std::vector<int64_t> sizes_vec(const Tensor& t) { return t.sizes().vec(); }

// "[a, b, c]", as torch prints a size list (for error messages).
inline std::string list_str(const std::vector<int64_t>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}
inline std::string sizes_str(const Tensor& t) { return list_str(sizes_vec(t)); }

// Any aten op through the dispatcher, for what torch/csrc/stable/ops.h does not wrap at the 2.11 floor
// (linear, mul_, add_, ...). Arguments are converted exactly as the stable ops.h wrappers convert theirs.
template <class... Args>
Tensor call_aten(const char* name, const char* overload, const Args&... args) {
  std::array<StableIValue, sizeof...(Args) == 0 ? 1 : sizeof...(Args)> stack{torch::stable::detail::from(args)...};
  STABLE_TORCH_ERROR_CODE_CHECK(torch_call_dispatcher(name, overload, stack.data(), TORCH_ABI_VERSION));
  return torch::stable::detail::to<Tensor>(stack[0]);
}

// y = x @ w^T (+ bias), aten::linear (the same kernel F.linear runs, so results are bit-identical to it).
inline Tensor linear(const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias) {
  return call_aten("aten::linear", "", x, w, bias);
}

// True when ptr is aligned to `bytes` (kernels use vector loads of up to 16 bytes).
inline bool is_aligned(const void* ptr, std::size_t bytes) {
  return reinterpret_cast<std::uintptr_t>(ptr) % bytes == 0;
}

}  // namespace tersor
