// bf16 GEMM on AVX512_BF16 (vdpbf16ps) for the forward's two products on bf16 inputs, with
// fp32 accumulation. Include only from a translation unit compiled for avx512bf16
// (kernels_avx512_bf16.cpp).
//
// vdpbf16ps multiplies pairs of bf16 along the reduction dimension and adds both products to
// one fp32 lane, so both operands come as 32-bit pairs (k, k+1):
//   A(m, j) = the pair of A row m at reduction index 2j: 4 bytes at A + m * a_rs + j * a_cs
//             (byte strides: K rows are used in place, P is packed)
//   B(j, n) = the pair (B[2j][n], B[2j+1][n]) at B + j * ldb + n (uint32, "VNNI" layout)
//   C (M x N) fp32 = or += sum_j A(m, j) . B(j, n)
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace dpbf16 {

constexpr int kLanes = 16;
constexpr int kRows = 6;  // 6 x 4 accumulators + 4 B vectors + 1 broadcast fit 32 zmm registers

static inline __attribute__((always_inline)) __m512bh pair_broadcast(const char* a) {
  uint32_t x;
  std::memcpy(&x, a, 4);
  return (__m512bh)_mm512_set1_epi32(static_cast<int>(x));
}

// NV full vectors of columns, the last one masked by `last`
template <int MR, int NV>
static void tile(int64_t k2, const char* A, int64_t a_rs, int64_t a_cs, const uint32_t* B, int64_t ldb, float* C,
                 int64_t ldc, bool accum, __mmask16 last) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      acc[m][v] = accum ? _mm512_maskz_loadu_ps(v == NV - 1 ? last : 0xffff, C + m * ldc + v * kLanes)
                        : _mm512_setzero_ps();
  for (int64_t j = 0; j < k2; ++j) {
    __m512bh bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(B + j * ldb + v * kLanes);
    const char* a = A + j * a_cs;
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m512bh av = pair_broadcast(a + m * a_rs);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_dpbf16_ps(acc[m][v], av, bv[v]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) _mm512_mask_storeu_ps(C + m * ldc + v * kLanes, v == NV - 1 ? last : 0xffff, acc[m][v]);
}

template <int NV>
static void rows_of(int mr, int64_t k2, const char* A, int64_t a_rs, int64_t a_cs, const uint32_t* B, int64_t ldb,
                    float* C, int64_t ldc, bool accum, __mmask16 last) {
  switch (mr) {
    case 6: return tile<6, NV>(k2, A, a_rs, a_cs, B, ldb, C, ldc, accum, last);
    case 5: return tile<5, NV>(k2, A, a_rs, a_cs, B, ldb, C, ldc, accum, last);
    case 4: return tile<4, NV>(k2, A, a_rs, a_cs, B, ldb, C, ldc, accum, last);
    case 3: return tile<3, NV>(k2, A, a_rs, a_cs, B, ldb, C, ldc, accum, last);
    case 2: return tile<2, NV>(k2, A, a_rs, a_cs, B, ldb, C, ldc, accum, last);
    default: return tile<1, NV>(k2, A, a_rs, a_cs, B, ldb, C, ldc, accum, last);
  }
}

// C (M x N) = or += A . B over k2 pairs; B's rows are padded to whole vectors (ldb >= N
// rounded up to 16, zeros in the padding), C is not.
static inline void gemm(int64_t M, int64_t N, int64_t k2, const char* A, int64_t a_rs, int64_t a_cs, const uint32_t* B,
                        int64_t ldb, float* C, int64_t ldc, bool accum) {
  for (int64_t n0 = 0; n0 < N; n0 += 4 * kLanes) {
    const int64_t cols = N - n0 < 4 * kLanes ? N - n0 : 4 * kLanes;
    const int nv = static_cast<int>((cols + kLanes - 1) / kLanes);
    const int tail = static_cast<int>(cols - (nv - 1) * kLanes);
    const __mmask16 last = static_cast<__mmask16>((1u << tail) - 1u);
    for (int64_t m0 = 0; m0 < M; m0 += kRows) {
      const int mr = static_cast<int>(M - m0 < kRows ? M - m0 : kRows);
      const char* a = A + m0 * a_rs;
      float* c = C + m0 * ldc + n0;
      const uint32_t* b = B + n0;
      switch (nv) {
        case 4: rows_of<4>(mr, k2, a, a_rs, a_cs, b, ldb, c, ldc, accum, last); break;
        case 3: rows_of<3>(mr, k2, a, a_rs, a_cs, b, ldb, c, ldc, accum, last); break;
        case 2: rows_of<2>(mr, k2, a, a_rs, a_cs, b, ldb, c, ldc, accum, last); break;
        default: rows_of<1>(mr, k2, a, a_rs, a_cs, b, ldb, c, ldc, accum, last); break;
      }
    }
  }
}

// 16 pairs (lo[i], hi[i]) of bf16 bit patterns as uint32 lanes (lo in the low half)
static inline __attribute__((always_inline)) __m512i interleave(__m256i lo, __m256i hi) {
  return _mm512_or_si512(_mm512_cvtepu16_epi32(lo), _mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
}

// dst[j * ld + c] = pair(rows 2j and 2j+1 of a bf16 matrix, column c), for j < ceil(rows / 2),
// c < ld (columns past `cols`, and the row past an odd `rows`, are zero). Row r at src + r * stride.
static inline void pack_rows_vnni(const uint16_t* src, int64_t stride, int64_t rows, int64_t cols, uint32_t* dst,
                                  int64_t ld) {
  for (int64_t j = 0; 2 * j < rows; ++j) {
    const uint16_t* r0 = src + 2 * j * stride;
    const uint16_t* r1 = r0 + stride;
    const bool has_hi = 2 * j + 1 < rows;
    for (int64_t c = 0; c < ld; c += kLanes) {
      const int n = static_cast<int>(cols - c <= 0 ? 0 : cols - c < kLanes ? cols - c : kLanes);
      const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1u);
      const __m256i lo = _mm256_maskz_loadu_epi16(mask, r0 + c);
      const __m256i hi = has_hi ? _mm256_maskz_loadu_epi16(mask, r1 + c) : _mm256_setzero_si256();
      _mm512_storeu_si512(dst + j * ld + c, interleave(lo, hi));
    }
  }
}

// dst[j * ld + c] = pair(bf16(src row 2j), bf16(src row 2j+1)) at column c (fp32 rows of
// `ld` floats, ld a multiple of 16; the row past an odd `rows` counts as zeros)
static inline void pack_fp32_rows_vnni(const float* src, int64_t rows, int64_t ld, uint32_t* dst) {
  for (int64_t j = 0; 2 * j < rows; ++j) {
    const float* r0 = src + 2 * j * ld;
    const bool has_hi = 2 * j + 1 < rows;
    for (int64_t c = 0; c < ld; c += kLanes) {
      const __m256i lo = (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(r0 + c));
      const __m256i hi = has_hi ? (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(r0 + ld + c)) : _mm256_setzero_si256();
      _mm512_storeu_si512(dst + j * ld + c, interleave(lo, hi));
    }
  }
}

}  // namespace dpbf16
