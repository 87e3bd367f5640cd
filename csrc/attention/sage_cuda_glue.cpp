// CUDA registration of sage_attention_fwd. The sm8x kernels (sage_quant_cuda.cu + sage_attn_cuda*.cu, built
// for sm80/sm89/sm90a when the arch list has them: TERSOR_SAGE_SM8X) cover INT8 QK (and INT4 on sm80/sm89),
// with or without Q smoothing, P.V in fp8 (sm89+) or the 16-bit dtype, head dims 64/128. On a compute-capability
// 9.0 device INT8 + FP8 without Q smoothing runs the sm90a wgmma kernel (sage_attn_sm90.cu) after the same
// prologue; the sm8x kernels still serve the other modes there (correct, not the fast path: FP8 mma.sync is
// emulated on Hopper). Every other case -- INT4 on cc 9.0, pv="fp32", the exact mode, a device without a
// matching cubin -- runs the CPU twin on host copies (correct, slow, warns once).
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>
#include <tuple>

#include "attention/sage_cuda.h"
#include "common/cuda_glue.h"
#include "attention/sage_format.h"
#include "attention/sage_glue.h"

namespace tersor::attention {
namespace {

std::tuple<at::Tensor, at::Tensor> host_twin(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             bool is_causal, double scale, int64_t qk_bits, c10::string_view pv,
                                             bool smooth_k, bool smooth_q) {
  TORCH_WARN_ONCE("sage_attention_fwd: no CUDA kernel for this configuration yet; running the CPU twin on host copies");
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("tersor::sage_attention_fwd", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                       const at::Tensor&, bool, double, int64_t,
                                                                       c10::string_view, bool, bool)>();
  auto [out, lse] = op.call(q.cpu(), k.cpu(), v.cpu(), is_causal, scale, qk_bits, pv, smooth_k, smooth_q);
  return {out.to(q.device()), lse.to(q.device())};
}

#ifndef TERSOR_SAGE_SM8X_ARCHS
#define TERSOR_SAGE_SM8X_ARCHS ""
#endif

// The best cubin of the sm8x kernels that runs on a device of compute capability (major, minor), as
// 10 * major + minor of the cubin (0: none). "80" runs on 8.x, "89" on 8.9+ of major 8, "90a" on 9.0 only.
int sm8x_cubin_for(int major, int minor) {
  int best = 0;
  const std::string archs = TERSOR_SAGE_SM8X_ARCHS;
  size_t pos = 0;
  while (pos < archs.size()) {
    size_t end = archs.find(',', pos);
    if (end == std::string::npos) end = archs.size();
    const std::string item = archs.substr(pos, end - pos);
    pos = end + 1;
    if (item.size() < 2) continue;
    const int a_major = item[0] - '0', a_minor = item[1] - '0';
    const bool arch_specific = item.size() > 2 && item[2] == 'a';
    const bool runs = a_major == major && (arch_specific ? a_minor == minor : a_minor <= minor);
    if (runs && 10 * a_major + a_minor > best) best = 10 * a_major + a_minor;
  }
  return best;
}

// Whether the sm8x kernels handle this call on this device.
bool sm8x_kernels_apply(const SageCall& c, const at::Tensor& q) {
#ifdef TERSOR_SAGE_SM8X
  if ((c.qk_bits != 8 && c.qk_bits != 4) || c.pv == PVMode::kFp32) return false;
  if (c.batch * c.heads_q > 65535 || c.batch * c.heads_kv > 65535) return false;  // grid.y
  const int cc = compute_capability(q.get_device());
  const int cubin = sm8x_cubin_for(cc / 10, cc % 10);
  if (cubin == 0) return false;
  if (c.qk_bits == 4 && cubin >= 90) return false;  // no INT4 mma.sync on Hopper (the sm90a INT4 kernels trap)
  return c.pv != PVMode::kFp8 || cubin >= 89;       // FP8 mma.sync is compiled for sm89+ only
#else
  (void)c;
  (void)q;
  return false;
#endif
}

// sm90a kernel (sage_attn_sm90.cu): INT8 QK + FP8 PV on a compute-capability 9.0 device, reusing the sm8x
// prologue. TERSOR_SAGE_FORCE_SM8X=1 in the environment (a private switch for tests and benchmarks) keeps
// such calls on the sm8x mma.sync kernels, so both paths can be compared with the twin on one Hopper GPU.
bool sm90_kernel_applies(const SageCall& c, const at::Tensor& q) {
#ifdef TERSOR_SAGE_SM90
  // Called once sm8x_kernels_apply said yes (the sm90 path reuses the sm8x prologue). The sm90a kernel has
  // no INT4 and no Q-smoothing bias: those calls stay on the sm8x kernels (INT8 + smooth_q) or the host twin
  // (INT4 on cc 9.0).
  if (c.pv != PVMode::kFp8 || c.qk_bits != 8 || c.smooth_q) return false;
  const char* force = std::getenv("TERSOR_SAGE_FORCE_SM8X");
  if (force != nullptr && force[0] == '1') return false;
  return compute_capability(q.get_device()) == 90;
#else
  (void)c;
  (void)q;
  return false;
#endif
}

#ifdef TERSOR_SAGE_SM8X
SageStrides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// sm90: the sm90a kernel after the same prologue (keys padded to its 128-token tiles).
std::tuple<at::Tensor, at::Tensor> run_sm8x(const SageCall& c, at::Tensor q, at::Tensor k, at::Tensor v, bool sm90) {
  // The kernels read the head dim contiguously; other strides are free.
  if (q.stride(3) != 1) q = q.contiguous();
  if (k.stride(3) != 1) k = k.contiguous();
  if (v.stride(3) != 1) v = v.contiguous();
  SageDims dims{c.batch, c.heads_q, c.heads_kv, c.len_q, c.len_k, c.head_dim,
                (c.len_q + SageTraitsSm8x::kCtaQ - 1) / SageTraitsSm8x::kCtaQ * SageTraitsSm8x::kCtaQ,
                (c.len_k + SageTraitsSm8x::kCtaK - 1) / SageTraitsSm8x::kCtaK * SageTraitsSm8x::kCtaK};
  if (sm90) dims.len_k_pad = (c.len_k + 127) / 128 * 128;
  const bool fp8 = c.pv == PVMode::kFp8;
  const auto f32 = q.options().dtype(at::kFloat);
  const auto i8 = q.options().dtype(at::kChar);
  const int64_t D = c.head_dim;
  at::Tensor out = at::empty({c.batch, c.heads_q, c.len_q, D}, q.options());
  at::Tensor lse = at::empty({c.batch, c.heads_q, c.len_q}, f32);
  if (out.numel() == 0) return {out, lse};  // no rows: a zero-sized grid is a launch error
  at::Tensor k_mean = at::empty({c.batch, c.heads_kv, D}, f32);
  const int64_t qk_row_bytes = D * c.qk_bits / 8;  // INT4: two channels per byte
  at::Tensor q_int = at::empty({c.batch, c.heads_q, dims.len_q_pad, qk_row_bytes}, i8);
  at::Tensor q_scale = at::empty({c.batch, c.heads_q, dims.len_q_pad / SageTraitsSm8x::kWarpQ * 8}, f32);
  at::Tensor lse_corr = at::empty({c.batch, c.heads_q, c.len_q}, f32);
  at::Tensor k_int = at::empty({c.batch, c.heads_kv, dims.len_k_pad, qk_row_bytes}, i8);
  at::Tensor k_scale = at::empty({c.batch, c.heads_kv, dims.len_k_pad / SageTraitsSm8x::kCtaK * 4}, f32);
  at::Tensor v_t = at::empty({c.batch, c.heads_kv, D, dims.len_k_pad}, fp8 ? q.options().dtype(at::kByte) : q.options());
  at::Tensor v_scale = at::empty({c.batch, c.heads_kv, fp8 ? D : 1}, f32);
  const int64_t q_blocks = dims.len_q_pad / SageTraitsSm8x::kWarpQ;
  at::Tensor q_mean = at::empty({c.smooth_q ? c.batch * c.heads_q * q_blocks * D : 0}, f32);
  at::Tensor q_bias = at::empty({c.smooth_q ? c.batch * c.heads_q * q_blocks * dims.len_k_pad : 0}, f32);
  const DType dt = q.scalar_type() == at::kBFloat16 ? DType::kBFloat16 : DType::kFloat16;

  SageQuantArgs qa{};
  qa.dims = dims;
  qa.dtype = dt;
  qa.q = q.const_data_ptr();
  qa.k = k.const_data_ptr();
  qa.v = v.const_data_ptr();
  qa.sq = strides_of(q);
  qa.sk = strides_of(k);
  qa.sv = strides_of(v);
  qa.qk_mul = static_cast<float>(c.scale) * kLog2e;
  qa.scale = static_cast<float>(c.scale);
  qa.smooth_k = c.smooth_k;
  qa.pv_fp8 = fp8;
  qa.qk_bits = static_cast<int>(c.qk_bits);
  qa.smooth_q = c.smooth_q;
  qa.q_mean = c.smooth_q ? q_mean.mutable_data_ptr<float>() : nullptr;
  qa.q_bias = c.smooth_q ? q_bias.mutable_data_ptr<float>() : nullptr;
  qa.k_mean = k_mean.mutable_data_ptr<float>();
  qa.q_int = q_int.mutable_data_ptr<int8_t>();
  qa.q_scale = q_scale.mutable_data_ptr<float>();
  qa.lse_corr = lse_corr.mutable_data_ptr<float>();
  qa.k_int = k_int.mutable_data_ptr<int8_t>();
  qa.k_scale = k_scale.mutable_data_ptr<float>();
  qa.v_t = v_t.mutable_data_ptr();
  qa.v_scale = v_scale.mutable_data_ptr<float>();

  SageAttnArgs aa{};
  aa.dims = dims;
  aa.dtype = dt;
  aa.causal = c.causal;
  aa.pv_fp8 = fp8;
  aa.qk_bits = qa.qk_bits;
  aa.smooth_q = c.smooth_q;
  aa.q_bias = qa.q_bias;
  aa.q_int = qa.q_int;
  aa.q_scale = qa.q_scale;
  aa.lse_corr = qa.lse_corr;
  aa.k_int = qa.k_int;
  aa.k_scale = qa.k_scale;
  aa.v_t = qa.v_t;
  aa.v_scale = qa.v_scale;
  aa.out = out.mutable_data_ptr();
  aa.lse = lse.mutable_data_ptr<float>();

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.get_device()).stream();
  C10_CUDA_CHECK(sage_quantize_sm8x(qa, stream));
#ifdef TERSOR_SAGE_SM90
  if (sm90) {
    at::Tensor k_tiles = at::empty(k_int.sizes(), k_int.options());
    at::Tensor v_tiles = at::empty(v_t.sizes(), v_t.options());
    C10_CUDA_CHECK(sage_attention_sm90(aa, k_tiles.mutable_data_ptr<int8_t>(), v_tiles.mutable_data_ptr<uint8_t>(),
                                       stream));
    return {out, lse};
  }
#endif
  C10_CUDA_CHECK(sage_attention_sm8x(aa, stream));
  return {out, lse};
}
#endif

std::tuple<at::Tensor, at::Tensor> sage_attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& v, bool is_causal, double scale,
                                                           int64_t qk_bits, c10::string_view pv, bool smooth_k,
                                                           bool smooth_q) {
  const SageCall c = check_call(q, k, v, is_causal, scale, qk_bits, std::string(pv), smooth_k, smooth_q);
  TORCH_CHECK(q.device() == k.device() && q.device() == v.device(),
              "sage_attention_fwd: q, k, v must be on the same device, got ", q.device(), ", ", k.device(), ", ",
              v.device());
  const c10::cuda::CUDAGuard guard(q.device());
#ifdef TERSOR_SAGE_SM8X
  if (sm8x_kernels_apply(c, q)) return run_sm8x(c, q, k, v, sm90_kernel_applies(c, q));
#endif
  return host_twin(q, k, v, is_causal, scale, qk_bits, pv, smooth_k, smooth_q);
}

}  // namespace

TORCH_LIBRARY_IMPL(tersor, CUDA, m) { m.impl("sage_attention_fwd", &sage_attention_fwd_cuda); }

}  // namespace tersor::attention
