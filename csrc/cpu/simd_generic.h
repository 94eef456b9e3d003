// 8-lane fp32 "vector" in plain C++: the portable fallback for CPUs without AVX2/AVX-512
// (and non-x86). Loops over lanes; the compiler vectorises what it can.
#pragma once

#include <cmath>
#include <cstdint>

#include "scalar_convert.h"

#define ATTNKERN_VEC_INLINE inline __attribute__((always_inline))

struct VecGeneric {
  static constexpr int kWidth = 8;
  static constexpr int kRows = 4;
  static constexpr int kCols = 2;
  float v[kWidth];

  static ATTNKERN_VEC_INLINE VecGeneric set1(float x) {
    VecGeneric r;
    for (int i = 0; i < kWidth; ++i) r.v[i] = x;
    return r;
  }
  static ATTNKERN_VEC_INLINE VecGeneric zero() { return set1(0.f); }
  static ATTNKERN_VEC_INLINE VecGeneric load(const float* p, int n = kWidth) {
    VecGeneric r;
    for (int i = 0; i < kWidth; ++i) r.v[i] = i < n ? p[i] : 0.f;
    return r;
  }
  ATTNKERN_VEC_INLINE void store(float* p, int n = kWidth) const {
    for (int i = 0; i < n; ++i) p[i] = v[i];
  }
#define ATTNKERN_GENERIC_BINOP(op)                                                \
  friend ATTNKERN_VEC_INLINE VecGeneric operator op(VecGeneric a, VecGeneric b) { \
    VecGeneric r;                                                                 \
    for (int i = 0; i < kWidth; ++i) r.v[i] = a.v[i] op b.v[i];                   \
    return r;                                                                     \
  }
  ATTNKERN_GENERIC_BINOP(+)
  ATTNKERN_GENERIC_BINOP(-)
  ATTNKERN_GENERIC_BINOP(*)
  ATTNKERN_GENERIC_BINOP(/)
#undef ATTNKERN_GENERIC_BINOP
  static ATTNKERN_VEC_INLINE VecGeneric fmadd(VecGeneric a, VecGeneric b, VecGeneric c) {
    VecGeneric r;
    for (int i = 0; i < kWidth; ++i) r.v[i] = a.v[i] * b.v[i] + c.v[i];
    return r;
  }
  static ATTNKERN_VEC_INLINE VecGeneric max(VecGeneric a, VecGeneric b) {
    VecGeneric r;
    for (int i = 0; i < kWidth; ++i) r.v[i] = a.v[i] > b.v[i] ? a.v[i] : b.v[i];
    return r;
  }
  static ATTNKERN_VEC_INLINE float reduce_add(VecGeneric a) {
    float s = 0.f;
    for (int i = 0; i < kWidth; ++i) s += a.v[i];
    return s;
  }
  static ATTNKERN_VEC_INLINE float reduce_max(VecGeneric a) {
    float s = a.v[0];
    for (int i = 1; i < kWidth; ++i) s = a.v[i] > s ? a.v[i] : s;
    return s;
  }
  static ATTNKERN_VEC_INLINE VecGeneric keep_range(VecGeneric a, int64_t base, int64_t lo, int64_t hi, float fill) {
    for (int i = 0; i < kWidth; ++i)
      if (base + i < lo || base + i >= hi) a.v[i] = fill;
    return a;
  }
  // lanes with a < b (a NaN lane is not), one bit each; and the blend they pick
  static ATTNKERN_VEC_INLINE unsigned below_bits(VecGeneric a, VecGeneric b) {
    unsigned bits = 0;
    for (int i = 0; i < kWidth; ++i) bits |= (a.v[i] < b.v[i] ? 1u : 0u) << i;
    return bits;
  }
  static ATTNKERN_VEC_INLINE VecGeneric blend_below(VecGeneric a, VecGeneric b, VecGeneric if_below,
                                                    VecGeneric otherwise) {
    for (int i = 0; i < kWidth; ++i)
      if (a.v[i] < b.v[i]) otherwise.v[i] = if_below.v[i];
    return otherwise;
  }
  static ATTNKERN_VEC_INLINE VecGeneric replace_neg_inf(VecGeneric a, float fill) {
    for (int i = 0; i < kWidth; ++i)
      if (a.v[i] == -INFINITY) a.v[i] = fill;
    return a;
  }
  static ATTNKERN_VEC_INLINE VecGeneric exp2(VecGeneric a) {
    VecGeneric r;
    for (int i = 0; i < kWidth; ++i) r.v[i] = a.v[i] < -126.f ? 0.f : std::exp2(a.v[i]);
    return r;
  }
  static ATTNKERN_VEC_INLINE VecGeneric load_bytes(const uint8_t* p, int n = kWidth) {
    VecGeneric r;
    for (int i = 0; i < kWidth; ++i) r.v[i] = i < n ? static_cast<float>(p[i]) : 0.f;
    return r;
  }
  static ATTNKERN_VEC_INLINE VecGeneric fill_where_zero(VecGeneric a, VecGeneric key, float fill) {
    for (int i = 0; i < kWidth; ++i)
      if (key.v[i] == 0.f) a.v[i] = fill;
    return a;
  }
  static ATTNKERN_VEC_INLINE void transpose(VecGeneric* r) {
    for (int i = 0; i < kWidth; ++i)
      for (int j = i + 1; j < kWidth; ++j) {
        const float x = r[i].v[j];
        r[i].v[j] = r[j].v[i];
        r[j].v[i] = x;
      }
  }
  static ATTNKERN_VEC_INLINE VecGeneric load_bf16(const uint16_t* p, int n = kWidth) {
    VecGeneric r;
    for (int i = 0; i < kWidth; ++i) r.v[i] = i < n ? attnkern::bf16_to_float(p[i]) : 0.f;
    return r;
  }
  ATTNKERN_VEC_INLINE void store_bf16(uint16_t* p, int n = kWidth) const {
    for (int i = 0; i < n; ++i) p[i] = attnkern::float_to_bf16(v[i]);
  }
  static ATTNKERN_VEC_INLINE VecGeneric load_fp16(const uint16_t* p, int n = kWidth) {
    VecGeneric r;
    for (int i = 0; i < kWidth; ++i) r.v[i] = i < n ? attnkern::fp16_to_float(p[i]) : 0.f;
    return r;
  }
  ATTNKERN_VEC_INLINE void store_fp16(uint16_t* p, int n = kWidth) const {
    for (int i = 0; i < n; ++i) p[i] = attnkern::float_to_fp16(v[i]);
  }
};
