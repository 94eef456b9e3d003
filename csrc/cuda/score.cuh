// From a raw q.k product to a log2-domain score: scale, the band (csrc/mask.h), bounds, the
// optional bool/float mask, and the dropout decision (csrc/philox.h). The forward and both
// backward passes call these, so they agree element for element.
#pragma once

#include <cstdint>

#include "../mask.h"
#include "../params.h"
#include "../philox.h"
#include "ptx.cuh"

namespace attnkern {
namespace cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLowestFloat = -3.40282347e38f;  // -FLT_MAX

// A float mask value in log2 units. Only -inf masks a key: finite values at or below about
// -2.4e38 (finfo(float32).min) would overflow to -inf when scaled, so they saturate at -FLT_MAX
// (as csrc/cpu/kernels_impl.inc mask_to_log2 does).
// max that keeps a NaN (fmaxf drops it): a NaN partial LSE (a NaN score) makes the merged row NaN
__host__ __device__ __forceinline__ float nan_max(float a, float b) { return (b > a || b != b) ? b : a; }

__host__ __device__ __forceinline__ float mask_to_log2(float value) {
  const float x = value * kLog2e;
  return x == -INFINITY && value != -INFINITY ? kLowestFloat : x;
}
constexpr float kLn2 = 0.6931471805599453f;

// kFeatures == false compiles masks and dropout out (the fast path); the launchers pick it
// whenever a call has neither. kVarlen: the rules of one sequence of a packed batch (its lengths
// and band, from a SeqSpan of varlen.cuh); the dense rules read the lengths from p.
template <bool kFeatures, bool kVarlen = false>
struct ScoreRules {
  const AttnParams& p;  // a __grid_constant__ kernel parameter: read in place, not copied
  Band band;
  float scale_log2;
  int64_t seq_len_q = 0;  // kVarlen: the sequence's query count (band.len_k its key count)

  __device__ explicit ScoreRules(const AttnParams& params)
      : p(params), band(make_band(params)), scale_log2(params.scale * kLog2e) {}
  template <class Seq>
  __device__ ScoreRules(const AttnParams& params, const Seq& seq)
      : p(params),
        band(make_band(params, kVarlen ? seq.len_q : params.len_q, kVarlen ? seq.len_k : params.len_k)),
        scale_log2(params.scale * kLog2e),
        seq_len_q(kVarlen ? seq.len_q : 0) {}

  __device__ __forceinline__ int64_t len_q() const {
    if constexpr (kVarlen) return seq_len_q;
    return p.len_q;
  }
  __device__ __forceinline__ int64_t len_k() const {
    if constexpr (kVarlen) return band.len_k;
    return p.len_k;
  }

  __device__ __forceinline__ bool has_mask() const { return kFeatures && p.mask_kind != MaskKind::kNone; }
  __device__ __forceinline__ bool dropout() const { return kFeatures && p.dropout_p > 0.f; }

  // element offset of mask(b, hq, i, j)
  __device__ __forceinline__ int64_t mask_offset(int64_t b, int64_t hq, int64_t i, int64_t j) const {
    return kFeatures ? b * p.mask_stride[0] + hq * p.mask_stride[1] + i * p.mask_stride[2] + j * p.mask_stride[3] : 0;
  }

  // The band as a window of tile columns. For query i and the tile's keys key0 .. key0 + n - 1:
  // columns [lo, hi) are allowed (csrc/mask.h Band::lo/hi, which also stop at len_k); a padding
  // row i >= len_q gets an empty window, so it never reads the mask.
  __device__ __forceinline__ void query_window(int64_t i, int64_t key0, int n, int& lo, int& hi) const {
    if (i >= len_q()) {
      lo = hi = 0;
      return;
    }
    lo = static_cast<int>(max(int64_t{0}, min(int64_t{n}, band.lo(i) - key0)));
    hi = static_cast<int>(max(int64_t{0}, min(int64_t{n}, band.hi(i) - key0)));
  }
  // Transposed: for key j and the tile's queries q0 .. q0 + n - 1, the queries whose band holds j.
  __device__ __forceinline__ void key_window(int64_t j, int64_t q0, int n, int& lo, int& hi) const {
    if (j >= len_k()) {
      lo = hi = 0;
      return;
    }
    lo = static_cast<int>(max(int64_t{0}, min(int64_t{n}, band.rows_lo(j, len_q()) - q0)));
    hi = static_cast<int>(max(int64_t{0}, min(int64_t{n}, band.rows_hi(j + 1, len_q()) - q0)));
  }
  // Whether tile elements need the window test: tiles crossing the band's edge, and every tile
  // when a mask is read (its reads must stay inside the window's bounds).
  __device__ __forceinline__ bool checked(bool edge) const { return edge || has_mask(); }

  // Score in log2 units of tile column c of a row with window [lo, hi), -inf where the pair
  // takes no part. mask_row is the mask's element offset of this row's column 0, mask_step its
  // stride along the columns.
  __device__ __forceinline__ float operator()(float acc, int c, int lo, int hi, bool check, int64_t mask_row,
                                              int64_t mask_step) const {
    float s = acc * scale_log2;
    const bool in = !check || (c >= lo && c < hi);
    if (has_mask() && in) {
      const int64_t off = mask_row + c * mask_step;
      if (p.mask_kind == MaskKind::kBool) {
        if (!static_cast<const unsigned char*>(p.mask)[off]) s = -INFINITY;
      } else if (p.mask_dtype == DType::kFloat32) {
        s += mask_to_log2(static_cast<const float*>(p.mask)[off]);
      } else if (p.mask_dtype == DType::kFloat16) {
        s += mask_to_log2(to_float(static_cast<const __half*>(p.mask)[off]));
      } else {
        s += mask_to_log2(to_float(static_cast<const __nv_bfloat16*>(p.mask)[off]));
      }
    }
    return in ? s : -INFINITY;
  }

  // Dropout keeps (b*Hq+hq, i, j) iff word j & 3 of Philox(j >> 2, i, b*Hq+hq, 0) >= threshold.
  __device__ __forceinline__ bool keep(uint32_t bh, int64_t i, int64_t j) const {
    const Philox4 r = philox4x32_10(static_cast<uint32_t>(j >> 2), static_cast<uint32_t>(i), bh, 0u, p.dropout_seed);
    const uint32_t word = (j & 2) ? ((j & 1) ? r.x[3] : r.x[2]) : ((j & 1) ? r.x[1] : r.x[0]);
    return word >= p.dropout_threshold;
  }
  // the pair (i, j), (i, j + 1) for even j: one Philox call serves both
  __device__ __forceinline__ void keep_pair(uint32_t bh, int64_t i, int64_t j, bool& k0, bool& k1) const {
    const Philox4 r = philox4x32_10(static_cast<uint32_t>(j >> 2), static_cast<uint32_t>(i), bh, 0u, p.dropout_seed);
    const bool hi = (j & 2) != 0;
    k0 = (hi ? r.x[2] : r.x[0]) >= p.dropout_threshold;
    k1 = (hi ? r.x[3] : r.x[1]) >= p.dropout_threshold;
  }
};

}  // namespace cuda
}  // namespace attnkern
