// CUDA implementation of bsr_linear (torch glue; kernel in bsr_cuda_kernel.cuh). float16/bfloat16 run the
// tensor-core kernel; float32 builds the dense weight on the device and calls aten::linear (no fp32 kernel).
#include <algorithm>
#include <array>
#include <cstdint>
#include <mutex>
#include <optional>
#include <vector>

#include "common/cuda_glue.h"
#include "common/torch_glue.h"
#include "sparse/bsr_cuda.h"
#include "sparse/bsr_glue.h"

namespace tersor::sparse {
namespace {

Tensor aligned16(const Tensor& t) {
  Tensor c = as_contiguous(t);
  return is_aligned(c.const_data_ptr(), 16) ? c : torch::stable::clone(c);
}

// Index validation. The kernel (and the float32 path's index_copy_) reads x and values at offsets taken
// from col_indices and schedule, so an index that was never validated, or was changed after it was, would
// be an out-of-bounds read. Before the stable ABI the op validated once per index tensor *state* and
// remembered it (weak storage reference + version counter). The stable ABI at the 2.11 floor exposes neither,
// and nothing else tells the host that device memory was written (an in-place write is just a kernel on the
// stream), so the only sound check is one that reads the indices as they are now:
//
//  * Every call outside CUDA-graph capture copies crow_indices, col_indices and schedule to the host (one
//    stream sync; col_indices is 2/bs^2 of the 16-bit weight's bytes) and runs the full _bsr_check rules
//    on them (check_bsr_indices_cpu + check_bsr_schedule_cpu) before anything is launched. A bad index, a
//    fresh bad tensor or one modified in place since an earlier call is a ValueError, never a kernel read.
//  * A CUDA-graph capture cannot read device memory (no sync is allowed), and a graph replays whatever the
//    index memory holds at replay time anyway: no host check can see a replay. So inside a capture the op
//    accepts only index tensors that are, by identity (device, data pointers, element counts), among the
//    last kCapacity sets that passed the full check on an uncaptured call; otherwise it refuses to capture
//    (call the op once before capturing: graph warm-up does). Their contents at capture time are the
//    caller's responsibility, as for every input of a captured graph. (Identity is weaker than the old weak
//    reference: index tensors freed and replaced by others at the same addresses and sizes between the
//    warm-up and the capture would pass. Outside capture nothing is trusted.)
//
// The float32 path needs each block's linear position (row * Kb + col) on the device; it is computed on the
// host from the copies made for the check and kept with the identity entry for captures.
class BsrIndexCheck {
 public:
  static BsrIndexCheck& instance() {
    static BsrIndexCheck* cache = new BsrIndexCheck();  // never destroyed: holds tensors past torch's teardown
    return *cache;
  }

  // Validates the indices (or, inside a capture, finds them validated); returns the device int64 block
  // positions when `want_block_index` (float32 path), else nullopt.
  std::optional<Tensor> check(const BsrCall& c, const Tensor& crow, const Tensor& col, const Tensor& schedule,
                              bool want_block_index, const char* op) {
    const Key key = key_of(crow, col, schedule);
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    TERSOR_CUDA_CHECK(cudaStreamIsCapturing(current_cuda_stream(key.device), &capture));
    if (capture != cudaStreamCaptureStatusNone) {
      const std::lock_guard<std::mutex> lock(mu_);
      for (const Entry& e : entries_)
        if (e.key == key && (!want_block_index || e.block_index.has_value())) return e.block_index;
      TERSOR_CHECK(false, op,
                   ": these BSR index tensors have not passed the index check on an uncaptured call, and it "
                   "cannot run while a CUDA graph is being captured (it reads them on the host); call the op "
                   "once with them before capturing (graph warm-up does)");
    }
    forget(key);  // a set that fails now must not stay trusted for captures
    const Device cpu(DeviceType::CPU);
    const Tensor crow_h = as_contiguous(torch::stable::to(crow, cpu));
    const Tensor col_h = as_contiguous(torch::stable::to(col, cpu));
    const Tensor sched_h = as_contiguous(torch::stable::to(schedule, cpu));
    check_bsr_indices_cpu(c, crow_h, col_h, op);
    check_bsr_schedule_cpu(c, crow_h, sched_h, op);
    std::optional<Tensor> block_index;
    if (want_block_index) block_index = block_positions(c, crow_h, col_h, crow.device());
    remember(Entry{key, block_index});
    return block_index;
  }

 private:
  static constexpr size_t kCapacity = 256;  // live BSR layers of a large model; older sets must be re-run

  struct Key {
    int device = -1;
    std::array<const void*, 3> ptr{};
    std::array<int64_t, 3> numel{};
    bool operator==(const Key& o) const { return device == o.device && ptr == o.ptr && numel == o.numel; }
  };
  struct Entry {
    Key key;
    std::optional<Tensor> block_index;
  };

  static Key key_of(const Tensor& crow, const Tensor& col, const Tensor& schedule) {
    Key k;
    k.device = crow.get_device_index();
    const std::array<const Tensor*, 3> ts{&crow, &col, &schedule};
    for (size_t i = 0; i < ts.size(); ++i) {
      k.ptr[i] = ts[i]->const_data_ptr();
      k.numel[i] = ts[i]->numel();
    }
    return k;
  }

  // row * Kb + col of every stored block, int64 on `device` (indices already checked).
  static Tensor block_positions(const BsrCall& c, const Tensor& crow_h, const Tensor& col_h, Device device) {
    Tensor pos = empty({c.nnzb}, ScalarType::Long, Device(DeviceType::CPU));
    const int32_t* cr = crow_h.const_data_ptr<int32_t>();
    const int32_t* ci = col_h.const_data_ptr<int32_t>();
    int64_t* p = pos.mutable_data_ptr<int64_t>();
    for (int64_t r = 0; r < c.mb; ++r)
      for (int64_t j = cr[r]; j < cr[r + 1]; ++j) p[j] = r * c.kb + ci[j];
    return torch::stable::to(pos, device);
  }

  // entries_ runs from the least to the most recently checked set, each key at most once.
  void forget(const Key& key) {
    const std::lock_guard<std::mutex> lock(mu_);
    erase_key(key);
  }

  void remember(Entry e) {
    const std::lock_guard<std::mutex> lock(mu_);
    erase_key(e.key);
    if (entries_.size() >= kCapacity) entries_.erase(entries_.begin());
    entries_.push_back(std::move(e));
  }

  // Caller holds mu_.
  void erase_key(const Key& key) {
    entries_.erase(std::remove_if(entries_.begin(), entries_.end(), [&](const Entry& e) { return e.key == key; }),
                   entries_.end());
  }

  std::mutex mu_;
  std::vector<Entry> entries_;
};

// The dense [out_features, in_features] weight: blocks scattered to their (row, col) positions.
Tensor dense_weight(const BsrCall& c, const Tensor& block_index, const Tensor& values) {
  Tensor blocks = zeros({c.mb * c.kb, c.bs, c.bs}, values.scalar_type(), values.device());
  if (c.nnzb > 0) call_aten("aten::index_copy_", "", blocks, int64_t{0}, block_index, values);
  const Tensor grid = torch::stable::view(blocks, {c.mb, c.kb, c.bs, c.bs});
  return torch::stable::reshape(torch::stable::permute(grid, {0, 2, 1, 3}), {c.out_features, c.in_features});
}

Tensor bsr_linear_cuda(const Tensor& x, const Tensor& crow_indices, const Tensor& col_indices, const Tensor& values,
                       const Tensor& schedule, int64_t in_features, const std::optional<Tensor>& bias) {
  constexpr const char* op = "bsr_linear";
  const BsrCall c = check_bsr_call(x, crow_indices, col_indices, values, schedule, in_features, bias, op);
  TERSOR_CHECK(x.is_cuda(), op, ": expected CUDA tensors");
  const CudaDeviceGuard guard(x);
  if (c.tokens == 0) return empty(c.out_shape, x.scalar_type(), x.device());
  const bool fp32 = x.scalar_type() == ScalarType::Float;
  const std::optional<Tensor> block_index =
      BsrIndexCheck::instance().check(c, crow_indices, col_indices, schedule, fp32, op);
  if (fp32) return linear(x, dense_weight(c, *block_index, values), bias);
  TERSOR_CHECK_VALUE(c.tokens <= bsr_cuda_max_tokens(), op, ": x has ", c.tokens,
                     " tokens (rows); the CUDA kernel takes at most ", bsr_cuda_max_tokens(),
                     " per call (65535 token tiles of ", kBsrLargeTokens, ", CUDA's gridDim.y limit); split x");
  const Tensor x2 = aligned16(torch::stable::reshape(x, {c.tokens, c.in_features}));
  const Tensor v = aligned16(values);
  const Tensor col = as_contiguous(col_indices), sched = as_contiguous(schedule);
  std::optional<Tensor> b;
  if (bias) b = as_contiguous(*bias);
  Tensor y = empty({c.tokens, c.out_features}, x.scalar_type(), x.device());
  const int64_t scratch_n = bsr_scratch_floats(c.bs, c.mb, c.n_split, c.tokens);
  std::optional<Tensor> scratch;
  if (scratch_n > 0) scratch = empty({scratch_n}, ScalarType::Float, x.device());
  BsrKernelArgs a;
  a.x = x2.const_data_ptr();
  a.values = v.const_data_ptr();
  a.col = col.const_data_ptr<int32_t>();
  a.schedule = sched.const_data_ptr<int32_t>();
  a.bias = b ? b->const_data_ptr() : nullptr;
  a.y = y.mutable_data_ptr();
  a.partial = scratch ? scratch->mutable_data_ptr<float>() : nullptr;
  a.tokens = c.tokens;
  a.in_features = c.in_features;
  a.out_features = c.out_features;
  a.mb = c.mb;
  a.n_split = c.n_split;
  a.bs = static_cast<int>(c.bs);
  TERSOR_CUDA_CHECK(
      launch_bsr_linear(a, to_kernel_dtype(x.scalar_type(), op), current_cuda_stream(x.get_device_index())));
  return torch::stable::reshape(y, c.out_shape);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(tersor, CUDA, m) { m.impl("bsr_linear", TORCH_BOX(&bsr_linear_cuda)); }

}  // namespace tersor::sparse
