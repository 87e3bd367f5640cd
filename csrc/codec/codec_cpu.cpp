// CPU implementation of the codec ops: the encoder (the only one there is), the metadata/table
// helpers, and the decoder and linear that are the reference for the CUDA kernels.
#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <string>
#include <vector>

#include "codec/codec_format.h"
#include "codec/codec_glue.h"
#include "codec/codec_host.h"
#include "codec/codec_lane.h"
#include "common/host_memory.h"
#include "common/torch_glue.h"

namespace tersor::codec {
namespace {

template <class T>
void wr(uint8_t* p, T v) {
  std::memcpy(p, &v, sizeof(T));
}
template <class T>
T rd(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

// Storage word of an element type, by byte width.
template <int EB> struct Word;
template <> struct Word<1> { using T = uint8_t; };
template <> struct Word<2> { using T = uint16_t; };
template <> struct Word<4> { using T = uint32_t; };

// ---------------------------------------------------------------- encoder
struct EncodePlan {
  uint8_t code_len[256];
  uint32_t rev_code[256];
  uint32_t packed[256];  // rev_code | len << 24: one load per symbol in the packing loop
};

// sym[j] = symbol of element j, for a run of n elements (split_symbol with a constant width: the loop
// vectorizes).
template <int EB>
void split_symbols(const uint8_t* data, uint32_t n, uint8_t* sym) {
  using W = typename Word<EB>::T;
  const W* v = reinterpret_cast<const W*>(data);  // callers pass element-aligned data
  for (uint32_t j = 0; j < n; ++j) sym[j] = static_cast<uint8_t>(split_symbol(v[j], 8 * EB));
}

uint8_t* thread_sym_buffer(size_t n) {
  thread_local std::vector<uint8_t> buf;
  if (buf.size() < n + 16) buf.resize(n + 16);
  return buf.data();
}

template <int EB>
void histogram(const uint8_t* data, uint64_t numel, uint64_t* hist) {
  // Fixed parts (a few per thread, each >= 2^16 elements), one histogram each: no thread index needed
  // (the stable ABI's parallel_for does not say which thread runs a range), and the sum is the same
  // whatever the thread count.
  constexpr int64_t kGrain = 1 << 16;
  const int64_t n = static_cast<int64_t>(numel);
  const int64_t nthreads = std::max<int64_t>(1, torch::stable::get_num_threads());
  const int64_t nparts = std::max<int64_t>(1, std::min<int64_t>(4 * nthreads, (n + kGrain - 1) / kGrain));
  std::vector<std::array<uint64_t, 256>> part(nparts);
  for (auto& h : part) h.fill(0);
  tersor::parallel_for(0, nparts, 1, [&](int64_t pb, int64_t pe) {
    constexpr int64_t kBlock = 1 << 14;
    uint8_t* sym = thread_sym_buffer(kBlock);
    for (int64_t pi = pb; pi < pe; ++pi) {
      auto& h = part[pi];
      const int64_t b = n * pi / nparts, e = n * (pi + 1) / nparts;
      // Four u32 sub-histograms (flushed every 2^20 elements) break the store-to-load dependency when
      // neighbouring values share a symbol, which in weights they mostly do.
      uint32_t h4[4][256];
      for (int64_t b0 = b; b0 < e; b0 += 1 << 20) {
        const int64_t e0 = std::min<int64_t>(e, b0 + (1 << 20));
        std::memset(h4, 0, sizeof(h4));
        for (int64_t i0 = b0; i0 < e0; i0 += kBlock) {
          const uint32_t cnt = static_cast<uint32_t>(std::min<int64_t>(kBlock, e0 - i0));
          split_symbols<EB>(data + i0 * EB, cnt, sym);
          uint32_t j = 0;
          for (; j + 4 <= cnt; j += 4) {
            ++h4[0][sym[j]];
            ++h4[1][sym[j + 1]];
            ++h4[2][sym[j + 2]];
            ++h4[3][sym[j + 3]];
          }
          for (; j < cnt; ++j) ++h4[0][sym[j]];
        }
        for (int s = 0; s < 256; ++s) h[s] += static_cast<uint64_t>(h4[0][s]) + h4[1][s] + h4[2][s] + h4[3][s];
      }
    }
  });
  for (int s = 0; s < 256; ++s) {
    hist[s] = 0;
    for (auto& h : part) hist[s] += h[s];
  }
}

// Encodes chunk c's record (lane table, lane streams, zero padding) into `rec` (resized to fit).
template <int EB>
void encode_record(const uint8_t* data, const ChunkGeom& g, uint64_t c, const EncodePlan& plan,
                   std::vector<uint8_t>& rec) {
  uint64_t start;
  uint32_t len;
  geom_chunk(g, c, &start, &len);
  const uint32_t R = lane_elems(g.chunk_elems);
  uint8_t* sym = thread_sym_buffer(len);
  split_symbols<EB>(data + start * EB, len, sym);
  // Worst case: every code 12 bits, plus the writer's 8-byte stores past the end.
  thread_local std::vector<uint8_t> scratch;
  const size_t bound = kLaneTableBytes + (static_cast<size_t>(len) * kMaxCodeLen) / 8 + kLanes + 8 + kAlign;
  if (scratch.size() < bound) scratch.resize(bound);
  uint8_t* record = scratch.data();
  uint8_t* out = record + kLaneTableBytes;
  for (int l = 0; l < kLanes; ++l) {
    const uint32_t n = lane_count(len, R, l);
    const uint8_t* ls = sym + static_cast<uint64_t>(l) * R;
    uint8_t* o = out;
    uint64_t acc = 0;  // pending bits, LSB first; bits above nacc are zero
    uint32_t nacc = 0;  // < 8 between groups
    uint32_t i = 0;
    // Branch-free writer: four codes (<= 48 bits) on top of < 8 pending bits always fit in 64, so each
    // group of four ends with an unconditional 8-byte store and advances by the whole bytes written.
    // (A data-dependent flush branch mispredicted often enough to double the encoder's time.)
    for (; i + 4 <= n; i += 4) {
      for (int k = 0; k < 4; ++k) {
        const uint32_t e = plan.packed[ls[i + k]];
        acc |= static_cast<uint64_t>(e & 0xffffffu) << nacc;
        nacc += e >> 24;
      }
      wr<uint64_t>(o, acc);
      o += nacc >> 3;
      acc >>= nacc & ~7u;
      nacc &= 7;
    }
    for (; i < n; ++i) {
      const uint32_t e = plan.packed[ls[i]];
      acc |= static_cast<uint64_t>(e & 0xffffffu) << nacc;
      nacc += e >> 24;
    }
    wr<uint64_t>(o, acc);  // <= 8 + 36 bits pending: fits; trailing bytes are zero
    o += (nacc + 7) >> 3;
    wr<uint16_t>(record + 2 * l, static_cast<uint16_t>(o - out));
    out = o;
  }
  const size_t used = out - record, size = align_up(used, kAlign);
  std::memset(out, 0, size - used);  // alignment padding
  rec.assign(record, record + size);
}

// Writes the raw bytes (split_raw, little-endian, EB - 1 per element) of a chunk's elements into the
// raw section.
template <int EB>
void write_raw(const uint8_t* data, uint64_t start, uint32_t len, uint8_t* raw_section) {
  using W = typename Word<EB>::T;
  const W* v = reinterpret_cast<const W*>(data + start * EB);
  uint8_t* raw = raw_section + start * (EB - 1);
  for (uint32_t j = 0; j < len; ++j) {
    const uint32_t r = split_raw(v[j], 8 * EB);
    for (int k = 0; k < EB - 1; ++k) raw[(EB - 1) * j + k] = static_cast<uint8_t>(r >> (8 * k));
  }
}

void write_fixed_header(uint8_t* p, WireDType dt, Mode mode, int ndim, const int64_t* shape, uint32_t chunk_elems,
                        uint64_t numel, uint64_t row_len, uint64_t n_chunks, uint64_t exp_pos, uint64_t exp_bytes,
                        uint64_t raw_pos, uint64_t raw_bytes) {
  std::memset(p, 0, kFixedHeaderBytes);
  wr<uint32_t>(p, kMagic);
  wr<uint16_t>(p + 4, kVersion);
  p[6] = static_cast<uint8_t>(dt);
  p[7] = static_cast<uint8_t>(mode);
  p[8] = static_cast<uint8_t>(ndim);
  p[9] = mode == Mode::kHuffman ? kMaxCodeLen : 0;
  wr<uint32_t>(p + 12, chunk_elems);
  wr<uint64_t>(p + 16, numel);
  wr<uint64_t>(p + 24, row_len);
  wr<uint64_t>(p + 32, n_chunks);
  wr<uint64_t>(p + 40, exp_pos);
  wr<uint64_t>(p + 48, exp_bytes);
  wr<uint64_t>(p + 56, raw_pos);
  wr<uint64_t>(p + 64, raw_bytes);
  for (int d = 0; d < ndim; ++d) wr<uint64_t>(p + kFixedHeaderBytes + 8 * d, static_cast<uint64_t>(shape[d]));
}

template <int EB>
Tensor encode_impl(const Tensor& xc, WireDType dt, int64_t chunk_target) {
  const uint8_t* data = static_cast<const uint8_t*>(xc.const_data_ptr());
  const int ndim = static_cast<int>(xc.dim());
  const std::vector<int64_t> shape = sizes_vec(xc);
  const uint64_t numel = static_cast<uint64_t>(xc.numel());
  const uint64_t row_len =
      ndim >= 2 ? std::max<int64_t>(xc.size(-1), 1) : std::max<uint64_t>(numel, 1);

  EncodePlan plan{};
  uint64_t hist[256];
  histogram<EB>(data, numel, hist);
  huffman_code_lengths(hist, 256, kMaxCodeLen, plan.code_len);
  canonical_reversed_codes(plan.code_len, plan.rev_code);
  for (int s = 0; s < 256; ++s) plan.packed[s] = plan.rev_code[s] | (static_cast<uint32_t>(plan.code_len[s]) << 24);

  const uint32_t E = choose_chunk_elems(numel, row_len, static_cast<uint64_t>(chunk_target));
  const ChunkGeom g{numel, row_len, E};
  const uint64_t n_chunks = geom_num_chunks(g);
  // Stored mode when entropy coding would not make the stream smaller (tiny or incompressible tensors).
  uint64_t payload_bits = 0;
  for (int s = 0; s < 256; ++s) payload_bits += hist[s] * plan.code_len[s];
  const uint64_t est_huff = layout_for(ndim, Mode::kHuffman, n_chunks).exp_pos + payload_bits / 8 +
                            n_chunks * (kLaneTableBytes + 8 + kAlign) + numel * (EB - 1);
  const uint64_t stored = layout_for(ndim, Mode::kStored, 0).exp_pos + numel * EB;
  const Mode mode = (numel == 0 || est_huff >= stored) ? Mode::kStored : Mode::kHuffman;

  if (mode == Mode::kStored) {
    const Layout L = layout_for(ndim, mode, 0);
    Tensor out = empty({static_cast<int64_t>(L.exp_pos + numel * EB)}, ScalarType::Byte, xc.device());
    uint8_t* p = out.mutable_data_ptr<uint8_t>();
    std::memset(p, 0, L.exp_pos);
    write_fixed_header(p, dt, mode, ndim, shape.data(), 0, numel, row_len, 0, L.exp_pos, 0, L.exp_pos,
                       numel * EB);
    if (numel) std::memcpy(p + L.exp_pos, data, numel * EB);  // an empty tensor's data pointer may be null
    wr<uint32_t>(p + L.crc_pos, crc32c(data, numel * EB));
    wr<uint32_t>(p + L.meta_crc_pos, crc32c(p, L.meta_crc_pos));
    return out;
  }

  // Pass 1: every chunk's record, into its own buffer (sizes are only known afterwards).
  std::vector<std::vector<uint8_t>> records(n_chunks);
  tersor::parallel_for(0, static_cast<int64_t>(n_chunks), 4, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) encode_record<EB>(data, g, c, plan, records[c]);
  });
  std::vector<uint64_t> offsets(n_chunks + 1, 0);
  for (uint64_t c = 0; c < n_chunks; ++c) offsets[c + 1] = offsets[c] + records[c].size();
  const Layout L = layout_for(ndim, mode, n_chunks);
  const uint64_t exp_bytes = offsets[n_chunks];
  const uint64_t raw_pos = align_up(L.exp_pos + exp_bytes, kAlign);
  const uint64_t raw_bytes = numel * (EB - 1);
  Tensor out = empty({static_cast<int64_t>(raw_pos + raw_bytes)}, ScalarType::Byte, xc.device());
  uint8_t* p = out.mutable_data_ptr<uint8_t>();
  std::memset(p, 0, L.exp_pos);
  std::memset(p + L.exp_pos + exp_bytes, 0, raw_pos - L.exp_pos - exp_bytes);
  write_fixed_header(p, dt, mode, ndim, shape.data(), E, numel, row_len, n_chunks, L.exp_pos, exp_bytes,
                     raw_pos, raw_bytes);
  std::memcpy(p + L.code_len_pos, plan.code_len, 256);
  std::memcpy(p + L.offsets_pos, offsets.data(), 8 * (n_chunks + 1));
  // Pass 2: records into place, raw bytes, CRCs (chunks write disjoint bytes).
  tersor::parallel_for(0, static_cast<int64_t>(n_chunks), 4, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      uint64_t start;
      uint32_t len;
      geom_chunk(g, c, &start, &len);
      std::vector<uint8_t>& rec = records[c];
      std::memcpy(p + L.exp_pos + offsets[c], rec.data(), rec.size());
      uint32_t crc = crc32c(rec.data(), rec.size());
      std::vector<uint8_t>().swap(rec);
      if (EB > 1) {
        write_raw<EB>(data, start, len, p + raw_pos);
        crc = crc32c_extend(crc, p + raw_pos + start * (EB - 1), static_cast<uint64_t>(len) * (EB - 1));
      }
      wr<uint32_t>(p + L.crc_pos + 4 * c, crc);
    }
  });
  wr<uint32_t>(p + L.meta_crc_pos, crc32c(p, L.meta_crc_pos));
  return out;
}

Tensor codec_encode_cpu(const Tensor& x, int64_t chunk_elems) {
  const WireDType dt = wire_dtype_of(x.scalar_type(), "codec.compress");
  TERSOR_CHECK_VALUE(x.dim() <= kMaxNdim, "codec.compress: at most 8 dims, got ", x.dim());
  TERSOR_CHECK_VALUE(chunk_elems == 0 || (chunk_elems >= 128 && chunk_elems <= kMaxChunkElems / 4),
                     "codec.compress: chunk_elems must be 0 (auto) or in [128, ", kMaxChunkElems / 4, "], got ",
                     chunk_elems);
  TERSOR_CHECK(x.is_cpu(), "codec.compress (CPU kernel): expected a CPU tensor, got ", device_str(x));
  const Tensor xc = as_contiguous(x);  // a copy when x is strided; x itself is never written
  switch (wire_dtype_bytes(dt)) {
    case 1: return encode_impl<1>(xc, dt, chunk_elems);
    case 2: return encode_impl<2>(xc, dt, chunk_elems);
    default: return encode_impl<4>(xc, dt, chunk_elems);
  }
}

// ---------------------------------------------------------------- metadata ops
StreamInfo parse_or_throw(const Tensor& stream, const char* op) {
  TERSOR_CHECK(stream.is_cpu(), op, ": expected a CPU stream, got ", device_str(stream));
  TERSOR_CHECK_TYPE(stream.scalar_type() == ScalarType::Byte, op, ": stream must be uint8, got ",
                    dtype_name(stream.scalar_type()));
  TERSOR_CHECK_VALUE(stream.dim() == 1 && stream.is_contiguous(), op, ": stream must be a contiguous 1-d tensor");
  StreamInfo s;
  std::string err;
  TERSOR_CHECK_VALUE(parse_stream(stream.const_data_ptr<uint8_t>(), stream.numel(), &s, &err), op,
                     ": corrupt codec stream: ", err);
  return s;
}

std::vector<int64_t> codec_header_cpu(const Tensor& stream) {
  return header_list(parse_or_throw(stream, "codec._codec_header"));
}

Tensor codec_decode_table_cpu(const Tensor& stream) {
  const StreamInfo s = parse_or_throw(stream, "codec._codec_decode_table");
  Tensor t = zeros({kLutSize}, ScalarType::Int, stream.device());
  if (s.mode == Mode::kHuffman) {
    TERSOR_CHECK_VALUE(build_decode_lut(s.code_len, reinterpret_cast<uint32_t*>(t.mutable_data_ptr<int32_t>())),
                       "codec: corrupt codec stream: invalid code lengths");
  }
  return t;
}

// ---------------------------------------------------------------- decoder
// One lane's state in the CPU fast path.
struct FastLane {
  uint64_t pos;  // bit position in the record
  uint32_t i, n;
  uint8_t* sym;  // the lane's symbols, in element order

  // One table lookup for a lane at bit `pos` writing at `cur`. Stores four bytes (the entry's three
  // symbols and a junk byte; only `count` are final, the rest are rewritten by the next lookup). Returns 1
  // for a bit pattern no valid stream has.
  static inline uint32_t step(const uint8_t* record, const uint32_t* lut, uint64_t& pos, uint8_t*& cur) {
    uint64_t v;
    std::memcpy(&v, record + (pos >> 3), 8);
    const uint32_t e = lut[(v >> (pos & 7)) & (kLutSize - 1)];
    std::memcpy(cur, &e, 4);
    cur += lut_count(e);
    pos += lut_bits(e);
    return lut_count(e) == 0;
  }
};

// out[j] = merge(sym[j], raw bytes of j) for a run of n elements; written so that it vectorizes.
template <int EB>
void merge_run(const uint8_t* sym, const uint8_t* raw, uint32_t n, typename Word<EB>::T* out) {
  using W = typename Word<EB>::T;
  if constexpr (EB <= 2) {
    for (uint32_t j = 0; j < n; ++j) out[j] = static_cast<W>(merge_value(sym[j], EB == 2 ? raw[j] : 0u, 8 * EB));
  } else {
    // Four elements per step from three 4-byte loads (12 raw bytes), as the GPU decoder does.
    uint32_t j = 0;
    for (; j + 4 <= n; j += 4) {
      uint32_t w[3];
      std::memcpy(w, raw + 3 * j, 12);
      const uint32_t r[4] = {w[0] & 0xffffffu, (w[0] >> 24) | ((w[1] & 0xffffu) << 8),
                             (w[1] >> 16) | ((w[2] & 0xffu) << 16), w[2] >> 8};
      for (int k = 0; k < 4; ++k) out[j + k] = merge_value(sym[j + k], r[k], 32);
    }
    for (; j < n; ++j) {
      uint32_t r = 0;
      std::memcpy(&r, raw + 3 * j, 3);
      out[j] = merge_value(sym[j], r, 32);
    }
  }
}

// Decodes chunk c into out (the whole tensor's bits); returns an empty string or what is wrong.
template <int EB>
const char* decode_chunk(const uint8_t* p, const StreamInfo& s, const uint32_t* lut, uint64_t c, bool verify,
                         uint8_t* out) {
  using W = typename Word<EB>::T;
  const uint64_t o0 = rd<uint64_t>(p + s.offsets_pos + 8 * c), o1 = rd<uint64_t>(p + s.offsets_pos + 8 * c + 8);
  const uint8_t* record = p + s.exp_pos + o0;
  const uint64_t record_bytes = o1 - o0;  // parse_stream checked: >= 16, aligned, inside the section
  uint64_t start;
  uint32_t len;
  const ChunkGeom g = s.geom();
  geom_chunk(g, c, &start, &len);
  const uint8_t* raw = p + s.raw_pos + start * (EB - 1);
  if (verify) {
    uint32_t crc = crc32c(record, record_bytes);
    if (EB > 1) crc = crc32c_extend(crc, raw, static_cast<uint64_t>(len) * (EB - 1));
    if (crc != rd<uint32_t>(p + s.crc_pos + 4 * c)) return "chunk checksum mismatch";
  }
  if (record_bytes < static_cast<uint64_t>(kLaneTableBytes)) return "chunk record too short";
  uint32_t lane_bytes[kLanes];
  uint64_t used = kLaneTableBytes;
  for (int l = 0; l < kLanes; ++l) used += lane_bytes[l] = rd<uint16_t>(record + 2 * l);
  if (align_up(used, kAlign) != record_bytes) return "lane lengths do not match the chunk record";
  const uint32_t R = lane_elems(g.chunk_elems);
  W* o = reinterpret_cast<W*>(out) + start;
  // Two phases, like the GPU decoder: symbols into a per-thread buffer, then one vectorized merge with
  // the raw bytes. Phase 1's fast path runs four lanes at a time (independent dependency chains) with
  // an unaligned 8-byte peek straight from the record, in batches of steps that provably stay inside
  // each lane's elements and the record; decode_lane_symbols, the code the GPU shares, finishes every
  // lane exactly.
  thread_local std::vector<uint8_t> sym_buf;
  if (sym_buf.size() < static_cast<size_t>(len) + 8) sym_buf.resize(static_cast<size_t>(len) + 8);
  uint8_t* sym = sym_buf.data();
  FastLane lanes[kLanes];
  uint64_t begin_bits = 8ull * kLaneTableBytes;
  for (int l = 0; l < kLanes; ++l) {
    lanes[l].pos = begin_bits;
    lanes[l].i = 0;
    lanes[l].n = lane_count(len, R, l);
    lanes[l].sym = sym + static_cast<uint64_t>(l) * R;
    begin_bits += 8ull * lane_bytes[l];
  }
  const uint64_t safe_bits = record_bytes >= 8 ? 8 * (record_bytes - 8) : 0;
  bool bad = false;
  for (int l0 = 0; l0 < kLanes; l0 += 4) {
    FastLane* q = lanes + l0;
    for (;;) {
      // Steps every lane of the group can take: >= 4 elements left before each (the 4-byte store),
      // <= 3 symbols and <= 12 bits each.
      int64_t steps = INT64_MAX;
      for (int k = 0; k < 4; ++k) {
        const int64_t by_elems = (static_cast<int64_t>(q[k].n) - static_cast<int64_t>(q[k].i) - 4) / 3 + 1;
        const int64_t by_bits = (static_cast<int64_t>(safe_bits) - static_cast<int64_t>(q[k].pos)) / kMaxCodeLen + 1;
        steps = std::min(steps, std::min(by_elems, by_bits));
      }
      if (steps <= 4) break;
      // The four lanes' state in locals for the batch: the symbol stores go through uint8_t*, which may
      // alias anything, so state left in the FastLane array would be stored and reloaded on every step
      // (measured: the loop spilled to the stack). Locals whose address never escapes stay in registers.
      // (A write cursor per lane rather than base + count: 4 fewer live registers, no spills.)
      uint64_t pos[4] = {q[0].pos, q[1].pos, q[2].pos, q[3].pos};
      uint8_t* cur[4] = {q[0].sym + q[0].i, q[1].sym + q[1].i, q[2].sym + q[2].i, q[3].sym + q[3].i};
      uint32_t zero = 0;
      for (int64_t t = 0; t < steps; ++t) {
#pragma GCC unroll 4
        for (int k = 0; k < 4; ++k) zero |= FastLane::step(record, lut, pos[k], cur[k]);
      }
      for (int k = 0; k < 4; ++k) {
        q[k].pos = pos[k];
        q[k].i = static_cast<uint32_t>(cur[k] - q[k].sym);
      }
      if (zero) {
        bad = true;
        break;
      }
    }
  }
  if (bad) return "invalid Huffman bit pattern";
  const uint32_t* words = reinterpret_cast<const uint32_t*>(record);
  const uint8_t* code_len = s.code_len;
  begin_bits = 8ull * kLaneTableBytes;
  for (int l = 0; l < kLanes; ++l) {
    FastLane& f = lanes[l];
    LaneBitReader r;
    r.init(words, static_cast<uint32_t>(record_bytes / 4), static_cast<uint32_t>(f.pos / 8));
    r.consume(f.pos % 8);
    const uint64_t done_bits = f.pos - begin_bits - f.pos % 8;
    uint8_t* ls = f.sym + f.i;
    const bool ok = decode_lane_symbols(r, lut, code_len, f.n - f.i, [&](uint32_t i, uint32_t packed, uint32_t cnt) {
      for (uint32_t k = 0; k < cnt; ++k, packed >>= 8) ls[i + k] = static_cast<uint8_t>(packed);
    });
    if (!ok) return "invalid Huffman bit pattern";
    if (!lane_length_matches(done_bits + r.consumed, lane_bytes[l])) return "a lane stream does not decode to its length";
    begin_bits += 8ull * lane_bytes[l];
  }
  merge_run<EB>(sym, raw, len, o);
  return "";
}

Tensor codec_decode_cpu(const Tensor& stream, const Tensor& table, std::vector<int64_t> header, ScalarType dtype,
                        std::vector<int64_t> shape, bool verify) {
  check_decode_call(stream, table, header, dtype, shape, "codec_decode");
  const StreamInfo s = parse_or_throw(stream, "codec_decode");
  TERSOR_CHECK_VALUE(header_list(s) == header, "codec_decode: header does not belong to this stream");
  Tensor out = empty(shape, dtype, stream.device());
  const uint8_t* p = stream.const_data_ptr<uint8_t>();
  uint8_t* o = static_cast<uint8_t*>(out.mutable_data_ptr());
  const int eb = s.elem_bytes();
  advise_huge_pages(o, static_cast<size_t>(s.numel) * eb);  // a fresh buffer: fault it in 2 MiB pages
  if (s.mode == Mode::kStored) {
    if (verify)
      TERSOR_CHECK_VALUE(crc32c(p + s.raw_pos, s.raw_bytes) == rd<uint32_t>(p + s.crc_pos),
                         "codec_decode: corrupt codec stream: data checksum mismatch");
    if (s.numel) std::memcpy(o, p + s.raw_pos, s.numel * eb);  // an empty output's data pointer may be null
    return out;
  }
  // The lane reader loads aligned u32 words; a stream view at an odd address gets an aligned copy.
  Tensor aligned = reinterpret_cast<uintptr_t>(p) % kAlign ? torch::stable::clone(stream) : stream;
  p = aligned.const_data_ptr<uint8_t>();
  uint32_t lut[kLutSize];
  TERSOR_CHECK_VALUE(build_decode_lut(p + s.code_len_pos(), lut),
                     "codec_decode: corrupt codec stream: invalid code lengths");
  StreamInfo sa = s;
  sa.code_len = p + s.code_len_pos();
  std::atomic<const char*> error{nullptr};
  tersor::parallel_for(0, static_cast<int64_t>(s.n_chunks), 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e && !error.load(std::memory_order_relaxed); ++c) {
      const char* msg = eb == 1   ? decode_chunk<1>(p, sa, lut, c, verify, o)
                        : eb == 2 ? decode_chunk<2>(p, sa, lut, c, verify, o)
                                  : decode_chunk<4>(p, sa, lut, c, verify, o);
      if (*msg) {
        const char* expected = nullptr;
        error.compare_exchange_strong(expected, msg);
      }
    }
  });
  // A damaged stream is the caller's data: ValueError, like every other check of the stream's contents.
  if (const char* msg = error.load()) TERSOR_CHECK_VALUE(false, "codec_decode: corrupt codec stream: ", msg);
  return out;
}

Tensor codec_linear_cpu(const Tensor& x, const Tensor& stream, const Tensor& table, std::vector<int64_t> header,
                        ScalarType dtype, std::vector<int64_t> shape, const std::optional<Tensor>& bias) {
  TERSOR_CHECK_VALUE(shape.size() == 2, "codec_linear: the compressed weight must be 2-d [out, in], got shape ",
                     list_str(shape));
  TERSOR_CHECK_TYPE(x.scalar_type() == dtype, "codec_linear: x is ", dtype_name(x.scalar_type()), ", the weight is ",
                    dtype_name(dtype));
  TERSOR_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == shape[1], "codec_linear: x has ", x.dim() ? x.size(-1) : 0,
                     " features, the weight expects ", shape[1]);
  const Tensor w = codec_decode_cpu(stream, table, std::move(header), dtype, std::move(shape), /*verify=*/false);
  return linear(x, w, bias);
}

// The CUDA codec_linear's path ("fused_gemv" or "decode_matmul") for a weight stream with this header
// list and `rows` rows of x (the product of x's leading dims): choose_linear_path, for tests and
// benchmarks. Tensor-free, so the same answer on every device.
std::string codec_route(std::vector<int64_t> header, int64_t rows) {
  const DecodeCall c = check_header(header, "_codec_route");
  TERSOR_CHECK_VALUE(c.info.ndim == 2, "_codec_route: the weight must be 2-d [N, K], got a ", c.info.ndim,
                     "-d stream");
  TERSOR_CHECK_VALUE(rows >= 0, "_codec_route: rows must be >= 0, got ", rows);
  return linear_path_name(linear_path(c, rows));
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(tersor, CPU, m) {
  m.impl("_codec_encode", TORCH_BOX(&codec_encode_cpu));
  m.impl("_codec_header", TORCH_BOX(&codec_header_cpu));
  m.impl("_codec_decode_table", TORCH_BOX(&codec_decode_table_cpu));
  m.impl("codec_decode", TORCH_BOX(&codec_decode_cpu));
  m.impl("codec_linear", TORCH_BOX(&codec_linear_cpu));
}

// Tensor-free: no backend to dispatch on, so it registers for every key.
STABLE_TORCH_LIBRARY_IMPL(tersor, CompositeExplicitAutograd, m) { m.impl("_codec_route", TORCH_BOX(&codec_route)); }

}  // namespace tersor::codec
