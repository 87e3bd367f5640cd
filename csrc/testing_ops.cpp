// tersor._C_testing: the test-only ops, in their own extension and op namespace (torch.ops.tersor_testing),
// built when CMake's TERSOR_TESTING is on (development and CI), never in release wheels. Each schema is
// here, once, with a one-line comment; implementations register next to the kernels they replay
// (csrc/<family>/*_emulate.cpp, *_testing.cpp, *_check_cpu.cpp). A CPU tensor in, a CPU tensor out: they
// replay CUDA code on the CPU, so they register for CPU (or, tensor-free, CompositeExplicitAutograd).
#include <Python.h>

#include <mutex>
#include <set>
#include <thread>

#include "common/torch_glue.h"

namespace {

// How many distinct threads torch's parallel_for (through the stable ABI) used for n one-item tasks: a
// CPU kernel that runs on one thread when it should not is a silent 2-16x slowdown, so this is tested.
// fail_at >= 0: task fail_at throws a ValueError check instead, as a kernel's per-chunk check does.
int64_t parallel_probe(int64_t n, int64_t fail_at) {
  std::mutex mu;
  std::set<std::thread::id> seen;
  tersor::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) TERSOR_CHECK_VALUE(i != fail_at, "_parallel_probe: task ", i, " failed");
    // Long enough that one thread cannot drain every task before the others start.
    volatile double sink = 0;
    for (int i = 0; i < 200000; ++i) sink = sink + i;
    std::lock_guard<std::mutex> lock(mu);
    seen.insert(std::this_thread::get_id());
  });
  return static_cast<int64_t>(seen.size());
}

}  // namespace

STABLE_TORCH_LIBRARY(tersor_testing, m) {
  // ---- build ----
  // Number of distinct threads tersor::parallel_for used for n one-item tasks; task fail_at (if >= 0) throws
  // "ValueError: _parallel_probe: task <fail_at> failed" from inside the loop body.
  m.def("_parallel_probe(int n, int fail_at=-1) -> int");

  // ---- hadamard (csrc/hadamard/hadamard_testing.cpp) ----
  // CUDA work plan of the power-of-two kernel (Pow2Plan fields, see hadamard_plan.h).
  m.def("_hadamard_plan(int log_n, int elem_bytes) -> int[]");
  // Padded shared-memory offsets (in floats) of logical indices j, for tests of the layout.
  m.def("_hadamard_smem_index(int[] j) -> int[]");
  // The CUDA kernels' int64 index functions (hadamard_plan.h: pow2_blocks, pow2_row, pow2_elem_offset,
  // kmix_blocks, kmix_offset, cuda_max_rows) evaluated on the host, for tests at sizes past 2^31.
  m.def("_hadamard_index(str fn, int[] args) -> int[]");

  // ---- codec (csrc/codec/codec_cuda_emulate.cpp) ----
  // The CUDA decode kernel's per-lane code replayed on the CPU.
  m.def("_codec_emulate_cuda_decode(Tensor stream, Tensor table, int[] header) -> Tensor");
  // The fused GEMV kernel's arithmetic (same order, same roundings) replayed on the CPU.
  m.def("_codec_emulate_cuda_linear(Tensor x, Tensor stream, Tensor table, int[] header, Tensor? bias=None) -> Tensor");
  // The 64-bit index functions of codec_format.h (num_chunks, chunk, lane_elem_index, gemv_partial_index,
  // gemv_out_index) evaluated on the host, for tests at sizes past 2^32.
  m.def("_codec_index(str fn, int[] args) -> int[]");

  // ---- codebook (csrc/codebook/e8p_cuda_emulate.cpp) ----
  // QuIP#'s 1 KiB packed abs table (int32[256]; nibble j of entry a = 2 A[a][perm j] + 8).
  m.def("_e8p_packed_abs_table() -> Tensor");
  // The CUDA E8P GEMV's fragment arithmetic replayed on the CPU (x: [1..8, n]).
  m.def("_e8p_emulate_cuda_linear(Tensor x, Tensor qidxs, int in_features, float? resid_scale=None) -> Tensor");
  // The codebook kernels' int64 index functions (aqlm_format.h: aqlm_code_offset, aqlm_weight_offset,
  // aqlm_entry_offset; e8p_format.h: e8p_slot_pos, e8p_elem_offset, e8p_word_index, e8p_word_offset,
  // e81b_byte_index) evaluated on the host, for tests at sizes past 2^31.
  m.def("_codebook_index(str fn, int[] args) -> int[]");

  // ---- 2:4 sparsity (csrc/sparse/sparse24_cuda_emulate.cpp) ----
  // The CUDA kernel sparse24_linear picks (GEMV or GEMM), replayed lane by lane on the CPU by the PTX
  // fragment/ldmatrix rules.
  m.def("_sparse24_emulate_cuda_linear(Tensor x, Tensor values, Tensor meta, Tensor? bias=None) -> Tensor");
  // The sm90a wgmma.sp GEMM replayed lane by lane on the CPU (stage images built by the kernel's copy
  // addressing, B read through its descriptor fields); fault = 1/2/3 injects a known mapping error.
  m.def("_sparse24_emulate_sm90_linear(Tensor x, Tensor values, Tensor meta, Tensor? bias=None, int fault=0) -> Tensor");
  // Checks the sm90 x tile's store offsets against the offsets wgmma reads through the B descriptor for
  // every element of a stage: int64 [elements checked, mismatches]; fault = 1 swaps LBO and SBO.
  m.def("_sparse24_sm90_layout_check(int fault=0) -> Tensor");
  // The kernels' int64 offsets (sparse24_format.h: value_offset, tile_offset, meta_pos) and launch limits
  // (sparse24_cuda_traits.h: gemm_max_rows, sm90_max_rows, elementwise_blocks), for tests past 2^31.
  m.def("_sparse24_index(str fn, int[] args) -> int[]");

  // ---- block-sparse (csrc/sparse/bsr_cuda_emulate.cpp) ----
  // The CUDA BSR kernel's lane code (copy map, swizzle, ldmatrix, MMA fragments, schedule) replayed on the
  // CPU for float16/bfloat16.
  m.def("_bsr_emulate_cuda_linear(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor values, Tensor schedule, int in_features, Tensor? bias=None) -> Tensor");
  // The kernel's int64 offsets (bsr_format.h: value_offset, x_offset, y_offset, partial_index) and its token
  // limit (cuda_max_tokens) evaluated on the host, for tests at sizes past 2^31.
  m.def("_bsr_index(str fn, int[] args) -> int[]");

  // ---- attention (csrc/attention/sage_testing.cpp, sage_cuda_emulate.cpp, sage_sm90_check_cpu.cpp) ----
  // float32 -> e4m3 bits (uint8), RNE, satfinite (= cvt.rn.satfinite.e4m3x2.f32).
  m.def("_sage_float_to_e4m3(Tensor x) -> Tensor");
  // e4m3 bits (uint8) -> float32.
  m.def("_sage_e4m3_to_float(Tensor x) -> Tensor");
  // int8 codes of x * inv_scale: round to nearest even, clamped to +-127 (bits 8) / +-7 (bits 4).
  m.def("_sage_quantize_int(Tensor x, float inv_scale, int bits) -> Tensor");
  // Quantization-group ids of query rows 0..len_q-1 then key tokens 0..len_k-1 (sm80/sm89 fragments).
  m.def("_sage_group_maps(int len_q, int len_k) -> int[]");
  // Token stored at each of the first n positions of the FP8 V^T layout (v_fp8_position_token).
  m.def("_sage_v_fp8_positions(int n) -> int[]");
  // The CUDA path's int64 index functions (sage_cuda_layout.h: qk_row_offset, v_t_offset, out_row_offset,
  // q_scale_index, k_scale_index, q_bias_index; sage_sm90_layout.h: sm90_tile_base), for tests past 2^31.
  m.def("_sage_index(str fn, int[] args) -> int[]");
  // tersor::_sage_route for an explicit set of cubins ("prologue=80-real,89-real;s8_f16=...;s8_e4m3=...;
  // s4_f16=...;s4_e4m3=...;sm90=90a-real", sage_route.h) instead of this build's: the whole routing table on
  // the CPU.
  m.def("_sage_route_for(int cc, int qk_bits, str pv, bool smooth_q, str kernel, str cubins) -> str");
  // CPU lane-by-lane replay of the sm80/sm89 CUDA path (prologue + attention kernel, qk_bits 8 / 4, pv
  // "fp8"/"fp16", optional Q smoothing); fault > 0 injects a deliberate layout bug. block_mask as in
  // sage_attention_fwd: the kernel's walk over the live key tiles (masked blocks never loaded); window_left /
  // window_right as in sage_attention_fwd (the CTA walks only the tiles its rows' windows reach). cu_seqlens_q/k
  // (both or neither; batch 1): the packed varlen rows of sage_attention_varlen_fwd (int64, CPU).
  m.def("_sage_emulate_cuda_attention(Tensor q, Tensor k, Tensor v, bool is_causal, float scale, str pv, bool smooth_k, int fault=0, int qk_bits=8, bool smooth_q=False, Tensor? block_mask=None, int window_left=-1, int window_right=-1, Tensor? key_padding_mask=None, Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None) -> (Tensor, Tensor)");
  // CPU check of the sm90a kernel's addressing (tile-native relayout, bulk-copy stages, wgmma descriptors,
  // register fragments, scale groups) against an independent PTX model; returns mismatch counts (all 0 =
  // consistent). fault > 0 injects a deliberate layout bug.
  m.def("_sage_sm90_layout_check(int head_dim, int fault=0) -> int[]");
  // CPU lane-by-lane replay of the sm90a CUDA path (prologue, tile-native relayout, bulk-copy stages, wgmma
  // through descriptors, softmax per 64-key half, epilogue); qk_bits 8, pv "fp8", no Q smoothing; block_mask
  // as in sage_attention_fwd (producer and consumers skip masked 128-key stages); window as in sage_attention_fwd.
  m.def("_sage_emulate_sm90_attention(Tensor q, Tensor k, Tensor v, bool is_causal, float scale, bool smooth_k, Tensor? block_mask=None, int window_left=-1, int window_right=-1, Tensor? key_padding_mask=None, Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None) -> (Tensor, Tensor)");
  // CPU thread-by-thread replay of the XAttention scoring kernel (xattn_cuda.cu) with the kernel's own per-thread
  // code (xattn_kernel.h); the arguments and outputs of tersor::xattention_mask. fault > 0 injects a bug.
  m.def("_xattn_emulate_cuda(Tensor q, Tensor k, int block_size, int stride, float threshold, bool is_causal, float scale, int fault=0, str qk=\"none\") -> (Tensor, Tensor)");

  // ---- decode over the paged KV cache (csrc/attention/decode_cuda_emulate.cpp) ----
  // CPU lane-by-lane replay of the CUDA decode (plan, split-KV and merge kernels; decode_kernel.cuh) with the
  // arguments of tersor::sage_decode_paged; num_workers -1 asks the planner for sm_count SMs; pv "fp8" (the
  // e4m3-MMA variant) or "fp16"; fault > 0 injects a deliberate layout bug.
  m.def("_decode_emulate_cuda(Tensor q, Tensor k_codes, Tensor k_scale, Tensor v_codes, Tensor page_meta, Tensor block_table, Tensor seqlens, float scale, int window_left=-1, int window_right=-1, int num_workers=0, int sm_count=132, str pv=\"fp8\", int fault=0) -> (Tensor, Tensor)");
  // The decode planner's host/device functions (decode_cuda_layout.h: auto_workers, max_splits, quota, chunks)
  // and the split kernel's shared-memory bytes (smem: head_dim, fp8).
  m.def("_decode_plan(str fn, int[] args) -> int[]");
  // CPU replay of the CUDA quantize-on-write kernels (paged_append_cuda.cu: statistics kernel, then the token
  // warps in reverse order), in place on the cache tensors, with paged_kv_append_'s arguments
  // (csrc/attention/paged_append_emulate.cpp); indices are not checked (the CUDA path's are the wrapper's).
  m.def("_paged_append_emulate_cuda(Tensor(a!) k_codes, Tensor(b!) k_scale, Tensor(c!) v_codes, Tensor(d!) page_meta, Tensor k, Tensor v, Tensor block_table, Tensor start, Tensor lengths) -> ()");
}

STABLE_TORCH_LIBRARY_IMPL(tersor_testing, CompositeExplicitAutograd, m) {
  m.impl("_parallel_probe", TORCH_BOX(&parallel_probe));
}

// `import tersor._C_testing` loads this library and so registers torch.ops.tersor_testing.*.
PyMODINIT_FUNC PyInit__C_testing(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_testing",
                                   "tersor test-only ops (see torch.ops.tersor_testing)", -1, nullptr};
  return PyModule_Create(&module_def);
}
