// 16-lane fp32 vector for AVX-512F (+BW/VL/DQ). Include only from a translation unit
// compiled for AVX-512 (kernels_avx512.cpp sets the target).
#pragma once

#include <immintrin.h>

#include <cstdint>

#define ATTNKERN_VEC_INLINE inline __attribute__((always_inline))

struct VecAVX512 {
  static constexpr int kWidth = 16;
  // register blocking of the GEMM micro-kernel: kRows x kCols vectors of accumulators
  static constexpr int kRows = 6;
  static constexpr int kCols = 4;
  __m512 v;

  static ATTNKERN_VEC_INLINE __mmask16 tail_mask(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
  static ATTNKERN_VEC_INLINE VecAVX512 zero() { return {_mm512_setzero_ps()}; }
  static ATTNKERN_VEC_INLINE VecAVX512 set1(float x) { return {_mm512_set1_ps(x)}; }
  static ATTNKERN_VEC_INLINE VecAVX512 load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static ATTNKERN_VEC_INLINE VecAVX512 load(const float* p, int n) {
    return {_mm512_maskz_loadu_ps(tail_mask(n), p)};
  }
  ATTNKERN_VEC_INLINE void store(float* p) const { _mm512_storeu_ps(p, v); }
  ATTNKERN_VEC_INLINE void store(float* p, int n) const { _mm512_mask_storeu_ps(p, tail_mask(n), v); }

  friend ATTNKERN_VEC_INLINE VecAVX512 operator+(VecAVX512 a, VecAVX512 b) { return {_mm512_add_ps(a.v, b.v)}; }
  friend ATTNKERN_VEC_INLINE VecAVX512 operator-(VecAVX512 a, VecAVX512 b) { return {_mm512_sub_ps(a.v, b.v)}; }
  friend ATTNKERN_VEC_INLINE VecAVX512 operator*(VecAVX512 a, VecAVX512 b) { return {_mm512_mul_ps(a.v, b.v)}; }
  friend ATTNKERN_VEC_INLINE VecAVX512 operator/(VecAVX512 a, VecAVX512 b) { return {_mm512_div_ps(a.v, b.v)}; }
  static ATTNKERN_VEC_INLINE VecAVX512 fmadd(VecAVX512 a, VecAVX512 b, VecAVX512 c) {
    return {_mm512_fmadd_ps(a.v, b.v, c.v)};
  }
  static ATTNKERN_VEC_INLINE VecAVX512 max(VecAVX512 a, VecAVX512 b) { return {_mm512_max_ps(a.v, b.v)}; }
  static ATTNKERN_VEC_INLINE float reduce_add(VecAVX512 a) { return _mm512_reduce_add_ps(a.v); }
  static ATTNKERN_VEC_INLINE float reduce_max(VecAVX512 a) { return _mm512_reduce_max_ps(a.v); }

  // lanes whose index base + lane lies outside [lo, hi) become `fill`
  static ATTNKERN_VEC_INLINE VecAVX512 keep_range(VecAVX512 a, int64_t base, int64_t lo, int64_t hi, float fill) {
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    // clamp the bounds into the 16 lanes' reach so the 32-bit compares cannot overflow
    int64_t l = lo - base, h = hi - base;
    l = l < 0 ? 0 : (l > 16 ? 16 : l);
    h = h < 0 ? 0 : (h > 16 ? 16 : h);
    __mmask16 in = _mm512_cmpge_epi32_mask(lane, _mm512_set1_epi32(static_cast<int>(l))) &
                   _mm512_cmplt_epi32_mask(lane, _mm512_set1_epi32(static_cast<int>(h)));
    return {_mm512_mask_blend_ps(in, _mm512_set1_ps(fill), a.v)};
  }
  // lanes with a < b (ordered: a NaN lane is not), one bit each; and the blend they pick
  static ATTNKERN_VEC_INLINE unsigned below_bits(VecAVX512 a, VecAVX512 b) {
    return static_cast<unsigned>(_mm512_cmp_ps_mask(a.v, b.v, _CMP_LT_OQ));
  }
  static ATTNKERN_VEC_INLINE VecAVX512 blend_below(VecAVX512 a, VecAVX512 b, VecAVX512 if_below, VecAVX512 otherwise) {
    return {_mm512_mask_blend_ps(_mm512_cmp_ps_mask(a.v, b.v, _CMP_LT_OQ), otherwise.v, if_below.v)};
  }
  // lanes where `a` equals -inf become `fill`
  static ATTNKERN_VEC_INLINE VecAVX512 replace_neg_inf(VecAVX512 a, float fill) {
    __mmask16 m = _mm512_cmp_ps_mask(a.v, _mm512_set1_ps(-__builtin_inff()), _CMP_EQ_OQ);
    return {_mm512_mask_blend_ps(m, a.v, _mm512_set1_ps(fill))};
  }

  // 2^x. x = n + f with n = round(x) and f = x - n in [-1/2, 1/2], both exact (vreduceps
  // gives f in one uop where vrndscaleps takes two); a degree-5 minimax polynomial for 2^f
  // (max relative error 2.1e-7 over [-1/2, 1/2] evaluated in fp32, about 2 ulp: the same as
  // the degree-6 Taylor form it replaced); vscalefps scales by 2^n, saturating to inf above
  // 128 and to 0 far below, so x needs no clamping. Inputs below -126 give 0 (so -inf gives
  // 0, and no denormals reach the GEMMs); the zeroing rides on the scale's mask. A NaN input
  // stays NaN (the compare is ordered, so NaN lanes are kept).
  static ATTNKERN_VEC_INLINE VecAVX512 exp2(VecAVX512 a) {
    // (the maskz form: GCC's unmasked _mm512_reduce_ps passes an uninitialised source, which
    // -Wall reports; an all-ones mask compiles to the same unmasked instruction)
    const __m512 f = _mm512_maskz_reduce_ps(static_cast<__mmask16>(-1), a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 n = _mm512_sub_ps(a.v, f);
    const __mmask16 tiny = _mm512_cmp_ps_mask(a.v, _mm512_set1_ps(-126.f), _CMP_LT_OQ);
    __m512 p = _mm512_set1_ps(1.327647129073739e-3f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.675541892647743e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550713464617729e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022120237350464e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931469440460205e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000001192092896f));
    return {_mm512_maskz_scalef_ps(static_cast<__mmask16>(~tiny), p, n)};
  }

  // 1 / a: rcp14 (relative error below 2^-14) refined by one Newton step, r + r (1 - a r):
  // within about an ulp for normal a, several times cheaper than vdivps
  static ATTNKERN_VEC_INLINE VecAVX512 rcp_nr(VecAVX512 a) {
    const __m512 r = _mm512_rcp14_ps(a.v);
    return {_mm512_fmadd_ps(r, _mm512_fnmadd_ps(a.v, r, _mm512_set1_ps(1.f)), r)};
  }

  // lanes i < n: float(p[i]) of bytes (a bool mask's 0/1), the rest 0
  static ATTNKERN_VEC_INLINE VecAVX512 load_bytes(const uint8_t* p, int n = kWidth) {
    return {_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(tail_mask(n), p)))};
  }
  // lanes where `key` is 0 become `fill`, the others keep `a`
  static ATTNKERN_VEC_INLINE VecAVX512 fill_where_zero(VecAVX512 a, VecAVX512 key, float fill) {
    __mmask16 z = _mm512_cmp_ps_mask(key.v, _mm512_setzero_ps(), _CMP_EQ_OQ);
    return {_mm512_mask_blend_ps(z, a.v, _mm512_set1_ps(fill))};
  }
  // r[i][j] <-> r[j][i] (a 16 x 16 tile): 32 in-lane shuffles, then a 4 x 4 transpose of the
  // 128-bit lanes
  static ATTNKERN_VEC_INLINE void transpose(VecAVX512* r) {
    __m512 t[16], u[16];
    for (int i = 0; i < 8; ++i) {
      t[2 * i] = _mm512_unpacklo_ps(r[2 * i].v, r[2 * i + 1].v);
      t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i].v, r[2 * i + 1].v);
    }
    // u[4g + c], 128-bit lane l: element 4l + c of rows 4g .. 4g + 3
    for (int g = 0; g < 4; ++g) {
      u[4 * g] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
      u[4 * g + 1] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0xEE);
      u[4 * g + 2] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
      u[4 * g + 3] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
    }
    for (int c = 0; c < 4; ++c) {
      const __m512 ab_lo = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x44), cd_lo = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x44);
      const __m512 ab_hi = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xEE), cd_hi = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xEE);
      r[c].v = _mm512_shuffle_f32x4(ab_lo, cd_lo, 0x88);
      r[4 + c].v = _mm512_shuffle_f32x4(ab_lo, cd_lo, 0xDD);
      r[8 + c].v = _mm512_shuffle_f32x4(ab_hi, cd_hi, 0x88);
      r[12 + c].v = _mm512_shuffle_f32x4(ab_hi, cd_hi, 0xDD);
    }
  }

  // bf16 <-> fp32 (round to nearest even; NaN stays NaN)
  static ATTNKERN_VEC_INLINE VecAVX512 load_bf16(const uint16_t* p, int n = kWidth) {
    __m256i h = _mm256_maskz_loadu_epi16(tail_mask(n), p);
    return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))};
  }
  ATTNKERN_VEC_INLINE void store_bf16(uint16_t* p, int n = kWidth) const {
    __m512i bits = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(bits, _mm512_set1_epi32(0x00400000)));
    __m256i h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
    _mm256_mask_storeu_epi16(p, tail_mask(n), h);
  }
  static ATTNKERN_VEC_INLINE VecAVX512 load_fp16(const uint16_t* p, int n = kWidth) {
    return {_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(tail_mask(n), p))};
  }
  ATTNKERN_VEC_INLINE void store_fp16(uint16_t* p, int n = kWidth) const {
    __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_mask_storeu_epi16(p, tail_mask(n), h);
  }
};
