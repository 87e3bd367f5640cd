// The tersor operator library: every shipped schema lives here, once, each with a one-line comment.
// Implementations register per dispatch key next to their kernels (csrc/<family>/*_cpu.cpp and
// *_cuda_glue.cpp); fakes for torch.compile live in python/tersor/ops.py. Test-only ops (lane-by-lane
// replays, layout checks, fault injection) are not here: they live in tersor._C_testing
// (csrc/testing_ops.cpp, namespace tersor_testing). See docs/ops.md.
//
// Everything goes through the libtorch stable ABI (common/torch_glue.h): one binary for torch >= 2.11.
#include <Python.h>

#include <string>

#include "common/torch_glue.h"

#ifndef TERSOR_CUDA_ARCHS_STR
#define TERSOR_CUDA_ARCHS_STR ""
#endif

namespace {

// "key=value;..." facts about this build, for tests and bug reports.
std::string build_info() {
  std::string s = "version=" TERSOR_VERSION_STR ";abi=stable-2.11";
#ifdef TERSOR_WITH_CUDA
  s += ";cuda=1;cuda_archs=" TERSOR_CUDA_ARCHS_STR;
#else
  s += ";cuda=0;cuda_archs=";
#endif
  return s;
}

}  // namespace

STABLE_TORCH_LIBRARY(tersor, m) {
  // ---- build ----
  // Facts about this build of tersor._C ("version=..;abi=..;cuda=0|1;cuda_archs=..").
  m.def("_build_info() -> str");

  // ---- hadamard (csrc/hadamard) ----
  // y = scale * H x over the last dim; n = 2^k (k <= 15) or K*2^k with H = H_K (x) H_{2^k};
  // scale defaults to 1/sqrt(n) (orthonormal); transpose applies H^T (the inverse for orthonormal scale).
  m.def("hadamard_transform(Tensor x, float? scale=None, bool transpose=False) -> Tensor");
  // The supported non-power-of-two factors K (ascending).
  m.def("_hadamard_k_sizes() -> int[]");
  // (k, log_n) with n = k * 2^log_n, or an error naming the supported sizes.
  m.def("_hadamard_factor(int n) -> int[]");

  // ---- codec: lossless exponent-plane Huffman coding (csrc/codec; stream format: docs/formats.md) ----
  // A `header` argument is the list _codec_header returns for the same stream (the CUDA ops need the
  // section positions without reading device memory on the host); every impl re-checks it.
  // Compresses x (float32/float16/bfloat16/float8, any shape and strides; never modified) into a codec
  // v1 stream (uint8, 1-d). chunk_elems = 0 picks the default chunk layout.
  m.def("_codec_encode(Tensor x, int chunk_elems=0) -> Tensor");
  // Validates a stream's metadata (CPU tensor) and returns [version, dtype_code, mode, numel, row_len,
  // chunk_elems, n_chunks, code_len_pos, offsets_pos, exp_pos, raw_pos, total_bytes, ndim, *shape].
  m.def("_codec_header(Tensor stream) -> int[]");
  // The 4096-entry multi-symbol Huffman decode table of a stream (int32; zeros for a stored stream).
  m.def("_codec_decode_table(Tensor stream) -> Tensor");
  // Decodes a stream into a new tensor of `dtype` and `shape` (both must match the header). verify=True
  // checks the chunk CRCs (CPU) and that every lane decodes to exactly its declared length (CPU and CUDA;
  // on CUDA this synchronizes), raising on any mismatch.
  m.def("codec_decode(Tensor stream, Tensor table, int[] header, ScalarType dtype, SymInt[] shape, bool verify=True) -> Tensor");
  // y = x @ W^T (+ bias) with W the 2-d compressed weight [N, K] in `stream`; x [..., K] of W's dtype.
  // CPU: decode then aten::linear (bit-identical to F.linear). CUDA: fused decode+GEMV for <= 8 rows of x
  // (fp32 accumulation, bf16/fp16), otherwise decode to a scratch and matmul (see _codec_route).
  m.def("codec_linear(Tensor x, Tensor stream, Tensor table, int[] header, ScalarType dtype, SymInt[] shape, Tensor? bias=None) -> Tensor");
  // The CUDA codec_linear's path for this weight header and `rows` rows of x: "fused_gemv" or
  // "decode_matmul" (codec_view.h, choose_linear_path; the same on every architecture).
  m.def("_codec_route(int[] header, int rows) -> str");

  // ---- codebook: QuIP# E8P12 and AQLM weights (csrc/codebook; layouts: docs/formats.md) ----
  // A `qidxs` argument is QuIP#'s packed E8P12 codes (int64 [m, n/32] 2-bit, [m, 3n/64] 3-bit E8P+E81B,
  // [m, n/16] 4-bit two-stage) of an [m, n] weight, n = in_features; resid_scale (RVQ: W^ = D1 + D2 /
  // resid_scale) defaults to QuIP#'s 3.45 (4-bit) / 2.04 (3-bit).
  // W^ [m, n], the codebook values of qidxs (before QuIP#'s rotations and scales), computed in fp32
  // (D1 + D2 / resid_scale) and rounded once to dtype (default float32). Bit-identical CPU and CUDA.
  m.def("e8p_decode(Tensor qidxs, int in_features, float? resid_scale=None, ScalarType? dtype=None) -> Tensor");
  // z = x @ W^^T (float32 [..., m]) for x [..., n] (float32/float16/bfloat16), fp32 accumulation. CUDA
  // rounds x to fp16 (the tensor-core MMA operand) and uses the fused decode GEMV for <= 8 rows of x.
  m.def("e8p_linear(Tensor x, Tensor qidxs, int in_features, float? resid_scale=None) -> Tensor");
  // AQLM weights as AQLM checkpoints store them: codes int8/int16 [out, in/8, C] (signed; index = code
  // mod 2^nbits), codebooks [C, 2^nbits, 1, 8] (float32/float16/bfloat16), scales [out, 1, 1, 1].
  // W [out, in] = scales * sum_c codebooks[c][index_c], computed in fp32 (c = 0 first) and rounded once to
  // dtype (default: the codebooks' dtype). Bit-identical CPU and CUDA.
  m.def("aqlm_decode(Tensor codes, Tensor codebooks, Tensor scales, ScalarType? dtype=None) -> Tensor");
  // y = x @ W^T (+ bias) in x's dtype (float32/float16/bfloat16), fp32 accumulation: a lookup-table /
  // fused decode GEMV for few rows of x, decode + matmul otherwise.
  m.def("aqlm_linear(Tensor x, Tensor codes, Tensor codebooks, Tensor scales, Tensor? bias=None) -> Tensor");
  // CUDA kernel path of a codebook op on compute capability cc (codebook_route.h); NotImplementedError if none.
  m.def("_codebook_route(str op, int cc, int rows=1, int codebook_entries=0) -> str");

  // ---- 2:4 sparsity (csrc/sparse; format v1 "2:4 semi-structured": docs/formats.md) ----
  // `values` [M/16, K/32, 256] (float16/bfloat16, mma.sp A-fragment order) and `meta` [M/16, K/64, 32]
  // (int32, one metadata register per lane and k-tile pair) hold a 2:4 weight W [M, K].
  // Packs a dense 2:4 weight [M, K] (M % 16 == 0, K % 64 == 0; at most 2 non-zeros in every 4 along K,
  // else ValueError naming the first offending chunk) into (values, meta). Identical bytes on CPU and
  // CUDA (which synchronizes to report a bad weight).
  m.def("sparse24_compress(Tensor weight) -> (Tensor, Tensor)");
  // The dense weight [M, K] (values' dtype, zeros at pruned positions); bit-exact on CPU and CUDA.
  m.def("sparse24_decompress(Tensor values, Tensor meta) -> Tensor");
  // y = x @ W^T (+ bias) for x [..., K] of the weight's dtype; fp32 accumulation, rounded once.
  // CUDA: mma.sp GEMV for <= 16 rows of x, the tiled cp.async mma.sp GEMM beyond (the sm90a wgmma.sp GEMM
  // from 128 rows on compute capability 9.0). path = auto | gemv | gemm | sm90 forces one CUDA kernel
  // (NotImplementedError where it cannot run); the CPU checks it and computes the same product. (Not named
  // `kernel`: inductor's fallback lowering passes the op as FallbackKernel.create's `kernel` argument.)
  m.def("sparse24_linear(Tensor x, Tensor values, Tensor meta, Tensor? bias=None, str path=\"auto\") -> Tensor");
  // The CUDA kernel ("gemv", "gemm" or "sm90") sparse24_linear runs for `rows` rows of x and `path` on a
  // device of compute capability cc (10 * major + minor); has_sm90_cubin defaults to this build's. Raises as
  // sparse24_linear would (ValueError, NotImplementedError naming what that architecture supports).
  m.def("_sparse24_route(int cc, int rows, str path=\"auto\", bool? has_sm90_cubin=None) -> str");
  // ---- block-sparse: BSR weights (csrc/sparse; format: docs/formats.md, BSR v1) ----
  // y = x @ W^T (+ bias) for W [Mb * bs, in_features] stored as bs x bs blocks (bs in {16, 32, 64}):
  // crow_indices/col_indices int32, values [nnz_blocks, bs, bs] of x's dtype, schedule int32 (work items
  // of the CUDA kernel). float32/float16/bfloat16, fp32 accumulation, one rounding; deterministic.
  m.def("bsr_linear(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor values, Tensor schedule, int in_features, Tensor? bias=None) -> Tensor");
  // Validates a BSR weight and its schedule (CPU tensors); returns [version, bs, Mb, split_items, partials].
  m.def("_bsr_check(Tensor crow_indices, Tensor col_indices, Tensor values, Tensor schedule, int in_features) -> int[]");
  // ---- attention: SageAttention2-style quantized attention (csrc/attention; docs/research/sage_attention.md) ----
  // q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D] (Hq % Hkv == 0, D in {64, 128}, float16/bfloat16) -> (out [B, Hq, Lq, D]
  // in q's dtype, lse float32 [B, Hq, Lq], natural log). is_causal is bottom-right aligned (key j visible to
  // query i iff j <= i + Lk - Lq). qk_bits 8/4: per-fragment-group symmetric INT8/INT4 Q K^T; 0: fp32 scores.
  // pv "fp8" (e4m3 P~ with the log2(448) offset, per-channel e4m3 V, two-level accumulation), "fp16" (P and V
  // in the inputs' 16-bit dtype) or "fp32". smooth_k subtracts K's token mean (LSE corrected); smooth_q the
  // per-32-row mean of Q (its q_mean.K^T added back in fp32). qk_bits=0 with pv="fp32" is exact (fp64; also
  // accepts float32). cuda_kernel picks the CUDA kernel: "auto", "sm8x" (mma.sync) or "sm90" (sm90a wgmma); a
  // mode with no CUDA kernel on the device (qk_bits=0 and pv="fp32" never have one) raises NotImplementedError.
  // CPU: the twin of every kernel's numerics (cuda_kernel is checked, then unused). (Not named `kernel`:
  // inductor's FallbackKernel.create takes a `kernel` parameter of its own.) block_mask: optional bool
  // [B, Hq or 1, ceil(Lq / 128), ceil(Lk / 128)]; a false block's keys are invisible to the block's queries and
  // the kernels (and the twin) skip its tiles entirely; composes with is_causal and GQA; a row left with no
  // visible key gives 0 and LSE -inf. window_left/window_right: FlashAttention's sliding window (query i at key
  // position p = i + Lk - Lq sees keys in [p - left, p + right]; a negative side is unbounded), in every
  // kernel and the twin; the CTAs walk only the key tiles their rows' windows reach (sage_format.h).
  // key_padding_mask: optional bool [B, Lk], false = the key is padding (hidden from every query of that batch
  // entry; transformers' attention_mask convention); composes with all of the above. attn_mask: any other mask,
  // CPU twin only (NotImplementedError on CUDA): bool (false hides the key, SDPA's convention) or float (added to
  // the scores) [B or 1, Hq or 1, Lq, Lk].
  m.def("sage_attention_fwd(Tensor q, Tensor k, Tensor v, bool is_causal, float scale, int qk_bits, str pv, bool smooth_k, bool smooth_q, str cuda_kernel=\"auto\", Tensor? block_mask=None, int window_left=-1, int window_right=-1, Tensor? key_padding_mask=None, Tensor? attn_mask=None) -> (Tensor, Tensor)");
  // Varlen (packed) prefill, FlashAttention's layout: q [total_q, Hq, D], k/v [total_k, Hkv, D], cu_seqlens_q/k
  // int32/int64 [n_seq + 1] rising from 0 to total (sequence s: rows cu_seqlens_q[s]..cu_seqlens_q[s+1] of q, and
  // likewise of k/v). One call (one launch on CUDA) for the batch: sage_attention_fwd on the packed tensors as one
  // sequence in which a row sees only its own sequence's keys, is_causal bottom-right and the window inside the
  // sequence (sage_format.h KeyMask); K smoothing and the quantization groups are those of the packed tensors.
  // Returns (out [total_q, Hq, D], lse float32 [Hq, total_q]); a sequence with no keys gives 0 and -inf. The CPU
  // checks the offsets' values; CUDA reads them only in the kernels, which clamp every key range to the tensor.
  m.def("sage_attention_varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, bool is_causal, float scale, int qk_bits, str pv, bool smooth_k, bool smooth_q, str cuda_kernel=\"auto\", int window_left=-1, int window_right=-1) -> (Tensor, Tensor)");
  // The CUDA kernel sage_attention_fwd runs for these modes on compute capability cc (10 * major + minor) in
  // this build: "sm8x-mma" or "sm90a-wgmma"; NotImplementedError (naming what cc supports) where none applies.
  m.def("_sage_route(int cc, int qk_bits, str pv, bool smooth_q, str kernel=\"auto\") -> str");
  // XAttention block selection (docs/research/xattention.md): q [B, Hq, Lq, D], k [B, Hkv, Lk, D] (Hq % Hkv == 0;
  // float16/bfloat16/float32) -> (mask bool [B, Hq, ceil(Lq / block_size), ceil(Lk / block_size)], mass float32
  // of the same shape). Strided antidiagonal scores (query rows reversed within each stride, key rows strided),
  // softmax of score * scale / stride over the reduced keys (bottom-right causal if is_causal), summed per block;
  // per query block the fewest heaviest key blocks whose mass reaches threshold * the row's total, plus the
  // diagonal block (and key block 0 when causal). block_size % stride == 0, 0 < threshold <= 1. qk "none": exact
  // scores; "int8": each reduced row quantized to INT8 (one amax / 127 scale per row), exact int32 dot products
  // (the CUDA tensor-core path).
  m.def("xattention_mask(Tensor q, Tensor k, int block_size, int stride, float threshold, bool is_causal, float scale, str qk=\"none\") -> (Tensor, Tensor)");
  // ---- attention: quantized paged KV cache and decode (csrc/attention/paged_*; docs/formats.md, Paged KV cache v1) ----
  // Writes token t < lengths[b] of k/v [B, L, Hkv, D] (float16/bfloat16/float32) at position start[b] + t of
  // sequence b: page block_table[b, pos / S], slot pos % S (block_table, start, lengths int32). K is stored
  // smoothed by its page's k_mean as INT8 with one scale per token, V as e4m3 bits over its page's per-channel
  // v_scale; a page's statistics are fixed when its slot 0 is written (by the chunk itself when start[b] == 0,
  // else copied from the sequence's previous page). Nothing is written when an index is bad or two sequences
  // write one slot.
  m.def("paged_kv_append_(Tensor(a!) k_codes, Tensor(b!) k_scale, Tensor(c!) v_codes, Tensor(d!) page_meta, Tensor k, Tensor v, Tensor block_table, Tensor start, Tensor lengths) -> ()");
  // Decode attention over that cache: q [B, Lq, Hq, D] (Lq <= 16, float16/bfloat16) are the last Lq tokens of
  // sequences of seqlens[b] tokens (int32; bottom-right causal), GQA packed per KV head; window_left /
  // window_right as FlashAttention (< 0: unbounded). INT8 Q K^T (per-row Q scale, per-token K scale, page
  // mean added back), e4m3 P~ V scaled per page and channel, fp32 two-level accumulation; num_workers > 0
  // splits the keys into chunks of an equal tile quota (split-KV), merged by their LSE; -1: automatic (CUDA: the
  // planner for the device's SM count, decode_cuda_layout.h; CPU: one pass). Returns (out
  // [B, Lq, Hq, D] in q's dtype, lse float32 [B, Hq, Lq]); a query that sees no key gives 0 and LSE -inf.
  m.def("sage_decode_paged(Tensor q, Tensor k_codes, Tensor k_scale, Tensor v_codes, Tensor page_meta, Tensor block_table, Tensor seqlens, float scale, int window_left=-1, int window_right=-1, int num_workers=0) -> (Tensor, Tensor)");
}

// `import tersor._C` loads this library (and so runs the registrations above). It defines no Python
// functions: everything is reached through torch.ops.tersor. Limited API only (abi3).
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "tersor operator library (see torch.ops.tersor)",
                                   -1, nullptr};
  return PyModule_Create(&module_def);
}

STABLE_TORCH_LIBRARY_IMPL(tersor, CompositeExplicitAutograd, m) { m.impl("_build_info", TORCH_BOX(&build_info)); }
