// bfloat16 storage type: the top 16 bits of an IEEE binary32.
// Conversion from float rounds to nearest even; NaN stays NaN.
#pragma once

#include <bit>
#include <cstdint>

namespace kvtier {

struct bf16 {
  uint16_t bits = 0;

  static constexpr bf16 from_bits(uint16_t b) { return bf16{b}; }
  static constexpr bf16 from_float(float f) {
    const uint32_t u = std::bit_cast<uint32_t>(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{static_cast<uint16_t>((u >> 16) | 0x40u)};  // quiet NaN
    const uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
    return bf16{static_cast<uint16_t>((u + rounding) >> 16)};
  }
  constexpr float to_float() const { return std::bit_cast<float>(static_cast<uint32_t>(bits) << 16); }
  friend constexpr bool operator==(bf16 a, bf16 b) { return a.bits == b.bits; }
};

static_assert(sizeof(bf16) == 2);

inline constexpr float to_float(bf16 x) { return x.to_float(); }
inline constexpr float to_float(float x) { return x; }

}  // namespace kvtier
