// _codec_emulate_cuda_decode / _linear: replay the CUDA decode and GEMV kernels' per-lane code on the CPU (phase 1
// decode_segment into the padded scratch rows, phase 2 emit_segment with its SWAR merges and alignment
// paths), one lane after another, so CPU tests check the kernel's data movement bit-exactly without a
// GPU. Test-only (tersor._C_testing), built in every TERSOR_TESTING build, CPU-only ones included: it
// compiles the kernels' shared header with the host compiler and no CUDA header (codec_host_shim.h).
#include <algorithm>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "codec/codec_cuda_common.cuh"
#include "codec/codec_glue.h"

namespace tersor::codec {
namespace {

using namespace cuda_detail;

// load_tables, on the host.
const BlockTables& host_tables(const KStream& s) {
  static thread_local BlockTables tables;
  std::memcpy(tables.lut, s.lut, sizeof(tables.lut));
  for (int i = 0; i < 256; ++i) {
    const uint8_t l = s.stream[s.code_len_pos + i];
    tables.code_len[i] = l > kMaxCodeLen ? kMaxCodeLen : l;
  }
  return tables;
}

// open_chunk, with the warp's prefix sum of lane lengths done sequentially (streams reaching the
// emulation are validated, so a bad record is an internal error here).
void open_chunk_host(const KStream& s, const uint64_t* offs, uint64_t c, uint32_t len, LaneState* st) {
  const uint8_t* rec = s.stream + s.exp_pos + offs[c];
  const uint64_t rec_bytes = offs[c + 1] - offs[c];
  uint32_t incl = 0;
  for (int l = 0; l < kLanes; ++l) {
    uint16_t lb;
    std::memcpy(&lb, rec + 2 * l, 2);
    incl += lb;
    st[l].count = lane_count(len, s.lane_run, l);
    st[l].bytes = lb;
    st[l].rd.init(reinterpret_cast<const uint32_t*>(rec), static_cast<uint32_t>(rec_bytes / 4),
                  kLaneTableBytes + incl - lb);
  }
  TERSOR_CHECK(align_up(kLaneTableBytes + incl, kAlign) == rec_bytes, "codec emulation: bad chunk record");
}

template <int kEB>
void emulate(const KStream& s, uint8_t* out) {
  const BlockTables& tables = host_tables(s);
  std::vector<uint32_t> scratch(kLanes * Traits::kRowWords);
  const uint64_t* offs = reinterpret_cast<const uint64_t*>(s.stream + s.offsets_pos);
  for (uint64_t c = 0; c < s.n_chunks; ++c) {
    uint64_t start;
    uint32_t len;
    geom_chunk(s.geom(), c, &start, &len);
    LaneState st[kLanes];
    open_chunk_host(s, offs, c, len, st);
    const uint32_t segs = chunk_segments(len, s.lane_run);
    for (uint32_t seg = 0; seg < segs; ++seg) {
      std::fill(scratch.begin(), scratch.end(), 0xCDCDCDCDu);  // stale bytes must never be emitted
      for (int l = 0; l < kLanes; ++l)
        TERSOR_CHECK(decode_segment(st[l], tables, seg, scratch.data() + l * Traits::kRowWords),
                     "emulated decode: invalid bit pattern");
      for (int lane = 0; lane < kLanes; ++lane)
        emit_segment<kEB>(s, out, scratch.data(), start, len, seg * Traits::kSegment, start % 4 == 0, lane);
    }
    for (int l = 0; l < kLanes; ++l)
      TERSOR_CHECK(lane_length_matches(st[l].rd.consumed, st[l].bytes), "emulated decode: lane length mismatch");
  }
}

template <bool kF16, int kB>
void emulate_gemv(const KStream& s, const uint16_t* x, const uint16_t* bias, uint16_t* y) {
  using E = Half16<kF16>;
  constexpr uint32_t kMaxRows = Traits::kMaxRowsPerChunk, kNoRow = 0xffffffffu;
  const BlockTables& tables = host_tables(s);
  std::vector<uint32_t> scratch(kLanes * Traits::kRowWords);
  const uint64_t* offs = reinterpret_cast<const uint64_t*>(s.stream + s.offsets_pos);
  const uint8_t* raw = s.stream + s.raw_pos;
  const uint64_t K = s.row_len, N = s.numel / K;
  const bool whole = geom_whole_rows(s.geom());
  const uint32_t k32 = whole ? static_cast<uint32_t>(K) : 1u;
  std::vector<float> partials(whole ? 0 : kB * s.n_chunks);
  for (uint64_t c = 0; c < s.n_chunks; ++c) {
    uint64_t start;
    uint32_t len;
    geom_chunk(s.geom(), c, &start, &len);
    const uint64_t first_row = start / K, col0 = start - first_row * K;
    const uint32_t rows = whole ? len / k32 : 1u;
    float acc[kB * kMaxRows] = {0.f};
    LaneState st[kLanes];
    open_chunk_host(s, offs, c, len, st);
    float p[kLanes][kB] = {{0.f}};
    uint32_t cur = kNoRow;
    // The kernel's flush_row: xor-butterfly over the lanes (lane i adds lane i^o to its own value; all
    // lanes end with the same bits), then lane b adds batch row b's total to its accumulator.
    auto flush = [&](uint32_t row) {
      for (int b = 0; b < kB; ++b) {
        float v[kLanes], nv[kLanes];
        for (int i = 0; i < kLanes; ++i) v[i] = p[i][b];
        for (int o = 16; o > 0; o >>= 1) {
          for (int i = 0; i < kLanes; ++i) nv[i] = v[i] + v[i ^ o];
          std::memcpy(v, nv, sizeof(v));
        }
        acc[b * kMaxRows + row] += v[b];
        for (int i = 0; i < kLanes; ++i) p[i][b] = 0.f;
      }
    };
    const uint32_t segs = chunk_segments(len, s.lane_run);
    for (uint32_t seg = 0; seg < segs; ++seg) {
      for (int l = 0; l < kLanes; ++l)
        TERSOR_CHECK(decode_segment(st[l], tables, seg, scratch.data() + l * Traits::kRowWords),
                     "emulated gemv: invalid bit pattern");
      const uint32_t first = seg * Traits::kSegment;
      for (int l = 0; l < kLanes; ++l) {
        const uint32_t n = segment_count(len, s.lane_run, l, first);
        if (n == 0) break;
        const uint32_t local0 = l * s.lane_run + first;
        const uint32_t* row_words = scratch.data() + l * Traits::kRowWords;
        for (uint32_t strip = 0; strip < n; strip += 128u) {
          const uint32_t rl = gemv_strip_row(whole, k32, local0, strip);
          if (rl != cur) {
            if (cur != kNoRow) flush(cur);
            cur = rl;
          }
          for (int lane = 0; lane < kLanes; ++lane)
            gemv_lane_strip<kF16, kB>(raw, x, K, start, col0, local0, strip, n, rl, row_words, lane, p[lane]);
        }
      }
    }
    if (cur != kNoRow) flush(cur);
    for (int l = 0; l < kLanes; ++l)
      TERSOR_CHECK(lane_length_matches(st[l].rd.consumed, st[l].bytes), "emulated gemv: lane length mismatch");
    if (whole) {
      for (uint32_t r = 0; r < rows; ++r)
        for (int b = 0; b < kB; ++b) {
          float v = acc[b * kMaxRows + r];
          if (bias) v += E::one(bias[first_row + r]);
          y[gemv_out_index(b, N, first_row + r)] = E::round(v);
        }
    } else {
      for (int b = 0; b < kB; ++b) partials[gemv_partial_index(b, s.n_chunks, c)] = acc[b * kMaxRows];
    }
  }
  if (!whole) {  // codec_gemv_finalize_kernel
    const uint64_t per_row = geom_chunks_per_row(s.geom());
    for (int b = 0; b < kB; ++b)
      for (uint64_t row = 0; row < N; ++row) {
        float v = 0.f;
        for (uint64_t j = 0; j < per_row; ++j) v += partials[gemv_partial_index(b, s.n_chunks, row * per_row + j)];
        if (bias) v += E::one(bias[row]);
        y[gemv_out_index(b, N, row)] = E::round(v);
      }
  }
}

template <bool kF16>
void emulate_gemv_batch(const KStream& s, int batch, const uint16_t* x, const uint16_t* bias, uint16_t* y) {
  switch (batch) {
    case 1: return emulate_gemv<kF16, 1>(s, x, bias, y);
    case 2: return emulate_gemv<kF16, 2>(s, x, bias, y);
    case 3: return emulate_gemv<kF16, 3>(s, x, bias, y);
    case 4: return emulate_gemv<kF16, 4>(s, x, bias, y);
    case 5: return emulate_gemv<kF16, 5>(s, x, bias, y);
    case 6: return emulate_gemv<kF16, 6>(s, x, bias, y);
    case 7: return emulate_gemv<kF16, 7>(s, x, bias, y);
    default: return emulate_gemv<kF16, 8>(s, x, bias, y);
  }
}

// The argument checks and the stream view both emulations share (the stream is copied so that it is
// 16-byte aligned, as the CUDA glue guarantees for the kernels).
struct EmulatedCall {
  DecodeCall call;
  ScalarType dtype = ScalarType::Undefined;
  std::vector<int64_t> shape;
  Tensor stream;
  DeviceStreamView view;
};

EmulatedCall prepare(const Tensor& stream, const Tensor& table, const std::vector<int64_t>& header, const char* op) {
  TERSOR_CHECK(stream.is_cpu() && table.is_cpu(), op, " runs on the CPU");
  TERSOR_CHECK_VALUE(header.size() > kHShape0 - 1 && header[kHDtype] >= 0 && header[kHDtype] <= 255 &&
                         wire_dtype_valid(static_cast<uint8_t>(header[kHDtype])),
                     op, ": malformed header list");
  EmulatedCall e;
  e.shape.assign(header.begin() + kHShape0, header.end());
  e.dtype = scalar_type_of(static_cast<WireDType>(header[kHDtype]));
  e.call = check_decode_call(stream, table, header, e.dtype, e.shape, op);
  StreamInfo parsed;
  std::string err;
  TERSOR_CHECK_VALUE(parse_stream(stream.const_data_ptr<uint8_t>(), stream.numel(), &parsed, &err), op, ": ", err);
  TERSOR_CHECK_VALUE(e.call.info.mode == Mode::kHuffman, op, ": a Huffman stream is needed");
  e.stream = torch::stable::clone(stream);
  e.view = make_stream_view(e.call.info, e.call.code_len_pos, e.stream.const_data_ptr<uint8_t>(),
                            reinterpret_cast<const uint32_t*>(table.const_data_ptr<int32_t>()));
  TERSOR_CHECK(view_ok(e.view), op, ": the kernels' view_ok rejects this stream");
  return e;
}

Tensor emulate_cuda_linear(const Tensor& x, const Tensor& stream, const Tensor& table, std::vector<int64_t> header,
                           const std::optional<Tensor>& bias) {
  constexpr const char* op = "_codec_emulate_cuda_linear";
  const EmulatedCall e = prepare(stream, table, header, op);
  TERSOR_CHECK(x.is_cpu(), op, " runs on the CPU");
  TERSOR_CHECK_VALUE(x.dim() == 2 && e.shape.size() == 2 && x.size(1) == e.shape[1] && x.scalar_type() == e.dtype,
                     op, ": x must be [B, K] of the weight's dtype");
  TERSOR_CHECK_VALUE(gemv_fused_eligible(e.view, static_cast<int>(x.size(0))), op,
                     ": the fused GEMV would not take this call");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias)
    TERSOR_CHECK_VALUE(bias->is_cpu() && bias->scalar_type() == e.dtype && bias->dim() == 1 &&
                           bias->size(0) == e.shape[0],
                       op, ": bias must be a CPU [N] tensor of the weight's dtype");
  const Tensor xc = torch::stable::clone(as_contiguous(x));
  const Tensor b = has_bias ? as_contiguous(*bias) : Tensor();
  Tensor y = empty({x.size(0), e.shape[0]}, x.scalar_type(), x.device());
  const KStream s = make_kstream(e.view);
  const auto* xp = reinterpret_cast<const uint16_t*>(xc.const_data_ptr());
  const auto* bp = has_bias ? reinterpret_cast<const uint16_t*>(b.const_data_ptr()) : nullptr;
  auto* yp = reinterpret_cast<uint16_t*>(y.mutable_data_ptr());
  if (e.dtype == ScalarType::Half)
    emulate_gemv_batch<true>(s, static_cast<int>(x.size(0)), xp, bp, yp);
  else
    emulate_gemv_batch<false>(s, static_cast<int>(x.size(0)), xp, bp, yp);
  return y;
}

Tensor emulate_cuda_decode(const Tensor& stream, const Tensor& table, std::vector<int64_t> header) {
  const EmulatedCall e = prepare(stream, table, header, "_codec_emulate_cuda_decode");
  Tensor out = empty(e.shape, e.dtype, stream.device());
  const KStream s = make_kstream(e.view);
  uint8_t* o = static_cast<uint8_t*>(out.mutable_data_ptr());
  switch (wire_dtype_bytes(e.view.dtype)) {
    case 1: emulate<1>(s, o); break;
    case 2: emulate<2>(s, o); break;
    default: emulate<4>(s, o); break;
  }
  return out;
}

// The format's and the kernels' 64-bit index functions (codec_format.h) evaluated on the host, so tests can
// check them at sizes past 2^32 without allocating anything. Arguments and results are int64 (sizes below 2^63).
std::vector<int64_t> codec_index(std::string fn, std::vector<int64_t> a) {
  auto need = [&](size_t n) {
    TERSOR_CHECK_VALUE(a.size() == n, "_codec_index: ", fn, " takes ", n, " arguments, got ", a.size());
    for (int64_t v : a) TERSOR_CHECK_VALUE(v >= 0, "_codec_index: arguments must be non-negative");
  };
  auto u = [](int64_t v) { return static_cast<uint64_t>(v); };
  auto geom = [&](size_t i) {
    TERSOR_CHECK_VALUE(a[i + 1] > 0 && a[i + 2] > 0 && a[i + 2] <= kMaxChunkElems,
                       "_codec_index: row_len and chunk_elems must be positive, chunk_elems <= 2^20");
    return ChunkGeom{u(a[i]), u(a[i + 1]), static_cast<uint32_t>(a[i + 2])};
  };
  if (fn == "num_chunks") {  // [numel, row_len, chunk_elems]
    need(3);
    return {static_cast<int64_t>(geom_num_chunks(geom(0)))};
  }
  if (fn == "chunk") {  // [numel, row_len, chunk_elems, c] -> [start, len]
    need(4);
    uint64_t start = 0;
    uint32_t len = 0;
    geom_chunk(geom(0), u(a[3]), &start, &len);
    return {static_cast<int64_t>(start), static_cast<int64_t>(len)};
  }
  if (fn == "lane_elem_index") {  // [start, lane, lane_run, first]
    need(4);
    return {static_cast<int64_t>(lane_elem_index(u(a[0]), static_cast<int>(a[1]), static_cast<uint32_t>(a[2]),
                                                 static_cast<uint32_t>(a[3])))};
  }
  if (fn == "gemv_partial_index") {  // [b, n_chunks, c]
    need(3);
    return {static_cast<int64_t>(gemv_partial_index(static_cast<int>(a[0]), u(a[1]), u(a[2])))};
  }
  if (fn == "gemv_out_index") {  // [b, n_rows, row]
    need(3);
    return {static_cast<int64_t>(gemv_out_index(static_cast<int>(a[0]), u(a[1]), u(a[2])))};
  }
  TERSOR_CHECK_VALUE(false, "_codec_index: unknown function ", fn);
  return {};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(tersor_testing, CompositeExplicitAutograd, m) {
  m.impl("_codec_index", TORCH_BOX(&codec_index));
}

STABLE_TORCH_LIBRARY_IMPL(tersor_testing, CPU, m) {
  m.impl("_codec_emulate_cuda_decode", TORCH_BOX(&emulate_cuda_decode));
  m.impl("_codec_emulate_cuda_linear", TORCH_BOX(&emulate_cuda_linear));
}

}  // namespace tersor::codec
