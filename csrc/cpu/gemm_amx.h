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

// One 16*MT x 16*NT block of C over the whole reduction (MT, NT in {1, 2}).
template <int MT, int NT>
static inline __attribute__((always_inline)) void block(int64_t K, const char* A, int64_t lda, const char* B,
                                                        int64_t ldb, float* C, int64_t ldc, bool accum) {
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
  _tile_stored(0, C, ldc_b);
  if constexpr (NT == 2) _tile_stored(1, C + 16, ldc_b);
  if constexpr (MT == 2) _tile_stored(2, c1, ldc_b);
  if constexpr (MT == 2 && NT == 2) _tile_stored(3, c1 + 16, ldc_b);
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

}  // namespace amx
