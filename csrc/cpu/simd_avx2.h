// 8-lane fp32 vector for AVX2 + FMA + F16C. Include only from a translation unit compiled
// for those extensions (kernels_avx2.cpp sets the target).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "scalar_convert.h"

#define ATTNKERN_VEC_INLINE inline __attribute__((always_inline))

struct VecAVX2 {
  static constexpr int kWidth = 8;
  // 6 x 2 accumulators + 2 B vectors + 1 broadcast = 15 of the 16 ymm registers
  static constexpr int kRows = 6;
  static constexpr int kCols = 2;
  __m256 v;

  static ATTNKERN_VEC_INLINE __m256i tail_mask(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static ATTNKERN_VEC_INLINE VecAVX2 zero() { return {_mm256_setzero_ps()}; }
  static ATTNKERN_VEC_INLINE VecAVX2 set1(float x) { return {_mm256_set1_ps(x)}; }
  static ATTNKERN_VEC_INLINE VecAVX2 load(const float* p) { return {_mm256_loadu_ps(p)}; }
  // Whole vectors take the plain load and store: the kernels call these for every vector of a
  // row, and a masked store (vmaskmovps) costs far more than a plain one on AMD's cores
  static ATTNKERN_VEC_INLINE VecAVX2 load(const float* p, int n) {
    return n >= kWidth ? load(p) : VecAVX2{_mm256_maskload_ps(p, tail_mask(n))};
  }
  ATTNKERN_VEC_INLINE void store(float* p) const { _mm256_storeu_ps(p, v); }
  ATTNKERN_VEC_INLINE void store(float* p, int n) const {
    if (n >= kWidth)
      store(p);
    else
      _mm256_maskstore_ps(p, tail_mask(n), v);
  }

  friend ATTNKERN_VEC_INLINE VecAVX2 operator+(VecAVX2 a, VecAVX2 b) { return {_mm256_add_ps(a.v, b.v)}; }
  friend ATTNKERN_VEC_INLINE VecAVX2 operator-(VecAVX2 a, VecAVX2 b) { return {_mm256_sub_ps(a.v, b.v)}; }
  friend ATTNKERN_VEC_INLINE VecAVX2 operator*(VecAVX2 a, VecAVX2 b) { return {_mm256_mul_ps(a.v, b.v)}; }
  friend ATTNKERN_VEC_INLINE VecAVX2 operator/(VecAVX2 a, VecAVX2 b) { return {_mm256_div_ps(a.v, b.v)}; }
  static ATTNKERN_VEC_INLINE VecAVX2 fmadd(VecAVX2 a, VecAVX2 b, VecAVX2 c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
  static ATTNKERN_VEC_INLINE VecAVX2 max(VecAVX2 a, VecAVX2 b) { return {_mm256_max_ps(a.v, b.v)}; }
  static ATTNKERN_VEC_INLINE float reduce_add(VecAVX2 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static ATTNKERN_VEC_INLINE float reduce_max(VecAVX2 a) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static ATTNKERN_VEC_INLINE VecAVX2 keep_range(VecAVX2 a, int64_t base, int64_t lo, int64_t hi, float fill) {
    int64_t l = lo - base, h = hi - base;
    l = l < 0 ? 0 : (l > 8 ? 8 : l);
    h = h < 0 ? 0 : (h > 8 ? 8 : h);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256i in = _mm256_and_si256(_mm256_cmpgt_epi32(lane, _mm256_set1_epi32(static_cast<int>(l) - 1)),
                                  _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(h)), lane));
    return {_mm256_blendv_ps(_mm256_set1_ps(fill), a.v, _mm256_castsi256_ps(in))};
  }
  // lanes with a < b (ordered: a NaN lane is not), one bit each; and the blend they pick
  static ATTNKERN_VEC_INLINE unsigned below_bits(VecAVX2 a, VecAVX2 b) {
    return static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(a.v, b.v, _CMP_LT_OQ)));
  }
  static ATTNKERN_VEC_INLINE VecAVX2 blend_below(VecAVX2 a, VecAVX2 b, VecAVX2 if_below, VecAVX2 otherwise) {
    return {_mm256_blendv_ps(otherwise.v, if_below.v, _mm256_cmp_ps(a.v, b.v, _CMP_LT_OQ))};
  }
  static ATTNKERN_VEC_INLINE VecAVX2 replace_neg_inf(VecAVX2 a, float fill) {
    __m256 m = _mm256_cmp_ps(a.v, _mm256_set1_ps(-__builtin_inff()), _CMP_EQ_OQ);
    return {_mm256_blendv_ps(a.v, _mm256_set1_ps(fill), m)};
  }
  // 2^x as in VecAVX512::exp2, with the 2^n factor built in the exponent bits.
  static ATTNKERN_VEC_INLINE VecAVX2 exp2(VecAVX2 a) {
    // operands in this order so a NaN input stays NaN (min/max return the second on NaN)
    __m256 x = _mm256_min_ps(_mm256_set1_ps(127.f), a.v);
    __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-126.f), _CMP_LT_OQ);
    x = _mm256_max_ps(_mm256_set1_ps(-126.f), x);
    __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 f = _mm256_sub_ps(x, n);
    __m256 p = _mm256_set1_ps(1.5403530393381609e-4f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558146428443e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6181291076284772e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5504108664821580e-2f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022650695910071e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314718055994531e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
    // n in [-126, 127]: 2^n has biased exponent n + 127 in [1, 254]
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    __m256 r = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    return {_mm256_andnot_ps(tiny, r)};
  }
  static ATTNKERN_VEC_INLINE VecAVX2 load_bytes(const uint8_t* p, int n = kWidth) {
    uint64_t w = 0;
    __builtin_memcpy(&w, p, n < kWidth ? n : kWidth);
    return {_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(w))))};
  }
  static ATTNKERN_VEC_INLINE VecAVX2 fill_where_zero(VecAVX2 a, VecAVX2 key, float fill) {
    __m256 z = _mm256_cmp_ps(key.v, _mm256_setzero_ps(), _CMP_EQ_OQ);
    return {_mm256_blendv_ps(a.v, _mm256_set1_ps(fill), z)};
  }
  // r[i][j] <-> r[j][i] (an 8 x 8 tile), as VecAVX512::transpose with 128-bit halves
  static ATTNKERN_VEC_INLINE void transpose(VecAVX2* r) {
    __m256 t[8], u[8];
    for (int i = 0; i < 4; ++i) {
      t[2 * i] = _mm256_unpacklo_ps(r[2 * i].v, r[2 * i + 1].v);
      t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i].v, r[2 * i + 1].v);
    }
    for (int g = 0; g < 2; ++g) {
      u[4 * g] = _mm256_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
      u[4 * g + 1] = _mm256_shuffle_ps(t[4 * g], t[4 * g + 2], 0xEE);
      u[4 * g + 2] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
      u[4 * g + 3] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
    }
    for (int c = 0; c < 4; ++c) {
      r[c].v = _mm256_permute2f128_ps(u[c], u[4 + c], 0x20);
      r[4 + c].v = _mm256_permute2f128_ps(u[c], u[4 + c], 0x31);
    }
  }
  // eight 16-bit values, zero-filled past n (AVX2 has no masked 16-bit load)
  static ATTNKERN_VEC_INLINE __m128i load_u16(const uint16_t* p, int n) {
    if (n >= kWidth) return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    alignas(16) uint16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int i = 0; i < n; ++i) tmp[i] = p[i];
    return _mm_load_si128(reinterpret_cast<const __m128i*>(tmp));
  }
  static ATTNKERN_VEC_INLINE VecAVX2 load_bf16(const uint16_t* p, int n = kWidth) {
    __m256i w = _mm256_cvtepu16_epi32(load_u16(p, n));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(w, 16))};
  }
  ATTNKERN_VEC_INLINE void store_bf16(uint16_t* p, int n = kWidth) const {
    alignas(32) float tmp[8];
    _mm256_store_ps(tmp, v);
    for (int i = 0; i < n; ++i) p[i] = attnkern::float_to_bf16(tmp[i]);
  }
  static ATTNKERN_VEC_INLINE VecAVX2 load_fp16(const uint16_t* p, int n = kWidth) {
    return {_mm256_cvtph_ps(load_u16(p, n))};
  }
  ATTNKERN_VEC_INLINE void store_fp16(uint16_t* p, int n = kWidth) const {
    __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    if (n == kWidth) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
    } else {
      alignas(16) uint16_t tmp[8];
      _mm_store_si128(reinterpret_cast<__m128i*>(tmp), h);
      for (int i = 0; i < n; ++i) p[i] = tmp[i];
    }
  }
};
