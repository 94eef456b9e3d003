// Register-blocked fp32 GEMM for the small tiles of attention, templated on a SIMD
// vector type (simd_*.h). MKL's sgemm reaches ~110 GFLOP/s per core on the AMD Zen
// machines we measured while this kernel reaches ~270, hence our own.
//
//   C (M x N) = or += A (M x K) * B (K x N)
//   A(m, k) = A[m * a_rs + k * a_cs]   (any strides: lets us read P or dS transposed)
//   B(k, :) = B + k * ldb              (contiguous along n)
//
// Only B needs a contiguous inner dim, so K/V/Q/dO rows are used in place and only Q^T
// and dO^T are ever packed.
#pragma once

#include <cstdint>
#include <utility>

template <class V, int MR, int NV, bool ACCUM, bool TAIL>
static void gemm_tile(int64_t K, const float* A, int64_t a_rs, int64_t a_cs, const float* B, int64_t ldb, float* C,
                      int64_t ldc, int n_last) {
  constexpr int W = V::kWidth;
  V acc[MR][NV];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      if (ACCUM)
        acc[m][v] = (TAIL && v == NV - 1) ? V::load(C + m * ldc + v * W, n_last) : V::load(C + m * ldc + v * W);
      else
        acc[m][v] = V::zero();
    }
  for (int64_t k = 0; k < K; ++k) {
    const float* b = B + k * ldb;
    V bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) bv[v] = (TAIL && v == NV - 1) ? V::load(b + v * W, n_last) : V::load(b + v * W);
    const float* a = A + k * a_cs;
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      V av = V::set1(a[m * a_rs]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[m][v] = V::fmadd(av, bv[v], acc[m][v]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      if (TAIL && v == NV - 1)
        acc[m][v].store(C + m * ldc + v * W, n_last);
      else
        acc[m][v].store(C + m * ldc + v * W);
    }
}

using GemmTileFn = void (*)(int64_t, const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t, int);

template <class V, bool ACCUM, bool TAIL, int NV, int... Ms>
static constexpr void fill_tile_row(GemmTileFn* row, std::integer_sequence<int, Ms...>) {
  ((row[Ms] = &gemm_tile<V, Ms + 1, NV, ACCUM, TAIL>), ...);
}

template <class V, bool ACCUM, bool TAIL>
struct GemmTiles {
  GemmTileFn fn[V::kCols][V::kRows];
  template <int... Ns>
  constexpr void fill(std::integer_sequence<int, Ns...>) {
    ((fill_tile_row<V, ACCUM, TAIL, Ns + 1>(fn[Ns], std::make_integer_sequence<int, V::kRows>{})), ...);
  }
  constexpr GemmTiles() : fn{} { fill(std::make_integer_sequence<int, V::kCols>{}); }
};

template <class V, bool ACCUM>
static void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_rs, int64_t a_cs, const float* B,
                 int64_t ldb, float* C, int64_t ldc) {
  constexpr int W = V::kWidth, MR = V::kRows, NV = V::kCols;
  static constexpr GemmTiles<V, ACCUM, false> full{};
  static constexpr GemmTiles<V, ACCUM, true> tail{};
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!ACCUM)
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) C[m * ldc + n] = 0.f;
    return;
  }
  for (int64_t n0 = 0; n0 < N; n0 += NV * W) {
    const int64_t ncols = (N - n0 < NV * W) ? N - n0 : NV * W;
    const int nv = static_cast<int>((ncols + W - 1) / W);
    const int n_last = static_cast<int>(ncols - (nv - 1) * W);
    const GemmTileFn* fns = (n_last == W ? full.fn : tail.fn)[nv - 1];
    for (int64_t m0 = 0; m0 < M; m0 += MR) {
      const int mr = static_cast<int>((M - m0 < MR) ? M - m0 : MR);
      fns[mr - 1](K, A + m0 * a_rs, a_rs, a_cs, B + n0, ldb, C + m0 * ldc + n0, ldc, n_last);
    }
  }
}
