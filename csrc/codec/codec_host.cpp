// Host-side codec v1 pieces: CRC-32C, package-merge code lengths, canonical codes, the decode table,
// metadata parsing and the encoder's chunk layout choice. See codec_host.h.
#include "codec/codec_host.h"

#include <algorithm>
#include <cstring>
#include <numeric>

#if defined(__x86_64__)
#include <nmmintrin.h>
#endif

namespace tersor::codec {

// ---------------------------------------------------------------- CRC-32C
namespace {

struct Crc32cTables {
  uint32_t t[8][256];
  Crc32cTables() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
      t[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; ++i)
      for (int s = 1; s < 8; ++s) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xff];
  }
};

// Portable slicing-by-8: 8 table lookups per 8 bytes.
uint32_t crc32c_sw(uint32_t crc, const uint8_t* p, size_t n) {
  static const Crc32cTables tab;
  while (n >= 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    v ^= crc;
    crc = tab.t[7][v & 0xff] ^ tab.t[6][(v >> 8) & 0xff] ^ tab.t[5][(v >> 16) & 0xff] ^
          tab.t[4][(v >> 24) & 0xff] ^ tab.t[3][(v >> 32) & 0xff] ^ tab.t[2][(v >> 40) & 0xff] ^
          tab.t[1][(v >> 48) & 0xff] ^ tab.t[0][v >> 56];
    p += 8;
    n -= 8;
  }
  while (n--) crc = (crc >> 8) ^ tab.t[0][(crc ^ *p++) & 0xff];
  return crc;
}

#if defined(__x86_64__)
// The SSE4.2 crc32 instruction computes exactly CRC-32C, 8 bytes per instruction.
__attribute__((target("sse4.2"))) uint32_t crc32c_hw(uint32_t crc, const uint8_t* p, size_t n) {
  uint64_t c0 = crc;
  while (n >= 32) {
    uint64_t a, b, c, d;
    std::memcpy(&a, p, 8);
    std::memcpy(&b, p + 8, 8);
    std::memcpy(&c, p + 16, 8);
    std::memcpy(&d, p + 24, 8);
    c0 = _mm_crc32_u64(c0, a);
    c0 = _mm_crc32_u64(c0, b);
    c0 = _mm_crc32_u64(c0, c);
    c0 = _mm_crc32_u64(c0, d);
    p += 32;
    n -= 32;
  }
  while (n >= 8) {
    uint64_t a;
    std::memcpy(&a, p, 8);
    c0 = _mm_crc32_u64(c0, a);
    p += 8;
    n -= 8;
  }
  uint32_t c32 = static_cast<uint32_t>(c0);
  while (n--) c32 = _mm_crc32_u8(c32, *p++);
  return c32;
}
#endif

}  // namespace

uint32_t crc32c_extend(uint32_t crc, const void* data, size_t n) {
  const uint8_t* p = static_cast<const uint8_t*>(data);
  uint32_t c = ~crc;
#if defined(__x86_64__)
  static const bool hw = __builtin_cpu_supports("sse4.2");
  c = hw ? crc32c_hw(c, p, n) : crc32c_sw(c, p, n);
#else
  c = crc32c_sw(c, p, n);
#endif
  return ~c;
}

// ---------------------------------------------------------------- Huffman code lengths
void huffman_code_lengths(const uint64_t* hist, int nsym, int max_len, uint8_t* len_out) {
  std::vector<int> present;
  for (int s = 0; s < nsym; ++s) {
    len_out[s] = 0;
    if (hist[s] > 0) present.push_back(s);
  }
  const int n = static_cast<int>(present.size());
  if (n == 0) return;
  if (n == 1) {
    len_out[present[0]] = 1;
    return;
  }
  // Package-merge (Larmore & Hirschberg): optimal lengths under a maximum. Items are (weight, counts
  // of each leaf inside); n <= 256 and max_len <= 16, so plain vectors are cheap enough.
  std::stable_sort(present.begin(), present.end(), [&](int a, int b) { return hist[a] < hist[b]; });
  struct Item {
    uint64_t w;
    std::vector<uint16_t> cnt;  // per index into `present`
  };
  std::vector<Item> leaves(n);
  for (int i = 0; i < n; ++i) {
    leaves[i].w = hist[present[i]];
    leaves[i].cnt.assign(n, 0);
    leaves[i].cnt[i] = 1;
  }
  std::vector<Item> cur = leaves;
  for (int level = 1; level < max_len; ++level) {
    std::vector<Item> packages;
    for (size_t i = 0; i + 1 < cur.size(); i += 2) {
      Item p{cur[i].w + cur[i + 1].w, cur[i].cnt};
      for (int k = 0; k < n; ++k) p.cnt[k] += cur[i + 1].cnt[k];
      packages.push_back(std::move(p));
    }
    std::vector<Item> merged;
    merged.reserve(leaves.size() + packages.size());
    size_t a = 0, b = 0;
    while (a < leaves.size() || b < packages.size()) {
      // Leaves first on ties: keeps the result deterministic.
      if (b == packages.size() || (a < leaves.size() && leaves[a].w <= packages[b].w))
        merged.push_back(leaves[a++]);
      else
        merged.push_back(std::move(packages[b++]));
    }
    cur = std::move(merged);
  }
  std::vector<int> lens(n, 0);
  for (int i = 0; i < 2 * n - 2; ++i)
    for (int k = 0; k < n; ++k) lens[k] += cur[i].cnt[k];
  for (int k = 0; k < n; ++k) len_out[present[k]] = static_cast<uint8_t>(lens[k]);
}

// ---------------------------------------------------------------- canonical codes and the LUT
bool canonical_reversed_codes(const uint8_t* len, uint32_t* rev_code) {
  int bl_count[kMaxCodeLen + 2] = {0};
  for (int s = 0; s < 256; ++s) {
    if (len[s] > kMaxCodeLen) return false;
    if (len[s]) ++bl_count[len[s]];
  }
  uint64_t kraft = 0;
  for (int l = 1; l <= kMaxCodeLen; ++l) kraft += static_cast<uint64_t>(bl_count[l]) << (kMaxCodeLen - l);
  if (kraft == 0 || kraft > (1u << kMaxCodeLen)) return false;
  uint32_t next[kMaxCodeLen + 2] = {0};
  uint32_t code = 0;
  for (int l = 1; l <= kMaxCodeLen; ++l) {
    code = (code + bl_count[l - 1]) << 1;
    next[l] = code;
  }
  // Deflate's construction: lengths ascending, then symbol value ascending.
  for (int s = 0; s < 256; ++s) {
    rev_code[s] = 0;
    const int l = len[s];
    if (!l) continue;
    const uint32_t c = next[l]++;
    uint32_t r = 0;
    for (int b = 0; b < l; ++b) r |= ((c >> b) & 1u) << (l - 1 - b);
    rev_code[s] = r;
  }
  return true;
}

bool build_decode_lut(const uint8_t* len, uint32_t* lut) {
  uint32_t rev[256];
  if (!canonical_reversed_codes(len, rev)) return false;
  // Single-symbol table first: (symbol | length << 8), 0 where no code matches.
  std::vector<uint16_t> single(kLutSize, 0);
  for (int s = 0; s < 256; ++s) {
    const int l = len[s];
    if (!l) continue;
    for (uint32_t h = 0; h < (1u << (kMaxCodeLen - l)); ++h)
      single[rev[s] | (h << l)] = static_cast<uint16_t>(s | (l << 8));
  }
  for (uint32_t idx = 0; idx < static_cast<uint32_t>(kLutSize); ++idx) {
    uint32_t syms[3], count = 0, bits = 0;
    while (count < 3) {
      const uint16_t e = single[(idx >> bits) & (kLutSize - 1)];
      const uint32_t l = e >> 8;
      // The next code is fully inside the 12 peeked bits only when it fits in what is left.
      if (l == 0 || bits + l > static_cast<uint32_t>(kMaxCodeLen)) break;
      syms[count++] = e & 0xffu;
      bits += l;
    }
    lut[idx] = count ? lut_pack(syms, count, bits) : 0u;
  }
  return true;
}

// ---------------------------------------------------------------- metadata
namespace {

template <class T>
T rd(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

bool fail(std::string* err, std::string msg) {
  if (err) *err = std::move(msg);
  return false;
}

}  // namespace

Layout layout_for(int ndim, Mode mode, uint64_t n_chunks) {
  Layout L{};
  const uint64_t after_shape = kFixedHeaderBytes + 8ull * ndim;
  if (mode == Mode::kHuffman) {
    L.code_len_pos = after_shape;
    L.offsets_pos = L.code_len_pos + 256;
    L.crc_pos = L.offsets_pos + 8 * (n_chunks + 1);
    L.meta_crc_pos = L.crc_pos + 4 * n_chunks;
  } else {
    L.code_len_pos = L.offsets_pos = 0;
    L.crc_pos = after_shape;  // CRC-32C of the stored data
    L.meta_crc_pos = L.crc_pos + 4;
  }
  L.exp_pos = align_up(L.meta_crc_pos + 4, kAlign);
  return L;
}

const char* layout_error(const StreamInfo& s, uint64_t n) {
  if (s.ndim > kMaxNdim) return "ndim > 8";
  const uint64_t want_row = s.ndim >= 2 ? std::max<uint64_t>(s.shape[s.ndim - 1], 1) : std::max<uint64_t>(s.numel, 1);
  if (s.row_len != want_row) return "row_len does not match the shape";
  if (s.exp_bytes > n || s.raw_bytes > n || s.exp_pos > n || s.raw_pos > n) return "section sizes larger than the stream";
  const int eb = s.elem_bytes();
  const Layout L = layout_for(s.ndim, s.mode, s.mode == Mode::kHuffman ? s.n_chunks : 0);
  if (s.mode == Mode::kStored) {
    if (s.chunk_elems != 0 || s.n_chunks != 0 || s.exp_bytes != 0) return "stored stream with Huffman fields set";
    if (s.exp_pos != L.exp_pos || s.raw_pos != L.exp_pos) return "stored stream: bad section positions";
    if (s.raw_bytes != s.numel * eb) return "stored stream: data size does not match numel";
  } else {
    if (s.chunk_elems == 0 || s.chunk_elems > kMaxChunkElems) return "chunk_elems out of range";
    if (s.chunk_elems >= s.row_len && s.chunk_elems % s.row_len != 0)
      return "chunk_elems must be a multiple of row_len or smaller than it";
    if (s.n_chunks != geom_num_chunks(s.geom())) return "chunk count does not match the geometry";
    if (s.n_chunks > (n >> 4)) return "chunk count larger than the stream can hold";
    if (s.exp_pos != L.exp_pos) return "bad exponent section position";
    if (s.raw_pos != align_up(s.exp_pos + s.exp_bytes, kAlign) || s.raw_pos < s.exp_pos)
      return "bad raw section position";
    if (s.raw_bytes != s.numel * (eb - 1)) return "raw section size does not match numel";
  }
  if (s.raw_pos + s.raw_bytes != n) return "the stream's size does not match its header";
  return nullptr;
}

bool parse_stream(const uint8_t* p, uint64_t n, StreamInfo* out, std::string* err) {
  StreamInfo s;
  if (n < static_cast<uint64_t>(kFixedHeaderBytes)) return fail(err, "stream shorter than the 80-byte header");
  if (rd<uint32_t>(p) != kMagic) return fail(err, "bad magic (not a tersor codec stream)");
  s.version = rd<uint16_t>(p + 4);
  if (s.version != kVersion)
    return fail(err, "unsupported codec stream version " + std::to_string(s.version) + " (this build reads 1)");
  const uint8_t dt = p[6], mode = p[7];
  s.ndim = p[8];
  const uint8_t max_len = p[9];
  if (!wire_dtype_valid(dt)) return fail(err, "unknown dtype code " + std::to_string(dt));
  s.dtype = static_cast<WireDType>(dt);
  if (mode > 1) return fail(err, "unknown mode " + std::to_string(mode));
  s.mode = static_cast<Mode>(mode);
  if (s.ndim > kMaxNdim) return fail(err, "ndim " + std::to_string(s.ndim) + " > 8");  // before reading the shape
  if (rd<uint16_t>(p + 10) != 0 || rd<uint64_t>(p + 72) != 0) return fail(err, "reserved fields are not zero");
  s.chunk_elems = rd<uint32_t>(p + 12);
  s.numel = rd<uint64_t>(p + 16);
  s.row_len = rd<uint64_t>(p + 24);
  s.n_chunks = rd<uint64_t>(p + 32);
  s.exp_pos = rd<uint64_t>(p + 40);
  s.exp_bytes = rd<uint64_t>(p + 48);
  s.raw_pos = rd<uint64_t>(p + 56);
  s.raw_bytes = rd<uint64_t>(p + 64);
  if (n < kFixedHeaderBytes + 8ull * s.ndim) return fail(err, "stream shorter than its shape");
  // Shape, numel (checked for overflow) and row length.
  unsigned __int128 prod = 1;
  for (int d = 0; d < s.ndim; ++d) {
    s.shape[d] = rd<uint64_t>(p + kFixedHeaderBytes + 8 * d);
    prod *= s.shape[d];
    if (prod > (static_cast<unsigned __int128>(1) << 56)) return fail(err, "shape too large");
  }
  if (static_cast<uint64_t>(prod) != s.numel) return fail(err, "numel does not match the shape");
  if (s.mode == Mode::kStored ? max_len != 0 : max_len != kMaxCodeLen)
    return fail(err, "max code length must be 12 (Huffman) or 0 (stored)");
  if (const char* e = layout_error(s, n)) return fail(err, e);
  s.total_bytes = n;
  const Layout L = layout_for(s.ndim, s.mode, s.mode == Mode::kHuffman ? s.n_chunks : 0);
  if (L.meta_crc_pos + 4 > n) return fail(err, "truncated metadata");
  if (rd<uint32_t>(p + L.meta_crc_pos) != crc32c(p, L.meta_crc_pos)) return fail(err, "metadata checksum mismatch");
  s.crc_pos = L.crc_pos;
  if (s.mode == Mode::kHuffman) {
    s.offsets_pos = L.offsets_pos;
    s.code_len = p + L.code_len_pos;
    uint32_t rev[256];
    if (!canonical_reversed_codes(s.code_len, rev)) return fail(err, "invalid Huffman code lengths");
    uint64_t prev = 0;
    if (rd<uint64_t>(p + s.offsets_pos) != 0) return fail(err, "first chunk offset is not 0");
    for (uint64_t c = 1; c <= s.n_chunks; ++c) {
      const uint64_t o = rd<uint64_t>(p + s.offsets_pos + 8 * c);
      if (o % kAlign || o < prev + kAlign || o > s.exp_bytes) return fail(err, "bad chunk offset table");
      prev = o;
    }
    if (prev != s.exp_bytes) return fail(err, "chunk offsets do not cover the exponent section");
  }
  *out = s;
  return true;
}

// ---------------------------------------------------------------- chunk layout choice
uint32_t choose_chunk_elems(uint64_t numel, uint64_t row_len, uint64_t target) {
  uint64_t T = target ? target : kDefaultChunkElems;
  T = std::clamp<uint64_t>(T, 128, kMaxChunkElems / 4);
  const uint64_t L = std::max<uint64_t>(row_len, 1);
  if (L <= 4 * T) {  // chunks of whole rows
    if (L % 128 == 0) {
      const uint64_t l = std::lcm(L, static_cast<uint64_t>(4096));
      if (l <= 4 * T) return static_cast<uint32_t>(l * std::max<uint64_t>(1, T / l));
    }
    return static_cast<uint32_t>(L * std::max<uint64_t>(1, T / L));
  }
  // Rows longer than 4 chunks: split each row into pieces.
  if (L % 128 == 0) return static_cast<uint32_t>(T >= 4096 ? T / 4096 * 4096 : (T + 127) / 128 * 128);
  const uint64_t m = (L + T - 1) / T;
  return static_cast<uint32_t>(((L + m - 1) / m + 127) / 128 * 128);
}

}  // namespace tersor::codec
