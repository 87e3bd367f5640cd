// _codec_emulate_cuda_decode: replays the CUDA decode kernel's per-lane code on the CPU (phase 1
// decode_segment into the padded scratch rows, phase 2 emit_segment with its SWAR merges and alignment
// paths), one lane after another, so CPU tests check the kernel's data movement bit-exactly without a
// GPU. Built only with the CUDA kernels (it includes the kernels' shared header).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "codec/codec_cuda_common.cuh"
#include "codec/codec_glue.h"

namespace tersor::codec {
namespace {

using namespace cuda_detail;

template <int kEB>
void emulate(const KStream& s, uint8_t* out) {
  static thread_local BlockTables tables;
  std::memcpy(tables.lut, s.lut, sizeof(tables.lut));
  for (int i = 0; i < 256; ++i) {
    const uint8_t l = s.stream[s.code_len_pos + i];
    tables.code_len[i] = l > kMaxCodeLen ? kMaxCodeLen : l;
  }
  std::vector<uint32_t> scratch(kLanes * Traits::kRowWords);
  const uint64_t* offs = reinterpret_cast<const uint64_t*>(s.stream + s.offsets_pos);
  for (uint64_t c = 0; c < s.n_chunks; ++c) {
    uint64_t start;
    uint32_t len;
    geom_chunk(s.geom(), c, &start, &len);
    const uint8_t* rec = s.stream + s.exp_pos + offs[c];
    const uint64_t rec_bytes = offs[c + 1] - offs[c];
    LaneState st[kLanes];
    uint32_t incl = 0;
    for (int l = 0; l < kLanes; ++l) {  // open_chunk, with the warp scan done sequentially
      uint16_t lb;
      std::memcpy(&lb, rec + 2 * l, 2);
      incl += lb;
      st[l].count = lane_count(len, s.lane_run, l);
      st[l].bytes = lb;
      st[l].rd.init(reinterpret_cast<const uint32_t*>(rec), static_cast<uint32_t>(rec_bytes / 4),
                    kLaneTableBytes + incl - lb);
    }
    TORCH_CHECK(align_up(kLaneTableBytes + incl, kAlign) == rec_bytes, "emulated decode: bad record");
    const uint32_t segs = (lane_count(len, s.lane_run, 0) + Traits::kSegment - 1) / Traits::kSegment;
    for (uint32_t seg = 0; seg < segs; ++seg) {
      std::fill(scratch.begin(), scratch.end(), 0xCDCDCDCDu);  // stale bytes must never be emitted
      for (int l = 0; l < kLanes; ++l)
        TORCH_CHECK(decode_segment(st[l], tables, seg, scratch.data() + l * Traits::kRowWords),
                    "emulated decode: invalid bit pattern");
      for (int lane = 0; lane < kLanes; ++lane)
        emit_segment<kEB>(s, out, scratch.data(), start, len, seg * Traits::kSegment, start % 4 == 0, lane);
    }
    for (int l = 0; l < kLanes; ++l)
      TORCH_CHECK(lane_length_matches(st[l].rd.consumed, st[l].bytes), "emulated decode: lane length mismatch");
  }
}

at::Tensor emulate_cuda_decode(const at::Tensor& stream, const at::Tensor& table, c10::IntArrayRef header) {
  TORCH_CHECK(stream.device().is_cpu() && table.device().is_cpu(), "_codec_emulate_cuda_decode runs on the CPU");
  std::vector<int64_t> shape(header.begin() + kHShape0, header.end());
  const c10::ScalarType dtype = scalar_type_of(static_cast<WireDType>(header[kHDtype]));
  const DecodeCall c = check_decode_call(stream, table, header, dtype, shape, "_codec_emulate_cuda_decode");
  StreamInfo parsed;
  std::string err;
  TORCH_CHECK_VALUE(parse_stream(stream.const_data_ptr<uint8_t>(), stream.numel(), &parsed, &err), err);
  TORCH_CHECK_VALUE(c.info.mode == Mode::kHuffman, "_codec_emulate_cuda_decode: a Huffman stream is needed");
  at::Tensor sa = stream.clone(), out = at::empty(shape, stream.options().dtype(dtype));
  DeviceStreamView v{};
  v.stream = sa.const_data_ptr<uint8_t>();
  v.stream_bytes = c.info.total_bytes;
  v.lut = reinterpret_cast<const uint32_t*>(table.const_data_ptr<int32_t>());
  v.dtype = c.info.dtype;
  v.mode = c.info.mode;
  v.numel = c.info.numel;
  v.row_len = c.info.row_len;
  v.n_chunks = c.info.n_chunks;
  v.chunk_elems = c.info.chunk_elems;
  v.code_len_pos = c.code_len_pos;
  v.offsets_pos = c.info.offsets_pos;
  v.exp_pos = c.info.exp_pos;
  v.raw_pos = c.info.raw_pos;
  TORCH_CHECK(view_ok(v), "_codec_emulate_cuda_decode: the kernels' view_ok rejects this stream");
  const KStream s = make_kstream(v);
  uint8_t* o = static_cast<uint8_t*>(out.mutable_data_ptr());
  switch (wire_dtype_bytes(v.dtype)) {
    case 1: emulate<1>(s, o); break;
    case 2: emulate<2>(s, o); break;
    default: emulate<4>(s, o); break;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tersor, CPU, m) { m.impl("_codec_emulate_cuda_decode", &emulate_cuda_decode); }

}  // namespace tersor::codec
