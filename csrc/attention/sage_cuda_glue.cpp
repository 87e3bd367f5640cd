// CUDA registration of sage_attention_fwd. Which kernel runs is sage_route.h's decision, from the device's
// compute capability, the modes, the `kernel` argument and the cubins this build has (compile definitions
// TERSOR_SAGE_<GROUP>_ARCHS, CMakeLists.txt):
//  * "sm8x-mma": the prologue (sage_quant_cuda.cu) then the mma.sync attention kernel of the mode
//    (sage_attn_{s8,s4}_{f16,e4m3}.cu: INT8 / INT4 Q.K^T, 16-bit / FP8 P.V, with or without Q smoothing);
//  * "sm90a-wgmma": the same prologue (keys padded to 128) then the sm90a wgmma kernel (sage_attn_sm90.cu:
//    INT8 + FP8, no Q smoothing) on compute capability 9.0.
// Anything else (qk_bits=0, pv="fp32", INT4 on cc 9.0, FP8 before sm_89, an architecture without a cubin) is a
// NotImplementedError naming what this device supports; there is no CPU fallback.
#include <optional>
#include <string>
#include <tuple>

#include "attention/sage_cuda.h"
#include "attention/sage_cuda_layout.h"
#include "attention/sage_format.h"
#include "attention/sage_glue.h"
#include "attention/sage_route.h"
#include "common/cuda_glue.h"

namespace tersor::attention {
namespace {

#ifdef TERSOR_SAGE_PROLOGUE_ARCHS
SageStrides strides_of(const Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// The mma.sync attention kernel of the call's (qk_bits, pv): only those whose translation unit this build
// compiled exist (the route never picks another; the check is a guard against a routing bug).
cudaError_t launch_sm8x(const SageAttnArgs& a, cudaStream_t stream) {
  if (a.qk_bits == 8 && !a.pv_fp8) {
#ifdef TERSOR_SAGE_S8_F16_ARCHS
    return sage_attention_sm8x_s8_f16(a, stream);
#endif
  } else if (a.qk_bits == 8 && a.pv_fp8) {
#ifdef TERSOR_SAGE_S8_E4M3_ARCHS
    return sage_attention_sm8x_s8_e4m3(a, stream);
#endif
  } else if (a.qk_bits == 4 && !a.pv_fp8) {
#ifdef TERSOR_SAGE_S4_F16_ARCHS
    return sage_attention_sm8x_s4_f16(a, stream);
#endif
  } else if (a.qk_bits == 4 && a.pv_fp8) {
#ifdef TERSOR_SAGE_S4_E4M3_ARCHS
    return sage_attention_sm8x_s4_e4m3(a, stream);
#endif
  }
  TERSOR_CHECK(false, "sage_attention_fwd: internal error: routed to an mma.sync kernel this build lacks (qk_bits=",
               a.qk_bits, ", fp8=", a.pv_fp8, ")");
  return cudaErrorInvalidValue;
}

std::tuple<Tensor, Tensor> run(const SageCall& c, Tensor q, Tensor k, Tensor v, const SageBlockMask& bm,
                               const SageKeyPadding& kp, SagePath path) {
  const bool sm90 = path == SagePath::kSm90aWgmma;
  // The kernels read the head dim contiguously; other strides are free.
  if (q.stride(3) != 1) q = as_contiguous(q);
  if (k.stride(3) != 1) k = as_contiguous(k);
  if (v.stride(3) != 1) v = as_contiguous(v);
  SageDims dims{c.batch, c.heads_q, c.heads_kv, c.len_q, c.len_k, c.head_dim,
                (c.len_q + SageTraitsSm8x::kCtaQ - 1) / SageTraitsSm8x::kCtaQ * SageTraitsSm8x::kCtaQ,
                (c.len_k + SageTraitsSm8x::kCtaK - 1) / SageTraitsSm8x::kCtaK * SageTraitsSm8x::kCtaK};
  if (sm90) dims.len_k_pad = (c.len_k + 127) / 128 * 128;
  const bool fp8 = c.pv == PVMode::kFp8;
  const Device dev = q.device();
  const ScalarType t16 = q.scalar_type();
  const int64_t D = c.head_dim;
  Tensor out = empty({c.batch, c.heads_q, c.len_q, D}, t16, dev);
  Tensor lse = empty({c.batch, c.heads_q, c.len_q}, ScalarType::Float, dev);
  if (out.numel() == 0) return {out, lse};  // no rows: a zero-sized grid is a launch error
  Tensor k_mean = empty({c.batch, c.heads_kv, D}, ScalarType::Float, dev);
  const int64_t qk_row_bytes = D * c.qk_bits / 8;  // INT4: two channels per byte
  Tensor q_int = empty({c.batch, c.heads_q, dims.len_q_pad, qk_row_bytes}, ScalarType::Char, dev);
  Tensor q_scale = empty({c.batch, c.heads_q, dims.len_q_pad / SageTraitsSm8x::kWarpQ * 8}, ScalarType::Float, dev);
  Tensor lse_corr = empty({c.batch, c.heads_q, c.len_q}, ScalarType::Float, dev);
  Tensor k_int = empty({c.batch, c.heads_kv, dims.len_k_pad, qk_row_bytes}, ScalarType::Char, dev);
  Tensor k_scale = empty({c.batch, c.heads_kv, dims.len_k_pad / SageTraitsSm8x::kCtaK * 4}, ScalarType::Float, dev);
  Tensor v_t = empty({c.batch, c.heads_kv, D, dims.len_k_pad}, fp8 ? ScalarType::Byte : t16, dev);
  Tensor v_scale = empty({c.batch, c.heads_kv, fp8 ? D : 1}, ScalarType::Float, dev);
  const int64_t q_blocks = dims.len_q_pad / SageTraitsSm8x::kWarpQ;
  Tensor q_mean = empty({c.smooth_q ? c.batch * c.heads_q * q_blocks * D : 0}, ScalarType::Float, dev);
  Tensor q_bias = empty({c.smooth_q ? c.batch * c.heads_q * q_blocks * dims.len_k_pad : 0}, ScalarType::Float, dev);
  const int64_t chunks = kv_stats_chunks(c.len_k);
  Tensor k_sum_part = empty({c.smooth_k ? c.batch * c.heads_kv * chunks * D : 0}, ScalarType::Double, dev);
  Tensor v_amax_part = empty({fp8 ? c.batch * c.heads_kv * chunks * D : 0}, ScalarType::Float, dev);
  Tensor v_amax = empty({fp8 ? c.batch * c.heads_kv * D : 0}, ScalarType::Float, dev);
  const DType dt = t16 == ScalarType::BFloat16 ? DType::kBFloat16 : DType::kFloat16;

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
  qa.k_sum_part = c.smooth_k ? k_sum_part.mutable_data_ptr<double>() : nullptr;
  qa.v_amax_part = fp8 ? v_amax_part.mutable_data_ptr<float>() : nullptr;
  qa.v_amax = fp8 ? v_amax.mutable_data_ptr<float>() : nullptr;

  SageAttnArgs aa{};
  aa.dims = dims;
  aa.dtype = dt;
  aa.mask = c.mask;
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
  aa.block_mask = bm.data();
  aa.mask_heads = bm.heads;
  aa.mask_q_blocks = bm.q_blocks;
  aa.mask_k_blocks = bm.k_blocks;
  aa.key_padding = kp.data();

  const cudaStream_t stream = current_cuda_stream(q.get_device_index());
  TERSOR_CUDA_CHECK(sage_quantize_sm8x(qa, stream));
  if (sm90) {
#ifdef TERSOR_SAGE_SM90_ARCHS
    Tensor k_tiles = empty(k_int.sizes(), ScalarType::Char, dev);
    Tensor v_tiles = empty(v_t.sizes(), ScalarType::Byte, dev);
    TERSOR_CUDA_CHECK(sage_attention_sm90(aa, k_tiles.mutable_data_ptr<int8_t>(),
                                          reinterpret_cast<uint8_t*>(v_tiles.mutable_data_ptr()), stream));
    return {out, lse};
#else
    TERSOR_CHECK(false, "sage_attention_fwd: internal error: routed to the sm90a kernel this build lacks");
#endif
  }
  TERSOR_CUDA_CHECK(launch_sm8x(aa, stream));
  return {out, lse};
}
#endif  // TERSOR_SAGE_PROLOGUE_ARCHS

// The checks every CUDA call shares after its arguments' own (the same devices, what the kernels take, the
// route), then the prologue and the routed kernel.
std::tuple<Tensor, Tensor> checked_run(const SageCall& c, const Tensor& q, const Tensor& k, const Tensor& v,
                                       const SageBlockMask& bm, const SageKeyPadding& kp, int64_t qk_bits,
                                       const std::string& pv, bool smooth_q, const std::string& kernel,
                                       const char* op) {
  TERSOR_CHECK_VALUE(q.is_cuda() && k.is_cuda() && v.is_cuda() && q.get_device_index() == k.get_device_index() &&
                         q.get_device_index() == v.get_device_index(),
                     op, ": q, k, v must be on the same device, got ", device_str(q), ", ", device_str(k), ", ",
                     device_str(v));
  // Head dim 256 (Gemma) runs on the CPU twin only. Why no kernel: the sm8x kernel's warp owns 32 query rows,
  // so its fp32 O accumulator alone is 32 x 256 / 32 lanes = 256 registers per lane (the limit is 255); it would
  // need 16-row warps, which changes the Q quantization groups the twin and the docs define. The sm90a kernel's
  // 64-row warpgroup needs 128 O registers per thread next to the S tile; FlashAttention-3 fits that with a
  // smaller key tile, a separate traits config not written yet (docs/research/sage_attention.md).
  TERSOR_CHECK_NOT_IMPL(c.head_dim <= 128, op, ": head_dim ", c.head_dim, " has no CUDA kernel yet (the CUDA kernels "
                        "take 64 and 128; 256 runs on the CPU twin)");
  const CudaDeviceGuard guard(q);
  const int cc = compute_capability(q.get_device_index());
  const SageRoute route = route_or_throw(cc, qk_bits, pv, smooth_q, kernel, built_sage_cubins(), op);
  TERSOR_CHECK_VALUE(c.len_q <= kSageCudaMaxLen && c.len_k <= kSageCudaMaxLen, op, ": the CUDA kernels take at most ",
                     kSageCudaMaxLen, " query rows and keys per (batch, head) (32-bit key counters), got Lq ", c.len_q,
                     ", Lk ", c.len_k);
  // grid.y of every kernel is batch * heads (CUDA's limit 65535).
  TERSOR_CHECK_NOT_IMPL(c.batch * c.heads_q <= 65535 && c.batch * c.heads_kv <= 65535, op,
                        ": the CUDA kernels take batch * heads <= 65535, got batch ", c.batch, " x heads ", c.heads_q,
                        " (split the batch)");
#ifdef TERSOR_SAGE_PROLOGUE_ARCHS
  return run(c, q, k, v, bm, kp, route.path);
#else
  (void)route;
  (void)bm;
  (void)kp;
  TERSOR_CHECK(false, op, ": internal error: routed to a kernel in a build without the attention prologue");
  return {};
#endif
}

std::tuple<Tensor, Tensor> sage_attention_fwd_cuda(const Tensor& q, const Tensor& k, const Tensor& v, bool is_causal,
                                                   double scale, int64_t qk_bits, std::string pv, bool smooth_k,
                                                   bool smooth_q, std::string kernel,
                                                   std::optional<Tensor> block_mask, int64_t window_left,
                                                   int64_t window_right, std::optional<Tensor> key_padding_mask,
                                                   std::optional<Tensor> attn_mask) {
  const char* op = "sage_attention_fwd";
  const SageCall c = check_call(q, k, v, is_causal, scale, qk_bits, pv, smooth_k, smooth_q, window_left, window_right);
  const SageBlockMask bm = check_block_mask(block_mask, c, q);
  const SageKeyPadding kp = check_key_padding(key_padding_mask, c, q);
  TERSOR_CHECK_NOT_IMPL(!attn_mask, op, ": a general attn_mask has no CUDA kernel (it runs on the CPU twin); the "
                        "kernels take is_causal, window, key_padding_mask and block_mask");
  return checked_run(c, q, k, v, bm, kp, qk_bits, pv, smooth_q, kernel, op);
}

// Varlen: one launch over all the packed sequences (sage_glue.h VarlenCall). The offsets' values are not read
// here (a device-to-host copy would synchronize): the kernels clamp every key range to the tensor, and
// tersor.attention.sage_attention_varlen checks the values first.
std::tuple<Tensor, Tensor> sage_attention_varlen_fwd_cuda(const Tensor& q, const Tensor& k, const Tensor& v,
                                                          const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
                                                          bool is_causal, double scale, int64_t qk_bits,
                                                          std::string pv, bool smooth_k, bool smooth_q,
                                                          std::string kernel, int64_t window_left,
                                                          int64_t window_right) {
  const VarlenCall vc = check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, is_causal, scale, qk_bits, pv, smooth_k,
                                     smooth_q, window_left, window_right);
  auto [out, lse] = checked_run(vc.call, vc.q4, vc.k4, vc.v4, SageBlockMask{}, SageKeyPadding{}, qk_bits, pv, smooth_q,
                                kernel, "sage_attention_varlen_fwd");
  return varlen_outputs(out, lse);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(tersor, CUDA, m) {
  m.impl("sage_attention_fwd", TORCH_BOX(&sage_attention_fwd_cuda));
  m.impl("sage_attention_varlen_fwd", TORCH_BOX(&sage_attention_varlen_fwd_cuda));
}

}  // namespace tersor::attention
