// bf16 GEMM on AMX tiles (tdpbf16ps) for attention's block products, fp32 accumulation.
// Include only from a translation unit compiled for amx-tile, amx-bf16 and avx512bf16
// (kernels_amx_bf16.cpp).
//
// One tile configuration serves every product: eight 16-row x 64-byte tiles, i.e. an fp32
// C tile of 16 x 16, an A tile of 16 rows x 32 bf16, a B tile of 16 pair rows x 16 columns.
// tdpbf16ps C += A . B multiplies pairs along the reduction dimension, so B comes in the
// VNNI pair layout:
//   A(m, k) = bf16 at A + m * lda + 2k bytes            (row-major: K, V rows in place)
//   B(j, n) = the pair (B[2j][n], B[2j+1][n]) as a uint32 at B + j * ldb + 4n bytes
//   C (M x N) fp32 at C + m * ldc + n floats
// M and N must be multiples of 16 and K of 32: callers pad operands with zero rows/columns.
//
// GCC's tile intrinsics are inline asm that name only the base address of what a tile load
// reads (and ldtilecfg only the first 8 bytes of its 64-byte configuration), so the compiler
// does not know those bytes are read: memory_barrier() before them makes every store the
// packing code made visible first.
// The register blocking is 2 x 2 C tiles (32 x 32) fed by 2 A and 2 B tiles: tiles 0-3 hold
// C, 4-5 A, 6-7 B.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "gemm_dpbf16.h"

namespace amx {

// a compiler barrier for memory that `p` (and anything else escaped) points into
static inline __attribute__((always_inline)) void memory_barrier(const void* p) {
  __asm__ volatile("" : : "r"(p) : "memory");
}

// The 64-byte tile configuration (palette 1) that _tile_loadconfig reads.
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tile state is per thread: a Tiles object (when `on`) configures this thread's tiles for the
// kernels below and releases them (TILERELEASE: back to the init state, so context switches
// stay cheap) when the work item ends. ldtilecfg costs far less than one block product.
struct Tiles {
  bool on;
  explicit Tiles(bool use) : on(use) {
    if (!on) return;
    TileConfig cfg;
    for (int t = 0; t < 8; ++t) {
      cfg.colsb[t] = 64;
      cfg.rows[t] = 16;
    }
    memory_barrier(&cfg);
    _tile_loadconfig(&cfg);
  }
  ~Tiles() {
    if (on) _tile_release();
  }
  Tiles(const Tiles&) = delete;
  Tiles& operator=(const Tiles&) = delete;
};

// The C tiles (0-3) of one 16*MT x 16*NT block of C (MT, NT in {1, 2}): loaded from C when
// accumulating, else zeroed; stored back to C.
template <int MT, int NT>
static inline __attribute__((always_inline)) void load_c(float* C, int64_t ldc, bool accum) {
  const int64_t ldc_b = ldc * 4;
  float* c1 = C + 16 * ldc;  // second row of C tiles
  if (accum) {
    _tile_loadd(0, C, ldc_b);
    if constexpr (NT == 2) _tile_loadd(1, C + 16, ldc_b);
    if constexpr (MT == 2) _tile_loadd(2, c1, ldc_b);
    if constexpr (MT == 2 && NT == 2) _tile_loadd(3, c1 + 16, ldc_b);
  } else {
    _tile_zero(0);
    if constexpr (NT == 2) _tile_zero(1);
    if constexpr (MT == 2) _tile_zero(2);
    if constexpr (MT == 2 && NT == 2) _tile_zero(3);
  }
}
template <int MT, int NT>
static inline __attribute__((always_inline)) void store_c(float* C, int64_t ldc) {
  const int64_t ldc_b = ldc * 4;
  float* c1 = C + 16 * ldc;
  _tile_stored(0, C, ldc_b);
  if constexpr (NT == 2) _tile_stored(1, C + 16, ldc_b);
  if constexpr (MT == 2) _tile_stored(2, c1, ldc_b);
  if constexpr (MT == 2 && NT == 2) _tile_stored(3, c1 + 16, ldc_b);
}

// The C tiles += A . B over the whole reduction K (A tiles 4-5, B tiles 6-7)
template <int MT, int NT>
static inline __attribute__((always_inline)) void reduce(int64_t K, const char* A, int64_t lda, const char* B,
                                                         int64_t ldb) {
  for (int64_t k = 0; k < K; k += 32) {
    const char* a = A + 2 * k;
    const char* b = B + (k / 2) * ldb;
    _tile_loadd(4, a, lda);
    if constexpr (MT == 2) _tile_loadd(5, a + 16 * lda, lda);
    _tile_loadd(6, b, ldb);
    if constexpr (NT == 2) _tile_loadd(7, b + 64, ldb);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NT == 2) _tile_dpbf16ps(1, 4, 7);
    if constexpr (MT == 2) _tile_dpbf16ps(2, 5, 6);
    if constexpr (MT == 2 && NT == 2) _tile_dpbf16ps(3, 5, 7);
  }
}

// One 16*MT x 16*NT block of C over the whole reduction
template <int MT, int NT>
static inline __attribute__((always_inline)) void block(int64_t K, const char* A, int64_t lda, const char* B,
                                                        int64_t ldb, float* C, int64_t ldc, bool accum) {
  load_c<MT, NT>(C, ldc, accum);
  reduce<MT, NT>(K, A, lda, B, ldb);
  store_c<MT, NT>(C, ldc);
}

// C (M x N) = or += A (M x K) . B (K/2 x N pairs); a Tiles object must be alive on this thread
static inline void gemm(int64_t M, int64_t N, int64_t K, const void* A, int64_t lda, const void* B, int64_t ldb,
                        float* C, int64_t ldc, bool accum) {
  const char* a = static_cast<const char*>(A);
  const char* b = static_cast<const char*>(B);
  memory_barrier(C);
  for (int64_t m0 = 0; m0 < M; m0 += 32) {
    const bool m2 = m0 + 32 <= M;
    for (int64_t n0 = 0; n0 < N; n0 += 32) {
      const bool n2 = n0 + 32 <= N;
      const char* am = a + m0 * lda;
      const char* bn = b + n0 * 4;
      float* c = C + m0 * ldc + n0;
      if (m2 && n2)
        block<2, 2>(K, am, lda, bn, ldb, c, ldc, accum);
      else if (m2)
        block<2, 1>(K, am, lda, bn, ldb, c, ldc, accum);
      else if (n2)
        block<1, 2>(K, am, lda, bn, ldb, c, ldc, accum);
      else
        block<1, 1>(K, am, lda, bn, ldb, c, ldc, accum);
    }
  }
}

// dst row r (bf16, ld elements) = rows [0, rows) of a bf16 matrix (src + r * stride, cols
// elements), rows [rows, rows_pad) zero: the padded A operand of a key block's tail.
static inline void copy_rows_padded(const uint16_t* src, int64_t stride, int64_t rows, int64_t rows_pad, int64_t cols,
                                    uint16_t* dst) {
  for (int64_t r = 0; r < rows_pad; ++r) {
    if (r < rows)
      std::memcpy(dst + r * cols, src + r * stride, static_cast<size_t>(cols) * 2);
    else
      std::memset(dst + r * cols, 0, static_cast<size_t>(cols) * 2);
  }
}

// dst row n (cols bf16, cols a multiple of 32) = bf16(src row n) (fp32 rows of `cols`), for
// n < rows; rows [rows, rows_pad) zero. The A operand made of a key-major fp32 tile (P^T, dS^T).
static inline void rows_to_bf16(const float* src, int64_t rows, int64_t rows_pad, int64_t cols, uint16_t* dst) {
  for (int64_t n = 0; n < rows_pad; ++n)
    for (int64_t c = 0; c < cols; c += 32) {
      __m512i x = _mm512_setzero_si512();
      if (n < rows)
        x = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + n * cols + c + 16), _mm512_loadu_ps(src + n * cols + c));
      _mm512_storeu_si512(dst + n * cols + c, x);
    }
}

// dst[m * ld + n] = bf16(src[n * BQ + m]) for n < rows, 0 for rows <= n < ld, m < BQ (ld a
// multiple of 32): the query-major A operand (P, dS) made of a key-major fp32 tile (P^T, dS^T),
// transposed 16 x 16 in registers (V: the 16-lane vector type of simd_avx512.h).
template <class V, int64_t BQ>
static inline void transpose_to_bf16(const float* src, int64_t rows, int64_t ld, uint16_t* dst) {
  V lo[16], hi[16];
  for (int64_t c = 0; c < BQ; c += 16)
    for (int64_t n0 = 0; n0 < ld; n0 += 32) {
      for (int i = 0; i < 16; ++i) {
        lo[i] = n0 + i < rows ? V::load(src + (n0 + i) * BQ + c) : V::zero();
        hi[i] = n0 + 16 + i < rows ? V::load(src + (n0 + 16 + i) * BQ + c) : V::zero();
      }
      V::transpose(lo);
      V::transpose(hi);
      for (int i = 0; i < 16; ++i)
        _mm512_storeu_si512(dst + (c + i) * ld + n0, (__m512i)_mm512_cvtne2ps_pbh(hi[i].v, lo[i].v));
    }
}

// dst pair row j (ld uint32) = rows 2j, 2j+1 of a bf16 matrix (dpbf16::pack_rows_vnni), for
// j < pair_rows; the pairs past `rows` are zero (the padded B operand of a block's tail)
static inline void pack_vnni_padded(const uint16_t* src, int64_t stride, int64_t rows, int64_t cols,
                                    int64_t pair_rows, uint32_t* dst, int64_t ld) {
  if (cols % 16 == 0 && ld == cols) {
    // whole 16-column chunks (every head dim AMX serves): plain loads, no per-chunk tail mask
    for (int64_t j = 0; 2 * j < rows; ++j) {
      const uint16_t* r0 = src + 2 * j * stride;
      const uint16_t* r1 = r0 + stride;
      const bool has_hi = 2 * j + 1 < rows;
      for (int64_t c = 0; c < cols; c += 16) {
        const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + c));
        const __m256i hi = has_hi ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r1 + c)) : _mm256_setzero_si256();
        _mm512_storeu_si512(dst + j * ld + c, dpbf16::interleave(lo, hi));
      }
    }
  } else {
    dpbf16::pack_rows_vnni(src, stride, rows, cols, dst, ld);
  }
  for (int64_t j = (rows + 1) / 2; j < pair_rows; ++j) std::memset(dst + j * ld, 0, static_cast<size_t>(ld) * 4);
}

// ---------------------------------------------------------------------------------------
// fp32 products on bf16 tiles: the three-way split (Henry, Tang, Heinecke 2019, "Leveraging
// the bfloat16 AI datatype for higher-precision computations"; cuBLAS's BF16x9 emulation).
// Each fp32 operand is x = hi + mid + lo with hi = bf16(x), mid = bf16(x - hi), lo =
// bf16(x - hi - mid), all rounded to nearest even: exact for normal fp32 (8 + 8 + 8 significant
// bits, the remainders are exact fp32 subtractions), and |mid| <= 2^-8 |x|, |lo| <= 2^-16 |x|.
// A product a.b is then the sum of the bf16 cross products of the pieces, accumulated in fp32
// by tdpbf16ps (a bf16 x bf16 product is exact in fp32). The pieces of one operand lie `piece`
// elements apart, hi first. kSplitTerms lists the (A piece, B piece) pairs smallest first, so
// that its last n entries are the n-term variant: 9 all terms, 6 drops mid.lo, lo.mid, lo.lo
// (relative order 2^-24: fp32's own rounding), 3 keeps hi.hi, hi.mid, mid.hi (bf16x3, about
// 2^-16 relative: used only to show the accuracy tests can tell), 1 the plain bf16 product.
// Subnormal pieces (|x| below about 2^-110 for the lo piece) are flushed to zero by the
// bf16 conversion and by AMX (DAZ); an Inf operand gives NaN (its zero pieces multiply it).

constexpr int kSplitTermsMax = 9;
constexpr uint8_t kSplitTerms[kSplitTermsMax][2] = {{2, 2}, {1, 2}, {2, 1}, {0, 2}, {2, 0},
                                                    {1, 1}, {0, 1}, {1, 0}, {0, 0}};

// bf16 bits (16 lanes) back to fp32, exactly
static inline __attribute__((always_inline)) __m512 bf16_to_fp32(__m256i b) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}

struct Split3 {
  __m256i piece[3];  // hi, mid, lo as bf16 bits
};
static inline __attribute__((always_inline)) Split3 split3(__m512 x) {
  Split3 s;
  s.piece[0] = (__m256i)_mm512_cvtneps_pbh(x);
  const __m512 r1 = _mm512_sub_ps(x, bf16_to_fp32(s.piece[0]));
  s.piece[1] = (__m256i)_mm512_cvtneps_pbh(r1);
  s.piece[2] = (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(r1, bf16_to_fp32(s.piece[1])));
  return s;
}

// the pieces of two 16-element halves as one 32-element row of each piece
static inline __attribute__((always_inline)) void store_split32(const Split3& lo, const Split3& hi, uint16_t* dst,
                                                                int64_t piece) {
  for (int i = 0; i < 3; ++i)
    _mm512_storeu_si512(dst + i * piece, _mm512_inserti64x4(_mm512_castsi256_si512(lo.piece[i]), hi.piece[i], 1));
}

// block() summed over the last `terms` entries of kSplitTerms (A's pieces a_piece bytes apart,
// B's b_piece), the C tiles kept in registers across all terms
template <int MT, int NT>
static inline __attribute__((always_inline)) void block_split(int64_t K, const char* A, int64_t a_piece, int64_t lda,
                                                              const char* B, int64_t b_piece, int64_t ldb, float* C,
                                                              int64_t ldc, bool accum, int terms) {
  load_c<MT, NT>(C, ldc, accum);
  for (int t = kSplitTermsMax - terms; t < kSplitTermsMax; ++t)
    reduce<MT, NT>(K, A + kSplitTerms[t][0] * a_piece, lda, B + kSplitTerms[t][1] * b_piece, ldb);
  store_c<MT, NT>(C, ldc);
}

// gemm() on split operands: A's pieces a_piece bf16 elements apart, B's b_piece uint32 pairs
// apart, `terms` (1, 3, 6 or 9) cross products per block
static inline void gemm_split(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t a_piece, int64_t lda,
                              const uint32_t* B, int64_t b_piece, int64_t ldb, float* C, int64_t ldc, bool accum,
                              int terms) {
  const char* a = reinterpret_cast<const char*>(A);
  const char* b = reinterpret_cast<const char*>(B);
  const int64_t ap = a_piece * 2, bp = b_piece * 4;
  memory_barrier(C);
  for (int64_t m0 = 0; m0 < M; m0 += 32) {
    const bool m2 = m0 + 32 <= M;
    for (int64_t n0 = 0; n0 < N; n0 += 32) {
      const bool n2 = n0 + 32 <= N;
      const char* am = a + m0 * lda;
      const char* bn = b + n0 * 4;
      float* c = C + m0 * ldc + n0;
      if (m2 && n2)
        block_split<2, 2>(K, am, ap, lda, bn, bp, ldb, c, ldc, accum, terms);
      else if (m2)
        block_split<2, 1>(K, am, ap, lda, bn, bp, ldb, c, ldc, accum, terms);
      else if (n2)
        block_split<1, 2>(K, am, ap, lda, bn, bp, ldb, c, ldc, accum, terms);
      else
        block_split<1, 1>(K, am, ap, lda, bn, bp, ldb, c, ldc, accum, terms);
    }
  }
}

// dst row r (cols bf16 per piece, cols a multiple of 32) = the pieces of fp32 row r (src +
// r * stride) for r < rows, zero rows up to rows_pad: the split A operand of K rows
static inline void split_rows_padded(const float* src, int64_t stride, int64_t rows, int64_t rows_pad, int64_t cols,
                                     uint16_t* dst, int64_t piece) {
  const Split3 zero = split3(_mm512_setzero_ps());
  for (int64_t r = 0; r < rows_pad; ++r)
    for (int64_t c = 0; c < cols; c += 32) {
      const bool in = r < rows;
      const Split3 lo = in ? split3(_mm512_loadu_ps(src + r * stride + c)) : zero;
      const Split3 hi = in ? split3(_mm512_loadu_ps(src + r * stride + c + 16)) : zero;
      store_split32(lo, hi, dst + r * cols + c, piece);
    }
}

// dst[c] (n uint32 per piece, n a multiple of 16) = the pairs (pieces of r0[c], of r1[c]), r1
// null: zeros. One pair row of a split B operand (Q^T from two of its fp32 rows, V from two
// key rows).
static inline void split_pair_row(const float* r0, const float* r1, int64_t n, uint32_t* dst, int64_t piece) {
  for (int64_t c = 0; c < n; c += 16) {
    const Split3 a = split3(r0 ? _mm512_loadu_ps(r0 + c) : _mm512_setzero_ps());
    const Split3 b = split3(r1 ? _mm512_loadu_ps(r1 + c) : _mm512_setzero_ps());
    for (int i = 0; i < 3; ++i) _mm512_storeu_si512(dst + i * piece + c, dpbf16::interleave(a.piece[i], b.piece[i]));
  }
}

// transpose_to_bf16 with the three pieces of each element: dst + i * piece holds piece i of
// the query-major A operand (P) made of a key-major fp32 tile (P^T)
template <class V, int64_t BQ>
static inline void transpose_split(const float* src, int64_t rows, int64_t ld, uint16_t* dst, int64_t piece) {
  V lo[16], hi[16];
  for (int64_t c = 0; c < BQ; c += 16)
    for (int64_t n0 = 0; n0 < ld; n0 += 32) {
      for (int i = 0; i < 16; ++i) {
        lo[i] = n0 + i < rows ? V::load(src + (n0 + i) * BQ + c) : V::zero();
        hi[i] = n0 + 16 + i < rows ? V::load(src + (n0 + 16 + i) * BQ + c) : V::zero();
      }
      V::transpose(lo);
      V::transpose(hi);
      for (int i = 0; i < 16; ++i) store_split32(split3(lo[i].v), split3(hi[i].v), dst + (c + i) * ld + n0, piece);
    }
}

}  // namespace amx
