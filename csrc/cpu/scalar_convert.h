// Portable scalar fp32 <-> bf16 / fp16 conversions (round to nearest even), used by the
// generic SIMD fallback. Bit-exact with torch's conversions for finite values and inf.
#pragma once

#include <cstdint>
#include <cstring>

namespace attnkern {

inline __attribute__((always_inline)) float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
inline __attribute__((always_inline)) uint32_t float_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

inline __attribute__((always_inline)) float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

inline __attribute__((always_inline)) uint16_t float_to_bf16(float f) {
  uint32_t b = float_to_bits(f);
  if ((b & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((b >> 16) | 0x40);  // quiet NaN
  b += 0x7FFFu + ((b >> 16) & 1u);
  return static_cast<uint16_t>(b >> 16);
}

inline __attribute__((always_inline)) float fp16_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t man = h & 0x3FFu;
  if (exp == 0x1F) return bits_to_float(sign | 0x7F800000u | (man << 13));  // inf / NaN
  if (exp == 0) {
    if (man == 0) return bits_to_float(sign);
    // subnormal: value = man * 2^-24
    float f = static_cast<float>(man) * 5.9604644775390625e-8f;
    return sign ? -f : f;
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
}

inline __attribute__((always_inline)) uint16_t float_to_fp16(float f) {
  uint32_t b = float_to_bits(f);
  uint16_t sign = static_cast<uint16_t>((b >> 16) & 0x8000u);
  uint32_t abs = b & 0x7FFFFFFFu;
  if (abs > 0x7F800000u) return sign | 0x7E00u;             // NaN
  if (abs >= 0x477FF000u) return sign | 0x7C00u;            // rounds to inf (>= 65520)
  if (abs < 0x38800000u) {                                  // result is subnormal or zero
    // value / 2^-24, rounded to nearest even by the float adder
    float scaled = bits_to_float(abs) * 16777216.f;         // exact (power of two)
    float rounded = (scaled + 8388608.f) - 8388608.f;       // round to integer, ties to even
    return sign | static_cast<uint16_t>(rounded);
  }
  uint32_t man = abs & 0x7FFFFFu;
  uint32_t exp = (abs >> 23) - 112u;
  uint32_t h = (exp << 10) | (man >> 13);
  uint32_t rest = man & 0x1FFFu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h += 1;  // carries into exp correctly
  return sign | static_cast<uint16_t>(h);
}

}  // namespace attnkern
