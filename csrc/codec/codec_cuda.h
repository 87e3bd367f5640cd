// Launchers of the codec CUDA kernels (decode, fused decode+GEMV). Plain C++ + CUDA runtime types: no
// torch headers, so the glue and the kernels compile independently.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "codec/codec_format.h"
#include "codec/codec_host.h"
#include "codec/codec_view.h"

namespace tersor::codec {

// Decodes a mode-1 (Huffman) stream into `out` (numel elements of the stream's dtype, contiguous,
// 16-byte aligned). A chunk whose record is malformed or whose lanes do not decode to exactly their
// declared lengths is written as zeros and, when err_flag is not null, sets *err_flag = 1 (the caller
// zeroes the flag first). Never reads or writes out of bounds, whatever the stream bytes. Asynchronous.
// Mode-0 streams are a plain copy (the caller's business); passing one returns cudaErrorInvalidValue.
cudaError_t launch_codec_decode(const DeviceStreamView& s, void* out, int* err_flag, cudaStream_t stream);

// y[b, n] = sum_k x[b, k] * W[n, k] (+ bias[n]) for b < batch, with W = the decoded stream [N, K]
// (N = numel / row_len, K = row_len). x [batch, K], y [batch, N] contiguous, of the stream's dtype
// (bf16 or fp16), x 16-byte aligned; bias [N] or null. fp32 accumulation, deterministic (fixed
// summation order). `partials`: gemv_partials_floats() floats of device scratch (null when 0).
// Requires gemv_fused_eligible(s, batch) (else cudaErrorInvalidValue). Corrupt chunks contribute zero
// and set *err_flag = 1 when err_flag is not null. Asynchronous.
cudaError_t launch_codec_gemv(const DeviceStreamView& s, const void* x, int batch, const void* bias, void* y,
                              float* partials, int* err_flag, cudaStream_t stream);

}  // namespace tersor::codec
