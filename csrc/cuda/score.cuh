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

// The feature variants of every sm80 kernel (its template parameter kFeatures), picked per call
// by the launchers (feature_variant in launch.h):
//   kPlain     no mask, no dropout, no modifier: the fast path, masks and dropout compiled out;
//   kMasked    bool/float masks and dropout, each decided at run time;
//   kModified  kMasked plus the score modifiers (softcap, sinks, ALiBi), each decided at run time.
// One variant for all three modifiers (not one per combination) keeps the instantiations at one
// more per pass; the run-time tests it adds are warp-uniform branches on kernel parameters,
// cheap next to the tanh of a softcap. The Hopper kernels pass a bool (false: kPlain, true: kMasked).
constexpr int kPlain = 0;
constexpr int kMasked = 1;
constexpr int kModified = 2;

// The output multiplier and natural-log LSE of a finished row whose keys gave log2-domain
// statistics (m: max, l: sum of exp2(s - m)), with the head's sink (natural log, -inf: none)
// joining the denominator once (csrc/cpu/kernels_impl.inc row_total is the same rule). No key:
// output 0, LSE the sink. A NaN l (a NaN score) makes both NaN.
struct RowTotal {
  float inv_l, lse;
};
__host__ __device__ __forceinline__ RowTotal row_total(float m, float l, float sink) {
  const float s2 = sink * kLog2e;
  // the limits of lse = logaddexp(lse of the keys, sink) (reference.py): a NaN sink makes the
  // row NaN, as a NaN score does; a sink of +inf takes all the weight (output 0, lse +inf) but
  // for a row a NaN score made NaN
  if (s2 != s2) return {s2, s2};
  if (s2 == INFINITY && l == l) return {0.f, s2};
  if (l == 0.f) return {0.f, sink};
  if (!(s2 > -INFINITY)) return {1.f / l, (m + log2f(l)) * kLn2};
  const float top = fmaxf(m, s2);
  const float keys = exp2f(m - top);
  const float total = l * keys + exp2f(s2 - top);
  return {keys / total, (top + log2f(total)) * kLn2};
}

// kVarlen: the rules of one sequence of a packed batch (its lengths and band, from a SeqSpan of
// varlen.cuh); the dense rules read the lengths from p.
template <int kFeatures, bool kVarlen = false>
struct ScoreRules {
  static constexpr bool kModifiers = kFeatures == kModified;
  const AttnParams& p;  // a __grid_constant__ kernel parameter: read in place, not copied
  Band band;
  float scale_log2;
  float cap_in = 0.f, cap_log2 = 0.f;  // kModified with a softcap: scale / softcap, softcap * log2e
  int64_t seq_len_q = 0;               // kVarlen: the sequence's query count (band.len_k its key count)
  uint64_t seq_seed = 0;               // kVarlen: the sequence's dropout seed, p.dropout_seed + b

  __device__ explicit ScoreRules(const AttnParams& params)
      : p(params), band(make_band(params)), scale_log2(params.scale * kLog2e) {
    init_softcap();
  }
  template <class Seq>
  __device__ ScoreRules(const AttnParams& params, const Seq& seq)
      : p(params),
        band(make_band(params, kVarlen ? seq.len_q : params.len_q, kVarlen ? seq.len_k : params.len_k)),
        scale_log2(params.scale * kLog2e),
        seq_len_q(kVarlen ? seq.len_q : 0),
        seq_seed(kVarlen ? params.dropout_seed + static_cast<uint64_t>(seq.index) : 0) {
    init_softcap();
  }
  __device__ __forceinline__ void init_softcap() {
    if (softcapped()) {
      cap_in = p.scale / p.softcap;
      cap_log2 = p.softcap * kLog2e;
    }
  }

  __device__ __forceinline__ int64_t len_q() const {
    if constexpr (kVarlen) return seq_len_q;
    return p.len_q;
  }
  __device__ __forceinline__ int64_t len_k() const {
    if constexpr (kVarlen) return band.len_k;
    return p.len_k;
  }

  __device__ __forceinline__ bool has_mask() const { return kFeatures != kPlain && p.mask_kind != MaskKind::kNone; }
  __device__ __forceinline__ bool dropout() const { return kFeatures != kPlain && p.dropout_p > 0.f; }
  __device__ __forceinline__ bool softcapped() const { return kModifiers && p.softcap > 0.f; }
  // ALiBi slope of head hq in log2 units (0 without slopes); sink of head hq (-inf without sinks)
  __device__ __forceinline__ float slope_log2(int64_t b, int hq) const {
    return kModifiers && p.alibi_slopes != nullptr ? p.alibi_slopes[b * p.heads_q + hq] * kLog2e : 0.f;
  }
  __device__ __forceinline__ float sink(int hq) const {
    return kModifiers && p.sinks != nullptr ? p.sinks[hq] : -INFINITY;
  }

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
    return masked(acc * scale_log2, c, lo, hi, check, mask_row, mask_step);
  }
  // The same with the score modifiers (kModified): softcap, then the ALiBi bias of a pair
  // `distance` = |aligned query position - key| apart with the row's slope (slope_log2), then
  // the masks. `t` receives the softcap's tanh (0 without a cap) for the backward's 1 - t^2.
  __device__ __forceinline__ float operator()(float acc, int c, int lo, int hi, bool check, int64_t mask_row,
                                              int64_t mask_step, float slope, float distance, float& t) const {
    if (!kModifiers) {
      t = 0.f;
      return (*this)(acc, c, lo, hi, check, mask_row, mask_step);
    }
    float s;
    if (softcapped()) {
      t = softcap_tanh(acc * cap_in);
      s = t * cap_log2;
    } else {
      t = 0.f;
      s = acc * scale_log2;
    }
    return masked(s - slope * distance, c, lo, hi, check, mask_row, mask_step);
  }
  // the masks and the window on a log2-domain score s
  __device__ __forceinline__ float masked(float s, int c, int lo, int hi, bool check, int64_t mask_row,
                                          int64_t mask_step) const {
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
  // kVarlen: sequence b is a batch of one (bh = hq; i, j within the sequence) keyed by seed + b,
  // the stream of the CPU and Triton packed kernels (attnkern/_varlen_semantics.py), so a mask
  // depends neither on where the sequence sits in the pack nor on the backend.
  __device__ __forceinline__ uint32_t dropout_bh(int64_t b, int hq) const {
    return static_cast<uint32_t>(kVarlen ? hq : b * p.heads_q + hq);
  }
  __device__ __forceinline__ uint64_t dropout_seed() const {
    if constexpr (kVarlen) return seq_seed;
    return p.dropout_seed;
  }
  __device__ __forceinline__ bool keep(uint32_t bh, int64_t i, int64_t j) const {
    const Philox4 r = philox4x32_10(static_cast<uint32_t>(j >> 2), static_cast<uint32_t>(i), bh, 0u, dropout_seed());
    const uint32_t word = (j & 2) ? ((j & 1) ? r.x[3] : r.x[2]) : ((j & 1) ? r.x[1] : r.x[0]);
    return word >= p.dropout_threshold;
  }
  // the pair (i, j), (i, j + 1) for even j: one Philox call serves both
  __device__ __forceinline__ void keep_pair(uint32_t bh, int64_t i, int64_t j, bool& k0, bool& k1) const {
    const Philox4 r = philox4x32_10(static_cast<uint32_t>(j >> 2), static_cast<uint32_t>(i), bh, 0u, dropout_seed());
    const bool hi = (j & 2) != 0;
    k0 = (hi ? r.x[2] : r.x[0]) >= p.dropout_threshold;
    k1 = (hi ? r.x[3] : r.x[1]) >= p.dropout_threshold;
  }
};

}  // namespace cuda
}  // namespace attnkern
