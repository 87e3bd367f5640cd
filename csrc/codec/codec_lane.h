// Decoding one lane stream of a codec v1 chunk. Shared verbatim by the CPU decoder and the CUDA
// decoders, so the CPU tests exercise the exact bit-level logic the GPU runs.
#pragma once

#include <cstdint>

#include "codec/codec_format.h"
#include "common/macros.h"

namespace tersor::codec {

// LSB-first bit reader over one lane stream inside a chunk record. It only ever loads aligned 32-bit
// words of the record, and records are 16-byte aligned and padded, so it never touches memory outside
// the record whatever the (possibly hostile) lane lengths say; bits past the record read as zero. The
// caller checks `consumed` against the lane's declared length afterwards, which is what catches a
// corrupted stream (a wrong symbol changes code lengths, so the bit count no longer adds up).
struct LaneBitReader {
  const uint32_t* words;  // the record, as u32 words
  uint32_t next_word;     // index of the next word to load
  uint32_t end_word;      // record size in words
  int nbuf;               // valid bits in buf (< 64 after a refill)
  uint64_t buf;
  uint64_t consumed;      // stream bits used so far

  // `byte_begin` is the lane stream's first byte, relative to the record start.
  TERSOR_HD void init(const uint32_t* record_words, uint32_t record_words_count, uint32_t byte_begin) {
    words = record_words;
    end_word = record_words_count;
    next_word = byte_begin / 4;
    nbuf = 0;
    buf = 0;
    consumed = 0;
    refill();
    const int skip = static_cast<int>(byte_begin % 4) * 8;
    buf >>= skip;
    nbuf -= skip;
  }
  // Guarantees nbuf >= 32 (so a 12-bit peek is always backed by loaded bits or by the zero tail).
  // One word is all it takes whenever at most 32 bits were consumed since the last refill (always in
  // decode_lane_symbols: a table hit uses <= 15 bits, a cut entry <= 2 * kMaxCodeLen), so the common
  // case is a single predicated load and the loop only serves larger consumes (with a bare while,
  // nvcc compiles the GPU decoder's hot path into a general trip-count loop).
  TERSOR_HD void refill() {
    if (nbuf >= 32) return;
    load_word();
    while (nbuf < 32) load_word();
  }
  TERSOR_HD void load_word() {
    const uint32_t w = next_word < end_word ? words[next_word] : 0u;
    ++next_word;
    buf |= static_cast<uint64_t>(w) << nbuf;
    nbuf += 32;
  }
  TERSOR_HD uint32_t peek() const { return static_cast<uint32_t>(buf) & (kLutSize - 1); }
  TERSOR_HD void consume(uint32_t n) {
    buf >>= n;
    nbuf -= static_cast<int>(n);
    consumed += n;
  }
};

// Decodes `count` symbols of a lane into sink(i, packed, n): n (1..3) symbols, byte k of `packed`
// being symbol i + k. `lut` is the 2^12-entry multi-symbol table and `code_len` the per-symbol code
// lengths (needed only where a lane or segment ends inside a table entry). Returns false on a bit
// pattern that no valid stream contains. Can be called repeatedly on the same reader to decode a lane
// segment by segment (the GPU decoders do).
template <class Lut, class Len, class Sink>
TERSOR_HD inline bool decode_lane_symbols(LaneBitReader& r, const Lut& lut, const Len& code_len, uint32_t count,
                                          Sink&& sink) {
  uint32_t i = 0;
  while (i < count) {
    r.refill();
    const uint32_t e = lut[r.peek()];
    const uint32_t n = lut_count(e);
    if (n == 0) return false;
    if (i + n <= count) {
      sink(i, e & 0xffffffu, n);
      r.consume(lut_bits(e));
      i += n;
    } else {
      // The entry runs past the end: take only the symbols still owed, bit-exactly.
      const uint32_t take = count - i;
      uint32_t bits = 0;
      for (uint32_t k = 0; k < take; ++k) bits += code_len[lut_symbol(e, static_cast<int>(k))];
      sink(i, e & ((1u << (8 * take)) - 1u), take);
      r.consume(bits);
      i += take;
    }
  }
  return true;
}

// A lane is valid when it used exactly the bytes its length says (the last byte may be partly padding).
TERSOR_HD inline bool lane_length_matches(uint64_t consumed_bits, uint32_t lane_bytes) {
  return (consumed_bits + 7) / 8 == lane_bytes;
}

}  // namespace tersor::codec
