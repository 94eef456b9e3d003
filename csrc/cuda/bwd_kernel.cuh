// The sm80 backward, deterministic and without atomics, in three kernels:
//   delta_kernel  delta = rowsum(dO * O) - dLSE per query row;
//   bwd_kv_kernel a CTA owns kBlockN keys of one kv head and walks the query blocks of every
//                 query head of the group that meet the band: P is recomputed from the LSE and
//                 dV += P^T dO, dK += dS^T Q accumulate in registers, so GQA gradients are summed
//                 over the group without materialising repeated K/V;
//   bwd_q_kernel  a CTA owns a query block and walks its key blocks: dQ += dS K (a second
//                 recompute of S and dP instead of atomics; it also writes the mask gradient).
// Scores with keys as rows (S^T = K Q^T) let the kv pass keep P^T and dS^T in accumulator
// registers and feed them straight back as A operands. In the kModified variant (score.cuh) the
// scores are recomputed with the softcap and ALiBi and dS is taken through the cap (times
// 1 - tanh^2); the sinks need nothing here: the saved LSE holds them (their gradient is
// attnkern/ops.py sink_grad).
//
// The varlen variants of the two passes (Cfg wrapped in Varlen<>, varlen.cuh) take a packed
// batch, kPlain or kModified (softcap, ALiBi, dropout; packed calls have no mask); delta runs on
// it as one batch entry of total_q rows. Their rows' LSE, delta and rare-path statistics are (Hq, total_q) (lse_index).
#pragma once

#include <cmath>

#include "kernel_traits.cuh"
#include "launch.h"
#include "score.cuh"
#include "varlen.cuh"

namespace attnkern {
namespace cuda {

// log2-domain LSE of a row as the backward uses it: +inf for a row with no key (LSE -inf) or
// a padding row, so that exp2(score - lse) is 0 there
__device__ __forceinline__ float backward_lse_log2(const float* lse, int64_t idx, bool valid) {
  if (!valid) return INFINITY;
  const float x = lse[idx];
  return x == -INFINITY ? INFINITY : mask_to_log2(x);  // finite LSEs near -FLT_MAX stay finite
}

// A row's (top, log2 sum) for P = exp2((S - top) - log2 sum): the log2 LSE and 0 as above,
// except, on the rare path (p.row_stats set), for rows whose LSE is huge (mask.h
// backward_row_stats: their fp32 LSE has lost log(sum), so their recomputed max and sum)
__device__ __forceinline__ void backward_row(const AttnParams& p, int64_t idx, bool valid, float& top,
                                             float& log2_sum) {
  top = INFINITY;
  log2_sum = 0.f;
  if (valid) backward_row_stats(p.lse[idx], p.row_stats != nullptr ? p.row_stats + 2 * idx : nullptr, top, log2_sum);
}

template <typename T>
__global__ void __launch_bounds__(128) delta_kernel(const __grid_constant__ AttnParams p) {
  const int64_t rows = p.batch * p.heads_q * p.len_q;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 4 + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  const int64_t i = row % p.len_q, bh = row / p.len_q;
  const int64_t b = bh / p.heads_q, hq = bh % p.heads_q;
  const T* const o = static_cast<const T*>(p.o) + b * p.o_stride[0] + hq * p.o_stride[1] + i * p.o_stride[2];
  const T* const d =
      static_cast<const T*>(p.dout) + b * p.dout_stride[0] + hq * p.dout_stride[1] + i * p.dout_stride[2];
  float acc = 0.f;
  for (int c = lane; c < p.head_dim_v; c += 32) acc += to_float(o[c]) * to_float(d[c]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) p.delta[row] = acc - (p.dlse != nullptr ? p.dlse[row] : 0.f);
}

template <class Cfg, typename T, int kFeatures, bool kDoDK, bool kDoDV>
__global__ void __launch_bounds__(Cfg::kThreads) bwd_kv_kernel(const __grid_constant__ AttnParams p) {
  using KTile = typename Cfg::KTile;
  using QTile = typename Cfg::QTile;
  constexpr int kD = Cfg::kD, kBlockN = Cfg::kBlockN, kBlockM = Cfg::kBlockM, kStages = Cfg::kStages;
  constexpr int kThreads = Cfg::kThreads;
  constexpr int kNT = kBlockM / 8;  // n-tiles of a warp's S^T (query columns)
  constexpr int kDT = kD / 8;
  constexpr bool kVarlen = IsVarlen<Cfg>::value;
  static_assert(kNT * 4 <= 32, "dropout keep bits of a warp's tile fit one word");

  // [K][V][stage 0: Q, dO, log2 LSE, delta, log2 sum][stage 1] ...
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const uint32_t sK = smem_addr(smem_raw);
  check_smem_base(smem_addr(smem_raw));
  const uint32_t sV = sK + KTile::kBytes;
  const uint32_t sStages = sV + KTile::kBytes;
  unsigned char* const stage_bytes = smem_raw + 2 * KTile::kBytes;
  auto stage_lse = [&](int s) {
    return reinterpret_cast<float*>(stage_bytes + s * Cfg::kStageBytes + 2 * QTile::kBytes);
  };
  auto stage_delta = [&](int s) { return stage_lse(s) + kBlockM; };
  auto stage_sum = [&](int s) { return stage_lse(s) + 2 * kBlockM; };

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t b = blockIdx.z;
  const int hkv = blockIdx.y;
  const int group = static_cast<int>(p.heads_q / p.heads_kv);
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kBlockN;
  const SeqSpan<kVarlen> seq(p, b);
  if (kVarlen && n0 >= (kVarlen ? seq.len_k : p.len_k)) return;  // the grid is sized for the longest sequence
  using Rules = ScoreRules<kFeatures, kVarlen>;
  const Rules rules(p, seq);
  const Band& band = rules.band;

  // the query blocks meeting the band of this CTA's keys, walked for each query head of the group
  int64_t m_first, n_mblocks;
  band.row_blocks(n0, min(n0 + kBlockN, (kVarlen ? seq.len_k : p.len_k)), (kVarlen ? seq.len_q : p.len_q), kBlockM,
                  m_first, n_mblocks);
  const int64_t n_iters = group * n_mblocks;

  const T* const k_head = static_cast<const T*>(p.k) + (kVarlen ? seq.k_row0 * p.k_stride[2] : b * p.k_stride[0]) +
                          hkv * p.k_stride[1];
  const T* const v_head = static_cast<const T*>(p.v) + (kVarlen ? seq.k_row0 * p.v_stride[2] : b * p.v_stride[0]) +
                          hkv * p.v_stride[1];
  // V lands at sV = sK + KTile::kBytes (seq.len_k: read only by varlen variants)
  load_seq_kv_block<KTile, kThreads, kVarlen, false>(sK, p, k_head, v_head, n0, seq.len_k, b);
  cp_async_commit();

  const T* const q_batch = static_cast<const T*>(p.q) + b * p.q_stride[0] + seq.q_row0 * p.q_stride[2];
  const T* const do_batch =
      static_cast<const T*>(p.dout) + b * p.dout_stride[0] + seq.q_row0 * p.dout_stride[2];
  auto load_stage = [&](int64_t iter, int s) {
    const int hq = hkv * group + static_cast<int>(iter / n_mblocks);
    const int64_t m0 = m_first + (iter % n_mblocks) * kBlockM;
    const uint32_t dst = sStages + s * Cfg::kStageBytes;
    const T* const q_head = q_batch + hq * p.q_stride[1];
    const T* const do_head = do_batch + hq * p.dout_stride[1];
    load_rows_async<QTile, kThreads>(dst, q_head + m0 * p.q_stride[2], p.q_stride[2],
                                     (kVarlen ? seq.len_q : p.len_q) - m0,
                                     static_cast<int>(p.head_dim), q_head);
    load_rows_async<QTile, kThreads>(dst + QTile::kBytes, do_head + m0 * p.dout_stride[2], p.dout_stride[2],
                                     (kVarlen ? seq.len_q : p.len_q) - m0, static_cast<int>(p.head_dim_v), do_head);
    const int64_t row0 = lse_index<kVarlen>(p, seq.q_row0, b, hq, m0);
    for (int r = tid; r < kBlockM; r += kThreads) {
      const bool valid = m0 + r < (kVarlen ? seq.len_q : p.len_q);
      backward_row(p, row0 + r, valid, stage_lse(s)[r], stage_sum(s)[r]);
      stage_delta(s)[r] = valid ? p.delta[row0 + r] : 0.f;
    }
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_iters) load_stage(s, s);
    cp_async_commit();
  }

  // this warp's 16 keys; fragment rows g and g + 8 are keys j0 + g, j0 + g + 8
  const int64_t j0 = n0 + warp * 16;
  const int64_t warp_rows_lo = band.rows_lo(j0, (kVarlen ? seq.len_q : p.len_q));
  const int64_t warp_rows_hi =
      band.rows_hi(min(j0 + 16, (kVarlen ? seq.len_k : p.len_k)), (kVarlen ? seq.len_q : p.len_q));
  const float inv_keep = rules.dropout() ? 1.f / (1.f - p.dropout_p) : 1.f;
  const typename KTile::Lane k_lane = lane_a<KTile>(sK, warp * 16, lane);
  const typename KTile::Lane v_lane = lane_a<KTile>(sV, warp * 16, lane);
  const typename QTile::Lane q_nk = lane_b_nk<QTile>(sStages, 0, lane);  // Q, dO as B of S^T, dP^T
  const typename QTile::Lane q_kn = lane_b_kn<QTile>(sStages, 0, lane);  // Q, dO as B of dK, dV

  float acc_dk[kDoDK ? kDT : 1][4], acc_dv[kDoDV ? kDT : 1][4];
#pragma unroll
  for (int dt = 0; dt < kDT; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if constexpr (kDoDK) acc_dk[dt][e] = 0.f;
      if constexpr (kDoDV) acc_dv[dt][e] = 0.f;
    }

  for (int64_t iter = 0; iter < n_iters; ++iter) {
    const int it = static_cast<int>(iter % kStages);
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage `it` landed for every thread; the stage read last iteration is free
    if (iter + kStages - 1 < n_iters) load_stage(iter + kStages - 1, static_cast<int>((iter + kStages - 1) % kStages));
    cp_async_commit();

    const int hq = hkv * group + static_cast<int>(iter / n_mblocks);
    const int64_t m0 = m_first + (iter % n_mblocks) * kBlockM;
    const int64_t m_end = min(m0 + kBlockM, (kVarlen ? seq.len_q : p.len_q));
    if (j0 >= (kVarlen ? seq.len_k : p.len_k) || max(warp_rows_lo, m0) >= min(warp_rows_hi, m_end)) continue;
    const bool edge = j0 + 16 > (kVarlen ? seq.len_k : p.len_k) || !band.tile_full(m0, m_end, j0, j0 + 16);
    const bool check = rules.checked(edge);
    const uint32_t q_off = it * Cfg::kStageBytes, do_off = q_off + QTile::kBytes;
    const float* const s_lse = stage_lse(it);
    const float* const s_delta = stage_delta(it);
    const float* const s_sum = stage_sum(it);
    const uint32_t bh = rules.dropout_bh(b, hq);

    // S^T = K Q^T, then P^T = exp2(S^T - lse) inside the window of each key row
    float st[kNT][4];
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) st[nt][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      uint32_t a[4];
      ldmatrix_x4(a, KTile::at(k_lane, 2 * kk, 0));
#pragma unroll
      for (int n2 = 0; n2 < kNT / 2; ++n2) {
        uint32_t bq[4];
        ldmatrix_x4(bq, QTile::at(q_nk, 2 * kk, 16 * n2) + q_off);
        Elem<T>::mma(st[2 * n2], a, bq[0], bq[1]);
        Elem<T>::mma(st[2 * n2 + 1], a, bq[2], bq[3]);
      }
    }
    // dP^T = V dO^T into dpt
    auto v_dout = [&](float(&dpt)[kNT][4]) {
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) dpt[nt][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
        uint32_t a[4];
        ldmatrix_x4(a, KTile::at(v_lane, 2 * kk, 0));
#pragma unroll
        for (int n2 = 0; n2 < kNT / 2; ++n2) {
          uint32_t bo[4];
          ldmatrix_x4(bo, QTile::at(q_nk, 2 * kk, 16 * n2) + do_off);
          Elem<T>::mma(dpt[2 * n2], a, bo[0], bo[1]);
          Elem<T>::mma(dpt[2 * n2 + 1], a, bo[2], bo[3]);
        }
      }
    };
    // kModified: dP^T comes first, so that dS^T = P^T (dP^T * keep / (1 - p) - delta) (1 - tanh^2)
    // is formed with P^T, element by element, and no tanh waits in registers for it
    [[maybe_unused]] float ds_mod[Rules::kModifiers && kDoDK ? kNT : 1][4];
    if constexpr (Rules::kModifiers && kDoDK) v_dout(ds_mod);
    [[maybe_unused]] const float slope = rules.slope_log2(b, hq);  // ALiBi (kModified)
    uint32_t keep_bits = 0xffffffffu;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t j = j0 + (lane >> 2) + 8 * h;
      int lo = 0, hi = kBlockM;
      if (check) rules.key_window(j, m0, kBlockM, lo, hi);
      const int64_t mask_row = rules.mask_offset(b, hq, m0, j);
      // kModified: the ALiBi distance of query column c is |pos0 + c|
      [[maybe_unused]] const float pos0 = Rules::kModifiers ? static_cast<float>(m0 + band.offset - j) : 0.f;
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int col = nt * 8 + 2 * (lane & 3) + c;
          float& x = st[nt][2 * h + c];
          [[maybe_unused]] float t = 0.f;  // kModified: the softcap's tanh
          if constexpr (Rules::kModifiers) {
            x = exp2f((rules(x, col, lo, hi, check, mask_row, p.mask_stride[2], slope, fabsf(pos0 + col), t) -
                       s_lse[col]) - s_sum[col]);
          } else {
            // the max off first, exactly, then log2 sum (0 but on the rare path of huge LSEs)
            x = exp2f((rules(x, col, lo, hi, check, mask_row, p.mask_stride[2]) - s_lse[col]) - s_sum[col]);
          }
          if (rules.dropout() && !rules.keep(bh, m0 + col, j)) keep_bits &= ~(1u << (nt * 4 + 2 * h + c));
          if constexpr (Rules::kModifiers && kDoDK) {  // dS^T through the softcap
            const float keep = (keep_bits >> (nt * 4 + 2 * h + c)) & 1u ? inv_keep : 0.f;
            float& ds = ds_mod[nt][2 * h + c];
            ds = x * (ds * keep - s_delta[col]) * (1.f - t * t);
          }
        }
    }
    auto kept = [&](int nt, int e) -> float { return (keep_bits >> (nt * 4 + e)) & 1u ? inv_keep : 0.f; };

    // dV += (P^T with dropout) dO
    if constexpr (kDoDV) {
#pragma unroll
      for (int k2 = 0; k2 < kBlockM / 16; ++k2) {
        uint32_t a[4];
        acc_to_a_kept<T>(a, st, k2, kept);
        mma_a_tile_kn<QTile, T>(acc_dv, a, q_kn, 16 * k2, do_off);
      }
    }

    // dK += dS^T Q (the softmax scale is applied once at the end)
    auto add_dk = [&](const auto& ds) {  // generic: instantiated only where dK is computed
#pragma unroll
      for (int k2 = 0; k2 < kBlockM / 16; ++k2) {
        uint32_t a[4];
        acc_to_a<T>(a, ds[2 * k2], ds[2 * k2 + 1]);
        mma_a_tile_kn<QTile, T>(acc_dk, a, q_kn, 16 * k2, q_off);
      }
    };
    if constexpr (kDoDK && Rules::kModifiers) {
      add_dk(ds_mod);
    } else if constexpr (kDoDK) {
      // dP^T = V dO^T; dS^T = P^T (dP^T * keep / (1 - p) - delta)
      float dpt[kNT][4];
      v_dout(dpt);
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int c = nt * 8 + 2 * (lane & 3) + (e & 1);
          dpt[nt][e] = st[nt][e] * (dpt[nt][e] * kept(nt, e) - s_delta[c]);
        }
      add_dk(dpt);
    }
  }
  cp_async_wait<0>();

  // every key of the CTA gets its rows written, zeros where no query attends it
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t j = j0 + (lane >> 2) + 8 * h;
    if (j >= (kVarlen ? seq.len_k : p.len_k)) continue;
    const int64_t row = kVarlen ? seq.k_row0 + j : j;
    T* const dk_row = static_cast<T*>(p.dk) + b * p.dk_stride[0] + hkv * p.dk_stride[1] + row * p.dk_stride[2];
    T* const dv_row = static_cast<T*>(p.dv) + b * p.dv_stride[0] + hkv * p.dv_stride[1] + row * p.dv_stride[2];
    if constexpr (kDoDK) store_acc_row(dk_row, acc_dk, h, lane, p.head_dim, p.scale);
    if constexpr (kDoDV) store_acc_row(dv_row, acc_dv, h, lane, p.head_dim_v, 1.f);
  }
}

template <class Cfg, typename T, int kFeatures>
__global__ void __launch_bounds__(Cfg::kThreads) bwd_q_kernel(const __grid_constant__ AttnParams p) {
  using QTile = typename Cfg::QTile;
  using KTile = typename Cfg::KTile;
  constexpr int kD = Cfg::kD, kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kStages = Cfg::kStages;
  constexpr int kThreads = Cfg::kThreads;
  constexpr int kNT = kBlockN / 8;
  constexpr int kDT = kD / 8;
  constexpr uint32_t kStageBytes = 2 * KTile::kBytes;  // K then V
  constexpr bool kVarlen = IsVarlen<Cfg>::value;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  const uint32_t sQ = smem_addr(smem_raw);
  check_smem_base(smem_addr(smem_raw));
  const uint32_t sdO = sQ + QTile::kBytes;
  const uint32_t sKV = sdO + QTile::kBytes;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t b = blockIdx.z;
  const int hq = blockIdx.y;
  const int hkv = hq / static_cast<int>(p.heads_q / p.heads_kv);
  // the last query blocks meet the most keys under a causal band: start them first
  const int64_t m0 = static_cast<int64_t>(gridDim.x - 1 - blockIdx.x) * kBlockM;
  const SeqSpan<kVarlen> seq(p, b);
  if (kVarlen && m0 >= (kVarlen ? seq.len_q : p.len_q)) return;  // the grid is sized for the longest sequence
  const int64_t m_end = min(m0 + kBlockM, (kVarlen ? seq.len_q : p.len_q));
  using Rules = ScoreRules<kFeatures, kVarlen>;
  const Rules rules(p, seq);
  const Band& band = rules.band;

  int64_t key_first, n_blocks;
  band.key_blocks(m0, m_end, kBlockN, key_first, n_blocks);

  const T* const q_head =
      static_cast<const T*>(p.q) + b * p.q_stride[0] + seq.q_row0 * p.q_stride[2] + hq * p.q_stride[1];
  const T* const do_head =
      static_cast<const T*>(p.dout) + b * p.dout_stride[0] + seq.q_row0 * p.dout_stride[2] +
      hq * p.dout_stride[1];
  load_rows_async<QTile, kThreads>(sQ, q_head + m0 * p.q_stride[2], p.q_stride[2], (kVarlen ? seq.len_q : p.len_q) - m0,
                                   static_cast<int>(p.head_dim), q_head);
  load_rows_async<QTile, kThreads>(sdO, do_head + m0 * p.dout_stride[2], p.dout_stride[2],
                                   (kVarlen ? seq.len_q : p.len_q) - m0,
                                   static_cast<int>(p.head_dim_v), do_head);
  cp_async_commit();

  const T* const k_head = static_cast<const T*>(p.k) + (kVarlen ? seq.k_row0 * p.k_stride[2] : b * p.k_stride[0]) +
                          hkv * p.k_stride[1];
  const T* const v_head = static_cast<const T*>(p.v) + (kVarlen ? seq.k_row0 * p.v_stride[2] : b * p.v_stride[0]) +
                          hkv * p.v_stride[1];
  auto load_kv = [&](int64_t blk, int stage) {
    load_seq_kv_block<KTile, kThreads, kVarlen, false>(sKV + stage * kStageBytes, p, k_head, v_head,
                                                       key_first + blk * kBlockN, seq.len_k, b);
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_blocks) load_kv(s, s);
    cp_async_commit();
  }

  // this thread's query rows i = wm0 + g (+ 8), their log2 LSE and delta
  const int64_t wm0 = m0 + warp * 16;
  const int64_t wm_end = min(wm0 + 16, (kVarlen ? seq.len_q : p.len_q));
  const int64_t row_base = lse_index<kVarlen>(p, seq.q_row0, b, hq, 0);
  float row_lse[2], row_sum[2], row_delta[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t i = wm0 + (lane >> 2) + 8 * h;
    backward_row(p, row_base + i, i < (kVarlen ? seq.len_q : p.len_q), row_lse[h], row_sum[h]);
    row_delta[h] = i < (kVarlen ? seq.len_q : p.len_q) ? p.delta[row_base + i] : 0.f;
  }
  const bool warp_has_rows = wm_end > wm0;
  const int64_t warp_key_lo = warp_has_rows ? band.lo(wm0) : 0;
  const int64_t warp_key_hi = warp_has_rows ? band.hi(wm_end - 1) : 0;
  const uint32_t bh = rules.dropout_bh(b, hq);
  const float inv_keep = rules.dropout() ? 1.f / (1.f - p.dropout_p) : 1.f;
  [[maybe_unused]] const float slope = rules.slope_log2(b, hq);  // ALiBi (kModified)
  float* const dmask_head = (kFeatures != kPlain && p.dmask != nullptr) ? p.dmask + row_base * p.len_k : nullptr;
  const typename QTile::Lane q_lane = lane_a<QTile>(sQ, warp * 16, lane);
  const typename QTile::Lane do_lane = lane_a<QTile>(sdO, warp * 16, lane);
  const typename KTile::Lane kv_nk = lane_b_nk<KTile>(sKV, 0, lane);  // K, V as B of S, dP
  const typename KTile::Lane k_kn = lane_b_kn<KTile>(sKV, 0, lane);   // K as B of dQ

  float acc_dq[kDT][4];
#pragma unroll
  for (int dt = 0; dt < kDT; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_dq[dt][e] = 0.f;

  for (int64_t blk = 0; blk < n_blocks; ++blk) {
    const int it = static_cast<int>(blk % kStages);
    cp_async_wait<kStages - 2>();
    __syncthreads();
    if (blk + kStages - 1 < n_blocks) load_kv(blk + kStages - 1, static_cast<int>((blk + kStages - 1) % kStages));
    cp_async_commit();

    const int64_t key0 = key_first + blk * kBlockN;
    if (!warp_has_rows || key0 >= (kVarlen ? seq.len_k : p.len_k) || key0 + kBlockN <= warp_key_lo ||
        key0 >= warp_key_hi)
      continue;
    const bool edge =
        key0 + kBlockN > (kVarlen ? seq.len_k : p.len_k) || !band.tile_full(wm0, wm_end, key0, key0 + kBlockN);
    const bool check = rules.checked(edge);
    const uint32_t k_off = it * kStageBytes, v_off = k_off + KTile::kBytes;

    float s[kNT][4], dp[kNT][4];
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = dp[nt][e] = 0.f;
    // S = Q K^T and dP = dO V^T
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      uint32_t aq[4], ado[4];
      ldmatrix_x4(aq, QTile::at(q_lane, 2 * kk, 0));
      ldmatrix_x4(ado, QTile::at(do_lane, 2 * kk, 0));
#pragma unroll
      for (int n2 = 0; n2 < kNT / 2; ++n2) {
        uint32_t bk[4], bv[4];
        ldmatrix_x4(bk, KTile::at(kv_nk, 2 * kk, 16 * n2) + k_off);
        ldmatrix_x4(bv, KTile::at(kv_nk, 2 * kk, 16 * n2) + v_off);
        Elem<T>::mma(s[2 * n2], aq, bk[0], bk[1]);
        Elem<T>::mma(s[2 * n2 + 1], aq, bk[2], bk[3]);
        Elem<T>::mma(dp[2 * n2], ado, bv[0], bv[1]);
        Elem<T>::mma(dp[2 * n2 + 1], ado, bv[2], bv[3]);
      }
    }
    // dS = P (dP * keep / (1 - p) - delta), P recomputed from the LSE
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t i = wm0 + (lane >> 2) + 8 * h;
      int lo = 0, hi = kBlockN;
      if (check) rules.query_window(i, key0, kBlockN, lo, hi);
      const int64_t mask_row = rules.mask_offset(b, hq, i, key0);
      // kModified: the ALiBi distance of column c is |pos0 - c|
      [[maybe_unused]] const float pos0 = Rules::kModifiers ? static_cast<float>(i + band.offset - key0) : 0.f;
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        const int col = nt * 8 + 2 * (lane & 3);
        bool k0 = true, k1 = true;
        if (rules.dropout()) rules.keep_pair(bh, i, key0 + col, k0, k1);
        [[maybe_unused]] float cap_grad[2];  // kModified: the softcap's 1 - tanh^2
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int e = 2 * h + c;
          float score;
          if constexpr (Rules::kModifiers) {
            float t;
            score = rules(s[nt][e], col + c, lo, hi, check, mask_row, p.mask_stride[3], slope, fabsf(pos0 - (col + c)),
                          t);
            cap_grad[c] = 1.f - t * t;
          } else {
            score = rules(s[nt][e], col + c, lo, hi, check, mask_row, p.mask_stride[3]);
          }
          const float prob = exp2f((score - row_lse[h]) - row_sum[h]);  // row_sum: 0 but on the huge-LSE rare path
          const float keep = (c == 0 ? k0 : k1) ? inv_keep : 0.f;
          s[nt][e] = prob * (dp[nt][e] * keep - row_delta[h]);
        }
        if (dmask_head != nullptr && i < p.len_q) {  // the mask's gradient: dS after the softcap
          float* const dm = dmask_head + i * p.len_k + key0 + col;
          if (key0 + col < p.len_k) dm[0] = s[nt][2 * h];
          if (key0 + col + 1 < p.len_k) dm[1] = s[nt][2 * h + 1];
        }
        if constexpr (Rules::kModifiers) {  // through the softcap to the raw score
          s[nt][2 * h] *= cap_grad[0];
          s[nt][2 * h + 1] *= cap_grad[1];
        }
      }
    }
    // dQ += dS K (scaled once at the end)
#pragma unroll
    for (int k2 = 0; k2 < kNT / 2; ++k2) {
      uint32_t a[4];
      acc_to_a<T>(a, s[2 * k2], s[2 * k2 + 1]);
      mma_a_tile_kn<KTile, T>(acc_dq, a, k_kn, 16 * k2, k_off);
    }
  }
  cp_async_wait<0>();

#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t i = wm0 + (lane >> 2) + 8 * h;
    if (i >= (kVarlen ? seq.len_q : p.len_q)) continue;
    const int64_t row = kVarlen ? seq.q_row0 + i : i;
    T* const dq_row = static_cast<T*>(p.dq) + b * p.dq_stride[0] + hq * p.dq_stride[1] + row * p.dq_stride[2];
    store_acc_row(dq_row, acc_dq, h, lane, p.head_dim, p.scale);
  }
}

}  // namespace cuda
}  // namespace attnkern
