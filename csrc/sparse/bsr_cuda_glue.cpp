// CUDA implementation of bsr_linear (torch glue; kernel in bsr_cuda_kernel.cuh). float16/bfloat16 run the
// tensor-core kernel; float32 builds the dense weight on the device and calls at::linear (no fp32 kernel).
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/repeat_interleave.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/core/TensorImpl.h>
#include <c10/util/intrusive_ptr.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <array>
#include <mutex>
#include <optional>
#include <vector>

#include "common/torch_glue.h"
#include "sparse/bsr_cuda.h"
#include "sparse/bsr_glue.h"

namespace tersor::sparse {
namespace {

at::Tensor aligned16(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return is_aligned(c.const_data_ptr(), 16) ? c : c.clone();
}

// The kernel reads x and values at offsets taken from col_indices and schedule, so indices that were never
// validated would be out-of-bounds reads. Validation needs the indices on the host (one copy and a stream
// sync), so it is done once per index tensor state and remembered: an entry matches while the three
// tensors' storages are alive (weak references: a freed and reused address never matches), their offsets
// and sizes are unchanged and their version counters (bumped by every in-place write) have not moved.
// SparseLinear's buffers hit the cache on every call after the first; a fresh or modified weight pays one
// host check. Inference tensors have no version counter, so they are checked on every call.
class ValidatedBsrIndices {
 public:
  static ValidatedBsrIndices& instance() {
    static ValidatedBsrIndices cache;
    return cache;
  }

  void check(const BsrCall& c, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& schedule,
             const char* op) {
    const std::array<const at::Tensor*, 3> ts{&crow, &col, &schedule};
    const bool cacheable = !crow.is_inference() && !col.is_inference() && !schedule.is_inference();
    if (cacheable) {
      const std::lock_guard<std::mutex> lock(mu_);
      for (const Entry& e : entries_)
        if (e.matches(ts)) return;
    }
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(), &capture));
    TORCH_CHECK(capture == cudaStreamCaptureStatusNone, op,
                ": these BSR indices have not been validated yet and cannot be while a CUDA graph is being "
                "captured; call the op once before capturing (graph warm-up does)");
    const at::Tensor crow_h = crow.cpu().contiguous(), col_h = col.cpu().contiguous();
    const at::Tensor sched_h = schedule.cpu().contiguous();
    check_bsr_indices_cpu(c, crow_h, col_h, op);
    check_bsr_schedule_cpu(c, crow_h, sched_h, op);
    if (!cacheable) return;
    Entry e;
    for (size_t i = 0; i < ts.size(); ++i) e.set(i, *ts[i]);
    const std::lock_guard<std::mutex> lock(mu_);
    if (entries_.size() < kCapacity) {
      entries_.push_back(std::move(e));
    } else {
      entries_[next_] = std::move(e);
      next_ = (next_ + 1) % kCapacity;
    }
  }

 private:
  static constexpr size_t kCapacity = 256;  // live BSR layers of a large model; older entries are re-checked

  struct Entry {
    std::vector<c10::weak_intrusive_ptr<c10::StorageImpl>> storage;
    std::array<int64_t, 3> offset{}, numel{};
    std::array<uint32_t, 3> version{};

    void set(size_t i, const at::Tensor& t) {
      storage.push_back(t.storage().getWeakStorageImpl());
      offset[i] = t.storage_offset();
      numel[i] = t.numel();
      version[i] = t.unsafeGetTensorImpl()->version_counter().current_version();
    }
    bool matches(const std::array<const at::Tensor*, 3>& ts) const {
      for (size_t i = 0; i < ts.size(); ++i) {
        const at::Tensor& t = *ts[i];
        const c10::intrusive_ptr<c10::StorageImpl> alive = storage[i].lock();
        if (!alive || alive.get() != t.storage().unsafeGetStorageImpl() || offset[i] != t.storage_offset() ||
            numel[i] != t.numel() || version[i] != t.unsafeGetTensorImpl()->version_counter().current_version())
          return false;
      }
      return true;
    }
  };

  std::mutex mu_;
  std::vector<Entry> entries_;
  size_t next_ = 0;
};

at::Tensor dense_weight(const BsrCall& c, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values) {
  const at::Tensor counts = crow.slice(0, 1).sub(crow.slice(0, 0, c.mb));
  const at::Tensor rows = at::repeat_interleave(at::arange(c.mb, crow.options().dtype(at::kLong)),
                                                counts.to(at::kLong), /*dim=*/0, /*output_size=*/c.nnzb);
  at::Tensor blocks = at::zeros({c.mb, c.kb, c.bs, c.bs}, values.options());
  blocks.index_put_({rows, col.to(at::kLong)}, values);
  return blocks.permute({0, 2, 1, 3}).reshape({c.out_features, c.in_features});
}

at::Tensor bsr_linear_cuda(const at::Tensor& x, const at::Tensor& crow_indices, const at::Tensor& col_indices,
                           const at::Tensor& values, const at::Tensor& schedule, int64_t in_features,
                           const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "bsr_linear";
  const BsrCall c = check_bsr_call(x, crow_indices, col_indices, values, schedule, in_features, bias, op);
  TORCH_CHECK(x.is_cuda(), op, ": expected CUDA tensors");
  const c10::cuda::CUDAGuard guard(x.device());
  if (c.tokens == 0) return at::empty(c.out_shape, x.options());
  ValidatedBsrIndices::instance().check(c, crow_indices, col_indices, schedule, op);
  if (x.scalar_type() == at::kFloat)
    return at::linear(x, dense_weight(c, crow_indices, col_indices, values), bias);
  TORCH_CHECK_VALUE(c.tokens <= int64_t{65535} * kBsrLargeTokens, op, ": too many tokens for one launch: ", c.tokens);
  const at::Tensor x2 = aligned16(x.reshape({c.tokens, c.in_features}));
  const at::Tensor v = aligned16(values);
  const at::Tensor col = col_indices.contiguous(), sched = schedule.contiguous();
  std::optional<at::Tensor> b;
  if (bias) b = bias->contiguous();
  at::Tensor y = at::empty({c.tokens, c.out_features}, x.options());
  const int64_t scratch_n = bsr_scratch_floats(c.bs, c.mb, c.n_split, c.tokens);
  at::Tensor scratch;
  if (scratch_n > 0) scratch = at::empty({scratch_n}, x.options().dtype(at::kFloat));
  BsrKernelArgs a;
  a.x = x2.const_data_ptr();
  a.values = v.const_data_ptr();
  a.col = col.const_data_ptr<int32_t>();
  a.schedule = sched.const_data_ptr<int32_t>();
  a.bias = b ? b->const_data_ptr() : nullptr;
  a.y = y.mutable_data_ptr();
  a.partial = scratch_n > 0 ? scratch.mutable_data_ptr<float>() : nullptr;
  a.tokens = c.tokens;
  a.in_features = c.in_features;
  a.out_features = c.out_features;
  a.mb = c.mb;
  a.n_split = c.n_split;
  a.bs = static_cast<int>(c.bs);
  C10_CUDA_CHECK(launch_bsr_linear(a, to_kernel_dtype(x.scalar_type(), op), c10::cuda::getCurrentCUDAStream()));
  return y.reshape(c.out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(tersor, CUDA, m) { m.impl("bsr_linear", &bsr_linear_cuda); }

}  // namespace tersor::sparse
