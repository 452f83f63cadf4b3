#include "kvtier/storage/crc32c.h"

#include <array>
#include <cstring>

#if defined(__x86_64__)
#include <nmmintrin.h>
#endif

// Both paths work on the raw CRC register (no pre/post inversion); the public
// functions invert at entry and exit, so crc32c(b, n2, crc32c(a, n1)) equals
// the CRC of a followed by b, as with zlib's crc32().

namespace kvtier::storage {
namespace {

constexpr uint32_t kPoly = 0x82F63B78;  // Castagnoli, bit-reversed

// Slicing-by-8 tables: kTables[k][b] is the register after feeding byte b
// followed by k zero bytes into a zero register.
using Tables = std::array<std::array<uint32_t, 256>, 8>;

constexpr Tables make_tables() {
  Tables t{};
  for (uint32_t b = 0; b < 256; ++b) {
    uint32_t c = b;
    for (int i = 0; i < 8; ++i) c = (c >> 1) ^ ((c & 1) ? kPoly : 0);
    t[0][b] = c;
  }
  for (int k = 1; k < 8; ++k)
    for (uint32_t b = 0; b < 256; ++b) t[k][b] = (t[k - 1][b] >> 8) ^ t[0][t[k - 1][b] & 0xff];
  return t;
}

constexpr Tables kTables = make_tables();

uint32_t raw_portable(const unsigned char* p, size_t n, uint32_t crc) {
  for (; n >= 8; n -= 8, p += 8) {
    uint64_t word;
    std::memcpy(&word, p, 8);  // unaligned-safe; x86 and aarch64 are little-endian
    word ^= crc;
    crc = kTables[7][word & 0xff] ^ kTables[6][(word >> 8) & 0xff] ^ kTables[5][(word >> 16) & 0xff] ^
          kTables[4][(word >> 24) & 0xff] ^ kTables[3][(word >> 32) & 0xff] ^ kTables[2][(word >> 40) & 0xff] ^
          kTables[1][(word >> 48) & 0xff] ^ kTables[0][word >> 56];
  }
  for (; n > 0; --n, ++p) crc = (crc >> 8) ^ kTables[0][(crc ^ *p) & 0xff];
  return crc;
}

#if defined(__x86_64__)

// Three independent streams hide the crc32 instruction's 3-cycle latency.
// Each stream covers kStrideBytes; the streams are joined by "shifting" the
// earlier registers over kStrideBytes of zeros, a linear map on the register
// that ShiftTable applies with four table lookups.
constexpr size_t kStrideBytes = 2048;

struct ShiftTable {
  uint32_t t[4][256];
  // The register after feeding kStrideBytes zero bytes, starting from crc.
  uint32_t apply(uint32_t crc) const {
    return t[0][crc & 0xff] ^ t[1][(crc >> 8) & 0xff] ^ t[2][(crc >> 16) & 0xff] ^ t[3][crc >> 24];
  }
};

ShiftTable make_shift_table() {
  static const unsigned char kZeros[kStrideBytes] = {};
  uint32_t bit_image[32];
  for (int i = 0; i < 32; ++i) bit_image[i] = raw_portable(kZeros, kStrideBytes, uint32_t{1} << i);
  ShiftTable s{};
  for (int k = 0; k < 4; ++k)
    for (uint32_t v = 0; v < 256; ++v) {
      uint32_t image = 0;
      for (int b = 0; b < 8; ++b)
        if (v & (1u << b)) image ^= bit_image[8 * k + b];
      s.t[k][v] = image;
    }
  return s;
}

const ShiftTable& shift_table() {
  static const ShiftTable table = make_shift_table();
  return table;
}

__attribute__((target("sse4.2"))) uint32_t raw_sse42_serial(const unsigned char* p, size_t n, uint32_t crc) {
  uint64_t c = crc;
  for (; n >= 8; n -= 8, p += 8) {
    uint64_t word;
    std::memcpy(&word, p, 8);
    c = _mm_crc32_u64(c, word);
  }
  auto c32 = static_cast<uint32_t>(c);
  for (; n > 0; --n, ++p) c32 = _mm_crc32_u8(c32, *p);
  return c32;
}

__attribute__((target("sse4.2"))) uint32_t raw_sse42(const unsigned char* p, size_t n, uint32_t crc) {
  if (n >= 3 * kStrideBytes) {
    const ShiftTable& shift = shift_table();
    for (; n >= 3 * kStrideBytes; n -= 3 * kStrideBytes, p += 3 * kStrideBytes) {
      uint64_t a = crc, b = 0, c = 0;
      for (size_t i = 0; i < kStrideBytes; i += 8) {
        uint64_t wa, wb, wc;
        std::memcpy(&wa, p + i, 8);
        std::memcpy(&wb, p + kStrideBytes + i, 8);
        std::memcpy(&wc, p + 2 * kStrideBytes + i, 8);
        a = _mm_crc32_u64(a, wa);
        b = _mm_crc32_u64(b, wb);
        c = _mm_crc32_u64(c, wc);
      }
      // CRC is linear: register(a-stream, then b, then c) =
      // shift(shift(a) ^ b) ^ c, where b and c started from zero.
      crc = shift.apply(shift.apply(static_cast<uint32_t>(a)) ^ static_cast<uint32_t>(b)) ^
            static_cast<uint32_t>(c);
    }
  }
  return raw_sse42_serial(p, n, crc);
}

using RawFn = uint32_t (*)(const unsigned char*, size_t, uint32_t);

RawFn pick_raw() { return __builtin_cpu_supports("sse4.2") ? raw_sse42 : raw_portable; }

#else

using RawFn = uint32_t (*)(const unsigned char*, size_t, uint32_t);
RawFn pick_raw() { return raw_portable; }

#endif

}  // namespace

uint32_t crc32c(const void* data, size_t bytes, uint32_t crc) {
  static const RawFn raw = pick_raw();
  return ~raw(static_cast<const unsigned char*>(data), bytes, ~crc);
}

uint32_t crc32c_portable(const void* data, size_t bytes, uint32_t crc) {
  return ~raw_portable(static_cast<const unsigned char*>(data), bytes, ~crc);
}

}  // namespace kvtier::storage
