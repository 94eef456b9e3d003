// The attention band and the key-block range for a block of query rows.
// One definition for every C++/CUDA kernel; attnkern/_semantics.py documents it and
// the tests hold every backend to the Python reference.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define ATTNKERN_HD __host__ __device__ __forceinline__
#else
// always_inline: these are compiled into the ISA-specific CPU files too, and must leave no
// out-of-line copy (built with AVX-512, say) for the linker to share with other files
#define ATTNKERN_HD inline __attribute__((always_inline))
#endif

namespace attnkern {

struct Band {
  int64_t left;    // -1: unbounded
  int64_t right;   // -1: unbounded
  int64_t offset;  // position of query row 0 on the key axis
  int64_t len_k;

  // first allowed key of `row`, clamped to [0, len_k]
  ATTNKERN_HD int64_t lo(int64_t row) const {
    if (left < 0) return 0;
    int64_t x = row + offset - left;
    return x < 0 ? 0 : (x > len_k ? len_k : x);
  }
  // one past the last allowed key of `row`, clamped to [0, len_k]
  ATTNKERN_HD int64_t hi(int64_t row) const {
    if (right < 0) return len_k;
    int64_t x = row + offset + right + 1;
    return x < 0 ? 0 : (x > len_k ? len_k : x);
  }
  ATTNKERN_HD bool allowed(int64_t row, int64_t col) const {
    int64_t pos = row + offset;
    return (left < 0 || col >= pos - left) && (right < 0 || col <= pos + right);
  }
  // Keys any row in [row_begin, row_end) may attend: [lo(row_begin), hi(row_end - 1)).
  // Both bounds are monotone in the row, so the union of the rows' ranges is this interval.
  ATTNKERN_HD int64_t range_lo(int64_t row_begin) const { return lo(row_begin); }
  ATTNKERN_HD int64_t range_hi(int64_t row_end) const { return hi(row_end - 1); }
  // True if every (row, col) of the tile is inside the band, so no per-element test is needed.
  ATTNKERN_HD bool tile_full(int64_t row_begin, int64_t row_end, int64_t col_begin, int64_t col_end) const {
    return (left < 0 || col_begin >= row_end - 1 + offset - left) &&
           (right < 0 || col_end - 1 <= row_begin + offset + right);
  }
  // Query rows whose band meets [col_begin, col_end): the rows a key block receives gradient from.
  ATTNKERN_HD int64_t rows_lo(int64_t col_begin, int64_t len_q) const {
    // smallest row with hi(row) > col_begin, i.e. row + offset + right >= col_begin
    if (right < 0) return 0;
    int64_t r = col_begin - offset - right;
    return r < 0 ? 0 : (r > len_q ? len_q : r);
  }
  ATTNKERN_HD int64_t rows_hi(int64_t col_end, int64_t len_q) const {
    // one past the largest row with lo(row) < col_end, i.e. row + offset - left <= col_end - 1
    if (left < 0) return len_q;
    int64_t r = col_end - 1 - offset + left + 1;
    return r < 0 ? 0 : (r > len_q ? len_q : r);
  }

  // Blocks of `block` keys, aligned to multiples of `block`, that meet the band of rows
  // [row_begin, row_end): blocks first, first + block, ... (count of them); count 0 if none.
  ATTNKERN_HD void key_blocks(int64_t row_begin, int64_t row_end, int64_t block, int64_t& first,
                              int64_t& count) const {
    first = count = 0;
    if (row_end <= row_begin) return;
    const int64_t a = range_lo(row_begin), z = range_hi(row_end);
    if (z <= a) return;
    first = a / block * block;
    count = (z - first + block - 1) / block;
  }
  // Blocks of `block` query rows, aligned likewise, whose band meets keys [col_begin, col_end).
  ATTNKERN_HD void row_blocks(int64_t col_begin, int64_t col_end, int64_t len_q, int64_t block, int64_t& first,
                              int64_t& count) const {
    first = count = 0;
    const int64_t a = rows_lo(col_begin, len_q), z = rows_hi(col_end, len_q);
    if (z <= a) return;
    first = a / block * block;
    count = (z - first + block - 1) / block;
  }
};

// the band of a problem of len_q queries and len_k keys with p's window and alignment (one
// sequence of a packed batch)
template <typename P>
ATTNKERN_HD Band make_band(const P& p, int64_t len_q, int64_t len_k) {
  return Band{p.window_left, p.window_right, p.bottom_right ? len_k - len_q : 0, len_k};
}
template <typename P>
ATTNKERN_HD Band make_band(const P& p) {
  return make_band(p, p.len_q, p.len_k);
}

// |LSE| above this (natural log) marks a row whose fp32 LSE = max + log(sum) is too coarse for
// the backward's P = exp(s - LSE): half an ulp of 1024 is 6e-5 (past fp32 attention's
// tolerance), and from about 1e7 on log(sum) is lost outright (a row all at a -1e9 or
// finfo.min mask gets P = 1 per key instead of 1 / n). The backward recomputes such rows' max
// and sum instead (AttnParams::row_stats). attnkern/_semantics.py HUGE_LSE is the same value.
constexpr float kHugeLse = 1024.f;

// lse in the log2 domain of the backward's scores: +inf for a row without keys (so P = 0) and
// saturated at -FLT_MAX where the conversion overflows (a finite LSE near finfo.min)
ATTNKERN_HD float lse_to_log2(float lse) {
  const float x = lse * 1.4426950408889634f;
  if (lse == -__builtin_inff()) return __builtin_inff();
  return x == -__builtin_inff() ? -3.40282347e38f : x;
}

ATTNKERN_HD bool lse_is_huge(float lse) {
  return (lse > kHugeLse || lse < -kHugeLse) && lse != __builtin_inff() && lse != -__builtin_inff();
}

// (top, log2_sum) of a query row for the backward's P = 2^((s - top) - log2_sum), s the
// log2-domain score. Rows with an ordinary LSE keep (lse2, 0), the plain numerics; rows with a
// huge finite LSE take the recomputed statistics `stats` = (max, log2 sum) (AttnParams::
// row_stats), plus any mass the saved LSE holds beyond them: a sink (the backward's
// recomputation does not see it), or the other key blocks when a caller (ring attention) hands
// in a merged LSE. It shows up as an excess over the few ulps of rounding that
// (max + log2 sum) * ln2 * log2e can account for; within those ulps fp32 cannot tell.
ATTNKERN_HD void backward_row_stats(float lse, const float* stats, float& top, float& log2_sum) {
  const float lse2 = lse_to_log2(lse);
  top = lse2;
  log2_sum = 0.f;
  if (!lse_is_huge(lse) || stats == nullptr) return;
  top = stats[0];
  log2_sum = stats[1];
  const float excess = lse2 - (top + log2_sum);
  if (excess > (lse2 < 0.f ? -lse2 : lse2) * 0x1p-20f) log2_sum += excess;
}

// The softcap, s <- cap * tanh(s / cap), in every kernel: this scalar form (the CUDA kernels),
// its vector form (csrc/cpu/kernels_impl.inc softcap_tanh_vec) and attnkern/triton/forward.py
// softcap_tanh compute the same two branches with these constants.
// - |y| < kTanhPolyBound: y + y^3 P(y^2), P of degree 4 fitted for relative error (at most 0.8
//   ulp in fp32 over the range, against float64 tanh), so cap * tanh(s / cap) keeps the relative
//   accuracy of s however large the cap. (1 - 2 / (1 + e^(2y)) alone has an absolute error of
//   about 1e-7 near 0, which the cap multiplies: 4.6e-5 relative on the output at cap 1000, and
//   every score became 0 from a cap of about 1e8 on: stop 23's fuzzing.)
// - otherwise 1 - 2 / (1 + 2^(2 log2(e) y)), y clamped to [-9, 9] (tanh(9) rounds to 1 in fp32):
//   absolute error about 1e-7, below 2e-7 relative since |tanh| >= 0.55 there.
// NaN stays NaN (a NaN score makes its row NaN with a cap too).
constexpr float kTanhPolyBound = 0.625f;
constexpr float kTanhP0 = -3.3333281942e-01f, kTanhP1 = 1.3331442184e-01f, kTanhP2 = -5.3739713875e-02f,
                kTanhP3 = 2.0639083091e-02f, kTanhP4 = -5.7049821214e-03f;
// Caps are held in [2^-100, 2^100] before any kernel sees them: cap * tanh(s / cap) differs from
// s by a factor (1 - (s/cap)^2 / 3 + ...), which is 1 in fp32 (and float64) for every |s| < 1e22
// when cap >= 2^100, and is within 1e-30 of 0 for every s when cap <= 2^-100 (so every weight
// rounds to the same value either way). Inside the range cap * log2(e) and 1 / cap are normal
// floats (a cap near FLT_MAX overflowed cap * log2(e) to inf and made every score NaN).
// attnkern/_semantics.py SOFTCAP_RANGE holds the same bounds for the Triton launcher.
constexpr float kSoftcapMin = 0x1p-100f, kSoftcapMax = 0x1p100f;

ATTNKERN_HD float softcap_tanh(float y) {
  const float ay = y < 0.f ? -y : y;
  if (!(ay >= kTanhPolyBound)) {  // (NaN takes this branch and stays NaN)
    const float z = y * y;
    const float poly = (((kTanhP4 * z + kTanhP3) * z + kTanhP2) * z + kTanhP1) * z + kTanhP0;
    return y + (y * z) * poly;
  }
  const float x = y < -9.f ? -9.f : (y > 9.f ? 9.f : y);
  return 1.f - 2.f / (1.f + exp2f(x * (2.f * 1.4426950408889634f)));
}

}  // namespace attnkern
