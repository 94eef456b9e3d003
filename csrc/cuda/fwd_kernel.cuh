// The sm80 forward (FlashAttention-2 style): a CTA owns a tile of query rows, each warp 16 of
// them (split-Q: warps never exchange softmax state), and streams the key blocks that meet the
// tile's band through a cp.async ring of K/V stages. S = Q K^T and O += P V are mma.sync
// m16n8k16 with ldmatrix operands; the softmax runs online in the exp2 domain.
//
// Only key blocks meeting the band are visited, and the per-element band test runs only on
// blocks that cross the band's edge, so a window of width W costs O(L * W).
//
// The same kernel is the split-KV decode path (kPacked): its rows are the (query head, query)
// pairs of all heads of one kv head, several warps split each key block, and CTAs split the
// key range; partial outputs are merged by merge_splits_kernel.
//
// kFeatures (score.cuh) selects the plain, masked or modified variant; in the modified one the
// softcap and ALiBi enter the score and each head's sink joins the denominator once, where a row
// is finished (never in a split's partial).
//
// Its varlen variant (Cfg wrapped in Varlen<>, varlen.cuh) serves packed and paged batches, both
// paths: a CTA works on one sequence, with that sequence's lengths and bottom-right band. It is
// instantiated kPlain and kModified (packed calls have no mask; their dropout takes kModified).
#pragma once

#include <cmath>

#include "kernel_traits.cuh"
#include "launch.h"
#include "score.cuh"
#include "varlen.cuh"

namespace attnkern {
namespace cuda {

// Query rows of a forward CTA: local row r is global row row0 + r of `rows_total`.
// Unpacked: the rows are the queries of head hq0. Packed: global row x is query x % len_q of
// head hq0 + x / len_q (hq0 = first query head of the kv head's group).
template <bool kPacked>
struct RowMap {
  int64_t len_q, row0, rows_total;
  int hq0;

  __device__ __forceinline__ bool valid(int r) const { return row0 + r < rows_total; }
  __device__ __forceinline__ int64_t query(int r) const { return kPacked ? (row0 + r) % len_q : row0 + r; }
  __device__ __forceinline__ int head(int r) const {
    return kPacked ? hq0 + static_cast<int>((row0 + r) / len_q) : hq0;
  }
  // [lo, hi): a range of queries that holds those of the valid rows among [r_begin, r_end)
  __device__ __forceinline__ void query_hull(int r_begin, int r_end, int64_t& lo, int64_t& hi) const {
    const int64_t a = row0 + r_begin;
    const int64_t z = min(row0 + r_end, rows_total);
    if (z <= a) {
      lo = hi = 0;
    } else if (!kPacked) {
      lo = a;
      hi = z;
    } else if (a / len_q == (z - 1) / len_q) {
      lo = a % len_q;
      hi = (z - 1) % len_q + 1;
    } else {
      lo = 0;
      hi = len_q;
    }
  }
};

// Writes one finished row: the final output (unsplit) or a split's partial output. Packed
// (kVarlen): query i of the sequence is row q_row0 + i, LSE and partials are (Hq, total_q).
template <typename T, bool kVarlen = false>
struct RowWriter {
  const AttnParams& p;
  const FwdSplit& split;
  int split_idx;
  int64_t b;
  int64_t q_row0 = 0;

  // lse_index (varlen.cuh) and the row counts written out: see SeqSpan on why
  __device__ __forceinline__ int64_t row_index(int hq, int64_t i) const {
    return kVarlen ? hq * p.total_q + q_row0 + i : (b * p.heads_q + hq) * p.len_q + i;
  }

  // columns col, col + 1 (col even, < head_dim_v) of row (hq, i)
  __device__ __forceinline__ void out2(int hq, int64_t i, int col, float v0, float v1) const {
    if (split.num_splits > 1) {
      const int64_t rows = kVarlen ? p.heads_q * p.total_q : p.batch * p.heads_q * p.len_q;
      float2* dst =
          reinterpret_cast<float2*>(split.o_partial + ((split_idx * rows + row_index(hq, i)) * p.head_dim_v + col));
      *dst = make_float2(v0, v1);
    } else {
      T* dst = static_cast<T*>(p.o) + b * p.o_stride[0] + hq * p.o_stride[1] +
               (kVarlen ? q_row0 + i : i) * p.o_stride[2] + col;
      *reinterpret_cast<uint32_t*>(dst) = Elem<T>::pack(v0, v1);
    }
  }
  // a finished row's natural-log LSE (kModified: with the sink in it); never a split's partial
  __device__ __forceinline__ void lse(int hq, int64_t i, float v) const { p.lse[row_index(hq, i)] = v; }
  // the row's softmax statistics in the log2 domain, max m2 and sum l: the LSE (natural log, -inf
  // without keys), or a split's (m2, l) itself for merge_splits_kernel, since an fp32 LSE next to
  // a huge max has lost log(l) and would weigh the splits wrongly
  __device__ __forceinline__ void stats(int hq, int64_t i, float m2, float l) const {
    if (split.num_splits > 1) {
      const int64_t rows = kVarlen ? p.heads_q * p.total_q : p.batch * p.heads_q * p.len_q;
      float* const dst = split.lse_partial + 2 * (split_idx * rows + row_index(hq, i));
      // a NaN l (a NaN score: fmaxf left m2 at the other scores' max, -inf when all are NaN)
      // carries NaN in m2 too, so that the merge's max sees it
      dst[0] = l != l ? l : m2;
      dst[1] = l;
    } else {
      p.lse[row_index(hq, i)] = l != 0.f ? (m2 + log2f(l)) * kLn2 : -INFINITY;
    }
  }
};

template <class Cfg, typename T, int kFeatures, bool kPacked>
__global__ void __launch_bounds__(Cfg::kThreads)
    fwd_kernel(const __grid_constant__ AttnParams p, const __grid_constant__ FwdSplit split) {
  using QTile = typename Cfg::QTile;
  using KTile = typename Cfg::KTile;
  constexpr int kD = Cfg::kD, kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kWarpN = Cfg::kWarpN;
  constexpr int kMT = Cfg::kWarpMTiles, kStages = Cfg::kStages, kThreads = Cfg::kThreads;
  constexpr int kNT = kWarpN / 8;                      // n-tiles of a warp's S
  constexpr int kDT = kD / 8;                          // n-tiles of a warp's O
  constexpr uint32_t kStageBytes = 2 * KTile::kBytes;  // K then V
  constexpr bool kVarlen = IsVarlen<Cfg>::value;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  const uint32_t sQ = smem_addr(smem_raw);
  const uint32_t sKV = sQ + QTile::kBytes;
  check_smem_base(smem_addr(smem_raw));

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int row_warp = warp / Cfg::kKeySplit, key_slice = warp % Cfg::kKeySplit;
  const int64_t b = blockIdx.z;
  const int group = static_cast<int>(p.heads_q / p.heads_kv);
  const SeqSpan<kVarlen> seq(p, b);

  int split_idx, hkv;
  RowMap<kPacked> rows;
  if (kPacked) {
    split_idx = blockIdx.x % split.num_splits;
    hkv = blockIdx.y;
    rows = {(kVarlen ? seq.len_q : p.len_q), static_cast<int64_t>(blockIdx.x / split.num_splits) * kBlockM,
            group * (kVarlen ? seq.len_q : p.len_q), hkv * group};
  } else {
    split_idx = 0;
    hkv = blockIdx.y / group;
    // the last query blocks meet the most keys under a causal band: start them first
    rows = {(kVarlen ? seq.len_q : p.len_q), static_cast<int64_t>(gridDim.x - 1 - blockIdx.x) * kBlockM,
            (kVarlen ? seq.len_q : p.len_q), static_cast<int>(blockIdx.y)};
  }
  if (kVarlen && !rows.valid(0)) return;  // the grid is sized for the longest sequence
  using Rules = ScoreRules<kFeatures, kVarlen>;
  const Rules rules(p, seq);
  const Band& band = rules.band;

  // key blocks [blk_begin, blk_end) of kBlockN keys starting at key_first: those meeting the
  // band of any row of the tile, cut into num_splits ranges when splitting
  int64_t cta_lo, cta_hi;
  rows.query_hull(0, kBlockM, cta_lo, cta_hi);
  int64_t key_first, n_blocks;
  band.key_blocks(cta_lo, cta_hi, kBlockN, key_first, n_blocks);
  int64_t blk_begin = 0, blk_end = n_blocks;
  if (kPacked && split.num_splits > 1) {
    const int64_t per = (n_blocks + split.num_splits - 1) / split.num_splits;
    blk_begin = min(n_blocks, split_idx * per);
    blk_end = min(n_blocks, blk_begin + per);
  }

  // ---- loads: Q once, K/V blocks through the ring
  const T* const q_batch = static_cast<const T*>(p.q) + b * p.q_stride[0] + seq.q_row0 * p.q_stride[2];
  if constexpr (kPacked) {
    load_tile_async<QTile, kThreads>(
        sQ,
        [&](int r) -> const T* {
          return rows.valid(r) ? q_batch + rows.head(r) * p.q_stride[1] + rows.query(r) * p.q_stride[2] : nullptr;
        },
        static_cast<int>(p.head_dim), q_batch);
  } else {
    load_rows_async<QTile, kThreads>(sQ, q_batch + rows.hq0 * p.q_stride[1] + rows.row0 * p.q_stride[2], p.q_stride[2],
                                     (kVarlen ? seq.len_q : p.len_q) - rows.row0, static_cast<int>(p.head_dim),
                                     q_batch);
  }
  cp_async_commit();

  const T* const k_head = static_cast<const T*>(p.k) + (kVarlen ? seq.k_row0 * p.k_stride[2] : b * p.k_stride[0]) +
                          hkv * p.k_stride[1];
  const T* const v_head = static_cast<const T*>(p.v) + (kVarlen ? seq.k_row0 * p.v_stride[2] : b * p.v_stride[0]) +
                          hkv * p.v_stride[1];
  auto load_kv = [&](int64_t blk, int stage) {
    load_seq_kv_block<KTile, kThreads, kVarlen>(sKV + stage * kStageBytes, p, k_head, v_head,
                                                key_first + blk * kBlockN, seq.len_k, b);
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (blk_begin + s < blk_end) load_kv(blk_begin + s, s);
    cp_async_commit();  // empty groups keep the wait_group arithmetic uniform
  }

  // ---- this warp's rows and key slice; fragment rows g and g + 8 of 16-row block mt are
  // local rows warp_row0 + 16 mt + g (+ 8), g = lane / 4
  const int warp_row0 = row_warp * 16 * kMT;
  const int slice = key_slice * kWarpN;  // first row of this warp's keys in the K/V tiles
  int64_t warp_lo, warp_hi;
  rows.query_hull(warp_row0, warp_row0 + 16 * kMT, warp_lo, warp_hi);
  const bool warp_has_rows = warp_hi > warp_lo;
  const int64_t warp_key_lo = warp_has_rows ? band.lo(warp_lo) : 0;
  const int64_t warp_key_hi = warp_has_rows ? band.hi(warp_hi - 1) : 0;
  auto local_row = [&](int mt, int h) { return warp_row0 + mt * 16 + (lane >> 2) + 8 * h; };
  int64_t row_q[kMT][2];  // query index and head of this thread's rows (a division when packed)
  int row_hq[kMT][2];
  [[maybe_unused]] float row_slope[Rules::kModifiers ? kMT : 1][2];  // their ALiBi slopes (log2 units)
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = local_row(mt, h);
      row_q[mt][h] = rows.valid(r) ? rows.query(r) : (kVarlen ? seq.len_q : p.len_q);  // len_q: a padding row, no keys
      row_hq[mt][h] = rows.head(r);
      // (a padding row of a packed tile may name a head past the last: no slope read for it)
      if constexpr (Rules::kModifiers) row_slope[mt][h] = rows.valid(r) ? rules.slope_log2(b, row_hq[mt][h]) : 0.f;
    }

  const typename QTile::Lane q_lane = lane_a<QTile>(sQ, warp_row0, lane);
  const typename KTile::Lane k_lane = lane_b_nk<KTile>(sKV, slice, lane);
  const typename KTile::Lane v_lane = lane_b_kn<KTile>(sKV + KTile::kBytes, slice, lane);

  float acc_o[kMT][kDT][4];
  float row_max[kMT][2], row_sum[kMT][2];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[mt][dt][e] = 0.f;
    row_max[mt][0] = row_max[mt][1] = -INFINITY;
    row_sum[mt][0] = row_sum[mt][1] = 0.f;
  }

  for (int64_t blk = blk_begin; blk < blk_end; ++blk) {
    const int it = static_cast<int>(blk - blk_begin);
    cp_async_wait<kStages - 2>();
    __syncthreads();  // block `blk` landed for every thread; stage (it - 1) % kStages is free
    if (blk + kStages - 1 < blk_end) load_kv(blk + kStages - 1, (it + kStages - 1) % kStages);
    cp_async_commit();

    const int64_t key0 = key_first + blk * kBlockN + slice;
    if (!warp_has_rows || key0 >= (kVarlen ? seq.len_k : p.len_k) || key0 + kWarpN <= warp_key_lo ||
        key0 >= warp_key_hi)
      continue;
    const bool edge =
        key0 + kWarpN > (kVarlen ? seq.len_k : p.len_k) || !band.tile_full(warp_lo, warp_hi, key0, key0 + kWarpN);
    const uint32_t stage_off = (it % kStages) * kStageBytes;

    // S = Q K^T over this warp's rows and key slice
    float s[kMT][kNT][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][nt][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      uint32_t a[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) ldmatrix_x4(a[mt], QTile::at(q_lane, 2 * kk, 16 * mt));
#pragma unroll
      for (int n2 = 0; n2 < kNT / 2; ++n2) {
        uint32_t bk[4];
        ldmatrix_x4(bk, KTile::at(k_lane, 2 * kk, 16 * n2) + stage_off);
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          Elem<T>::mma(s[mt][2 * n2], a[mt], bk[0], bk[1]);
          Elem<T>::mma(s[mt][2 * n2 + 1], a[mt], bk[2], bk[3]);
        }
      }
    }

    // scores, then the online softmax: rescale O and the running sum to the new row max
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t i = row_q[mt][h];
        const int hq = row_hq[mt][h];
        int lo = 0, hi = kWarpN;
        if (rules.checked(edge)) rules.query_window(i, key0, kWarpN, lo, hi);
        const int64_t mask_row = rules.mask_offset(b, hq, i, key0);
        // kModified: the ALiBi distance of column c is |pos0 - c| (float, as the CPU kernels)
        [[maybe_unused]] const float pos0 = Rules::kModifiers ? static_cast<float>(i + band.offset - key0) : 0.f;
        float mx = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            float& x = s[mt][nt][2 * h + c];
            const int col = nt * 8 + 2 * (lane & 3) + c;
            if constexpr (Rules::kModifiers) {
              float t;
              x = rules(x, col, lo, hi, rules.checked(edge), mask_row, p.mask_stride[3], row_slope[mt][h],
                        fabsf(pos0 - col), t);
            } else {
              x = rules(x, col, lo, hi, rules.checked(edge), mask_row, p.mask_stride[3]);
            }
            mx = fmaxf(mx, x);
          }
        mx = quad_max(mx);
        const float m_new = fmaxf(row_max[mt][h], mx);
        const float m_use = m_new == -INFINITY ? 0.f : m_new;  // a row with no key yet stays at 0
        const float alpha = exp2f(row_max[mt][h] - m_use);
        row_max[mt][h] = m_new;
        row_sum[mt][h] *= alpha;
#pragma unroll
        for (int dt = 0; dt < kDT; ++dt) {
          acc_o[mt][dt][2 * h] *= alpha;
          acc_o[mt][dt][2 * h + 1] *= alpha;
        }
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            float& x = s[mt][nt][2 * h + c];
            x = exp2f(x - m_use);
            sum += x;
          }
        row_sum[mt][h] += sum;  // per-thread partial; the quad's sum is taken once at the end
        // dropout (never on the split-KV decode path, kPacked: takes_decode_path); the sum above is
        // of the undropped weights, as softmax needs
        if (!kPacked && rules.dropout()) {
          const uint32_t bh = rules.dropout_bh(b, hq);
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt) {
            bool k0, k1;
            rules.keep_pair(bh, i, key0 + nt * 8 + 2 * (lane & 3), k0, k1);
            if (!k0) s[mt][nt][2 * h] = 0.f;
            if (!k1) s[mt][nt][2 * h + 1] = 0.f;
          }
        }
      }

    // O += P V, P straight from the S accumulators (one V fragment serves every 16-row block)
#pragma unroll
    for (int k2 = 0; k2 < kWarpN / 16; ++k2) {
      uint32_t a[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) acc_to_a<T>(a[mt], s[mt][2 * k2], s[mt][2 * k2 + 1]);
#pragma unroll
      for (int d2 = 0; d2 < kD / 16; ++d2) {
        uint32_t bv[4];
        ldmatrix_x4_trans(bv, KTile::at(v_lane, 2 * d2, 16 * k2) + stage_off);
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          Elem<T>::mma(acc_o[mt][2 * d2], a[mt], bv[0], bv[1]);
          Elem<T>::mma(acc_o[mt][2 * d2 + 1], a[mt], bv[2], bv[3]);
        }
      }
    }
  }

  // ---- epilogue: O / l (times 1/(1-p) under dropout), LSE = ln(sum) + max; empty rows 0, -inf
  cp_async_wait<0>();  // nothing may be in flight into shared memory past this point
  const float keep_scale = rules.dropout() ? 1.f / (1.f - p.dropout_p) : 1.f;
  const RowWriter<T, kVarlen> out{p, split, split_idx, b, seq.q_row0};
  const int dv = static_cast<int>(p.head_dim_v);
  if constexpr (Cfg::kKeySplit == 1) {
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float l = quad_sum(row_sum[mt][h]);
        if (!rows.valid(local_row(mt, h))) continue;
        const int hq = row_hq[mt][h];
        const int64_t i = row_q[mt][h];
        if constexpr (Rules::kModifiers) {  // the prefill path never splits: the sink joins here
          const RowTotal total = row_total(row_max[mt][h], l, split.num_splits == 1 ? rules.sink(hq) : -INFINITY);
          const float inv = keep_scale * total.inv_l;
#pragma unroll
          for (int dt = 0; dt < kDT; ++dt) {
            const int col = dt * 8 + 2 * (lane & 3);
            if (col < dv) out.out2(hq, i, col, acc_o[mt][dt][2 * h] * inv, acc_o[mt][dt][2 * h + 1] * inv);
          }
          if ((lane & 3) == 0) {
            if (split.num_splits > 1)
              out.stats(hq, i, row_max[mt][h], l);  // a split's partial: no sink in it
            else
              out.lse(hq, i, total.lse);
          }
        } else {
          const float inv = l != 0.f ? keep_scale / l : 0.f;
#pragma unroll
          for (int dt = 0; dt < kDT; ++dt) {
            const int col = dt * 8 + 2 * (lane & 3);
            if (col < dv) out.out2(hq, i, col, acc_o[mt][dt][2 * h] * inv, acc_o[mt][dt][2 * h + 1] * inv);
          }
          if ((lane & 3) == 0) out.stats(hq, i, row_max[mt][h], l);
        }
        // the backward's rare path (params.h row_stats): the keys' statistics (its recomputing
        // forward has no sinks; mask.h backward_row_stats adds a sink's mass back)
        if ((lane & 3) == 0 && p.row_stats != nullptr) {
          float* const stats = p.row_stats + 2 * out.row_index(hq, i);
          stats[0] = l != 0.f ? row_max[mt][h] : INFINITY;
          stats[1] = l != 0.f ? log2f(l) : 0.f;
        }
      }
  } else {
    // key-split warps: each writes its normalised rows and its (max, sum), then the CTA merges
    // the slices by their sums (not by an fp32 LSE each, which next to a huge max has lost log(l))
    __syncthreads();  // every warp is done with the K/V stages, which now hold the merge buffers
    float* const merge_o = reinterpret_cast<float*>(smem_raw + QTile::kBytes);  // [slice][row][kD]
    float* const merge_max = merge_o + Cfg::kKeySplit * kBlockM * kD;           // [slice][row]
    float* const merge_sum = merge_max + Cfg::kKeySplit * kBlockM;              // [slice][row]
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float l = quad_sum(row_sum[mt][h]);
        const int r = local_row(mt, h);
        const float inv = l != 0.f ? keep_scale / l : 0.f;
        float* const dst = merge_o + (key_slice * kBlockM + r) * kD;
#pragma unroll
        for (int dt = 0; dt < kDT; ++dt) {
          const int col = dt * 8 + 2 * (lane & 3);
          dst[col] = acc_o[mt][dt][2 * h] * inv;
          dst[col + 1] = acc_o[mt][dt][2 * h + 1] * inv;
        }
        if ((lane & 3) == 0) {
          // (a NaN l, from a NaN score, goes in as a NaN max too: see RowWriter::stats)
          merge_max[key_slice * kBlockM + r] = l != 0.f ? (l != l ? l : row_max[mt][h]) : -INFINITY;
          merge_sum[key_slice * kBlockM + r] = l;
        }
      }
    __syncthreads();
    for (int idx = tid; idx < kBlockM * (kD / 2); idx += kThreads) {
      const int r = idx / (kD / 2), col = 2 * (idx % (kD / 2));
      if (!rows.valid(r) || col >= dv) continue;
      float m = -INFINITY;  // NaN (a NaN score) propagates through m or a slice's sum
#pragma unroll
      for (int sl = 0; sl < Cfg::kKeySplit; ++sl) m = nan_max(m, merge_max[sl * kBlockM + r]);
      // the sink joins the denominator once: here when the CTA writes the final row, else in
      // merge_splits_kernel (in the log2 domain of the slices' max)
      [[maybe_unused]] const float sink2 =
          Rules::kModifiers && split.num_splits == 1 ? rules.sink(rows.head(r)) * kLog2e : -INFINITY;
      // a sink of +inf takes all the weight: output 0, lse +inf (row_total); not over a NaN or
      // +inf score (the slices' max), which makes the row NaN as without a sink
      const bool sink_takes_all = sink2 == INFINITY && m == m && m != INFINITY;
      if constexpr (Rules::kModifiers) m = nan_max(m, sink2);
      float v0 = 0.f, v1 = 0.f, total = 0.f;
      if (sink_takes_all) {
        total = 1.f;
      } else if (m != -INFINITY) {
        if constexpr (Rules::kModifiers) total = exp2f(sink2 - m);
#pragma unroll
        for (int sl = 0; sl < Cfg::kKeySplit; ++sl) {
          const float l = merge_sum[sl * kBlockM + r];
          if (l == 0.f) continue;
          const float w = l * exp2f(merge_max[sl * kBlockM + r] - m);
          const float* src = merge_o + (sl * kBlockM + r) * kD + col;
          v0 += w * src[0];
          v1 += w * src[1];
          total += w;
        }
        v0 /= total;
        v1 /= total;
      }
      const int hq = rows.head(r);
      const int64_t i = rows.query(r);
      out.out2(hq, i, col, v0, v1);
      if (col == 0) out.stats(hq, i, m, total);
    }
  }
}

// Merges split-KV partials from each split's (max, sum) in the log2 domain:
// out = sum_s w_s o_s / sum_s w_s with w_s = l_s 2^(m_s - m), lse = (m + log2 sum_s w_s) ln 2.
// One warp per (b, hq, i) row. kSinks (p.sinks set): the head's sink joins the sum once, as one
// more term that contributes no value.
template <typename T, bool kSinks>
__global__ void __launch_bounds__(128)
    merge_splits_kernel(const __grid_constant__ AttnParams p, const __grid_constant__ FwdSplit split) {
  const int64_t rows = p.batch * p.heads_q * p.len_q;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 4 + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  const float sink2 = kSinks ? p.sinks[row / p.len_q % p.heads_q] * kLog2e : -INFINITY;
  const float* const part = split.lse_partial + 2 * row;  // split s: (m2, l) at part[2 * s * rows]
  float m = -INFINITY;
  for (int s = lane; s < split.num_splits; s += 32)
    if (part[2 * s * rows + 1] != 0.f) m = nan_max(m, part[2 * s * rows]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = nan_max(m, __shfl_xor_sync(0xffffffffu, m, o));
  // a sink of +inf takes all the weight: output 0, lse +inf (row_total); not over a NaN or +inf
  // score (the parts' max), which makes the row NaN as without a sink
  const bool sink_takes_all = sink2 == INFINITY && m == m && m != INFINITY;
  if (kSinks) m = nan_max(m, sink2);
  float total = 0.f;
  if (sink_takes_all) {
    total = 1.f;
  } else if (m != -INFINITY) {
    if (kSinks) total = exp2f(sink2 - m);
    for (int s = 0; s < split.num_splits; ++s)
      if (part[2 * s * rows + 1] != 0.f) total += part[2 * s * rows + 1] * exp2f(part[2 * s * rows] - m);
  }
  const int64_t i = row % p.len_q, bh = row / p.len_q;
  const int64_t b = bh / p.heads_q, hq = bh % p.heads_q;
  T* const o_row = static_cast<T*>(p.o) + b * p.o_stride[0] + hq * p.o_stride[1] + i * p.o_stride[2];
  for (int col = lane; col < p.head_dim_v; col += 32) {
    float acc = 0.f;
    if (m != -INFINITY) {
      for (int s = 0; s < split.num_splits; ++s) {
        const float l = part[2 * s * rows + 1];
        if (l == 0.f) continue;
        acc += l * exp2f(part[2 * s * rows] - m) * split.o_partial[(s * rows + row) * p.head_dim_v + col];
      }
      acc /= total;
    }
    o_row[col] = from_float<T>(acc);
  }
  if (lane == 0) p.lse[row] = m == -INFINITY ? -INFINITY : (m + log2f(total)) * kLn2;
}

}  // namespace cuda
}  // namespace attnkern
