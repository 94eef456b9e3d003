// The Hopper backward (sm_90a), deterministic and without atomics like the sm80 one
// (bwd_kernel.cuh), with the producer/consumer warpgroups of the Hopper forward:
//   bwd_kv_sm90_kernel  a CTA owns 128 keys of one kv head (K and V loaded once, 64 keys per
//                       consumer warpgroup) and streams the Q and dO blocks of every query head
//                       of the group that meet the band: S^T = K Q^T and dP^T = V dO^T by wgmma
//                       from shared memory, P^T = exp2(S^T - lse), dS^T = P^T (dP^T - delta),
//                       then dV += P^T dO and dK += dS^T Q by wgmma with P^T, dS^T from
//                       registers and dO, Q read MN-major;
//   bwd_q_sm90_kernel   a CTA owns 128 queries (Q and dO loaded once) and streams the K and V
//                       blocks of their band: S, dP, dS as above, dQ += dS K.
// delta = rowsum(dO * O) - dLSE comes from bwd_kernel.cuh's delta_kernel. Served: head-dim
// buckets 64 and 128, fp16/bf16; with kFeatures bool/float masks (and the float mask's
// gradient, written by the dQ pass) and dropout.
#pragma once

#include <cmath>
#include <type_traits>

#include "bwd_kernel.cuh"
#include "sm90_tile.cuh"

namespace attnkern {
namespace cuda {

template <class Cfg, typename T, bool kFeatures>
__global__ void __launch_bounds__(Cfg::kThreads, 1)
    bwd_kv_sm90_kernel(const __grid_constant__ AttnParams p, const __grid_constant__ Sm90Maps maps) {
#if !ATTNKERN_SM90_BODY
  __trap();
#else
  using Smem = typename Cfg::Ring;
  using OwnTile = typename Smem::OwnTile;
  using StreamTile = typename Smem::StreamTile;
  constexpr int kD = Cfg::kD, kStages = Cfg::kStages, kM = Cfg::kStreamRows;  // kM queries per stage
  constexpr int kNT = kM / 8, kDT = kD / 8;
  static_assert(kNT * 4 <= 32, "dropout keep bits of a thread's tile fit one word");
  constexpr bool kBf16 = !std::is_same<T, __half>::value;

  extern __shared__ __align__(128) unsigned char smem_raw[];  // aligned up to 1024 by Smem
  const Smem sm(smem_addr(smem_raw));
  const int tid = threadIdx.x, warpgroup = tid / 128;
  const int64_t b = blockIdx.z;
  const int hkv = blockIdx.y;
  const int group = static_cast<int>(p.heads_q / p.heads_kv);
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * Cfg::kOwnRows;
  const ScoreRules<kFeatures> rules(p);
  const Band& band = rules.band;

  // the query blocks meeting the band of this CTA's keys, walked for each query head of the group
  int64_t m_first, n_mblocks;
  band.row_blocks(n0, min(n0 + Cfg::kOwnRows, p.len_k), p.len_q, kM, m_first, n_mblocks);
  const int64_t n_iters = group * n_mblocks;
  auto stream_at = [&](int64_t it, int64_t& m0, int& hq) {
    hq = hkv * group + static_cast<int>(it / n_mblocks);
    m0 = m_first + (it % n_mblocks) * kM;
  };

  if (!sm.start(maps.k, maps.v, n0, hkv, maps.q, maps.dout, n_iters, b, stream_at)) return;

  const int consumer = warpgroup - 1;
  const int lane = tid & 31, warp = (tid % 128) / 32;
  const int64_t wj0 = n0 + 64 * consumer;  // this warpgroup's first key
  const int64_t wj_lo = min(wj0, p.len_k), wj_hi = min(wj0 + 64, p.len_k);
  const bool wg_has_keys = wj_hi > wj_lo;
  const int64_t wg_rows_lo = wg_has_keys ? band.rows_lo(wj_lo, p.len_q) : 0;
  const int64_t wg_rows_hi = wg_has_keys ? band.rows_hi(wj_hi, p.len_q) : 0;
  int64_t key_j[2];  // this thread's keys: fragment rows g and g + 8 of its warp
  for (int h = 0; h < 2; ++h) key_j[h] = wj0 + 16 * warp + (lane >> 2) + 8 * h;

  const float inv_keep = rules.dropout() ? 1.f / (1.f - p.dropout_p) : 1.f;
  float acc_dk[kDT][4], acc_dv[kDT][4];
#pragma unroll
  for (int dt = 0; dt < kDT; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_dk[dt][e] = acc_dv[dt][e] = 0.f;
  float(&dk_flat)[kD / 2] = *reinterpret_cast<float(*)[kD / 2]>(&acc_dk[0][0]);
  float(&dv_flat)[kD / 2] = *reinterpret_cast<float(*)[kD / 2]>(&acc_dv[0][0]);

  if (n_iters > 0) mbar_wait(sm.bar_own, 0);
  for (int64_t it = 0; it < n_iters; ++it) {
    const int s = static_cast<int>(it % kStages);
    const uint32_t phase = static_cast<uint32_t>((it / kStages) & 1);
    int64_t m0;
    int hq;
    stream_at(it, m0, hq);
    const int64_t m_end = min(m0 + kM, p.len_q);
    mbar_wait(sm.full0(s), phase);
    if (!wg_has_keys || max(wg_rows_lo, m0) >= min(wg_rows_hi, m_end)) {
      mbar_wait(sm.full1(s), phase);  // a stage is released only once seen full
      mbar_arrive(sm.empty(s));
      continue;
    }
    const bool edge = wj0 + 64 > p.len_k || !band.tile_full(m0, m_end, wj0, wj0 + 64);

    // S^T = K Q^T, then dP^T = V dO^T, both in flight while P^T is formed
    float st[kNT][4], dpt[kNT][4];
    float(&st_flat)[kM / 2] = *reinterpret_cast<float(*)[kM / 2]>(&st[0][0]);
    float(&dpt_flat)[kM / 2] = *reinterpret_cast<float(*)[kM / 2]>(&dpt[0][0]);
    const uint32_t k_tile = opaque(sm.own0), v_tile = opaque(sm.own1);  // see opaque()
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk)
      wgmma_ss<kM, kBf16>(st_flat, OwnTile::k_major(k_tile, 64 * consumer, kk), StreamTile::k_major(sm.stream0(s), 0, kk),
                          kk > 0);
    wgmma_commit();
    mbar_wait(sm.full1(s), phase);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk)
      wgmma_ss<kM, kBf16>(dpt_flat, OwnTile::k_major(v_tile, 64 * consumer, kk),
                          StreamTile::k_major(sm.stream1(s), 0, kk), kk > 0);
    wgmma_commit();

    const int64_t row_base = (b * p.heads_q + hq) * p.len_q + m0;  // lse/delta index of query m0
    const bool check = rules.checked(edge);
    wgmma_wait<1>();
    fence_operands(st_flat);
    uint32_t keep_bits = 0xffffffffu;  // dropout: bit nt * 4 + e clear where st[nt][e] is dropped
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      int lo = 0, hi = kM;
      if (check) rules.key_window(key_j[h], m0, kM, lo, hi);
      const int64_t mask_row = rules.mask_offset(b, hq, m0, key_j[h]);
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int col = nt * 8 + 2 * (lane & 3) + c;
          float& x = st[nt][2 * h + c];
          x = exp2f(rules(x, col, lo, hi, check, mask_row, p.mask_stride[2]) -
                    backward_lse_log2(p.lse, row_base + col, m0 + col < p.len_q));
          if (rules.dropout() && !rules.keep(static_cast<uint32_t>(b * p.heads_q + hq), m0 + col, key_j[h]))
            keep_bits &= ~(1u << (nt * 4 + 2 * h + c));
        }
    }
    auto kept = [&](int nt, int e) -> float { return (keep_bits >> (nt * 4 + e)) & 1u ? inv_keep : 0.f; };
    wgmma_wait<0>();
    fence_operands(dpt_flat);
    // dS^T = P^T (dP^T keep / (1 - p) - delta), the dropped P^T for dV; the softmax scale is
    // applied to dK once at the end
    // (the order of the three steps below is the one that spills least with CUDA 13.0: with
    // features P^T's fragments first, without them last)
    uint32_t pa[kM / 16][4], dsa[kM / 16][4];
    auto p_fragments = [&]() {
#pragma unroll
      for (int k2 = 0; k2 < kM / 16; ++k2) acc_to_a_kept<T>(pa[k2], st, k2, kept);
    };
    if constexpr (kFeatures) p_fragments();
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = nt * 8 + 2 * (lane & 3) + (e & 1);
        dpt[nt][e] = st[nt][e] * (dpt[nt][e] * kept(nt, e) - (m0 + col < p.len_q ? p.delta[row_base + col] : 0.f));
      }
    if constexpr (!kFeatures) p_fragments();
#pragma unroll
    for (int k2 = 0; k2 < kM / 16; ++k2) acc_to_a<T>(dsa[k2], dpt[2 * k2], dpt[2 * k2 + 1]);
    // dV += P^T dO and dK += dS^T Q: dO and Q read MN-major (the queries are the reduction)
    fence_operands(dv_flat);
    fence_operands(dk_flat);
    wgmma_fence();
#pragma unroll
    for (int k2 = 0; k2 < kM / 16; ++k2) wgmma_rs<kD, kBf16>(dv_flat, pa[k2], StreamTile::mn_major(sm.stream1(s), k2), true);
#pragma unroll
    for (int k2 = 0; k2 < kM / 16; ++k2) wgmma_rs<kD, kBf16>(dk_flat, dsa[k2], StreamTile::mn_major(sm.stream0(s), k2), true);
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands(dv_flat);
    fence_operands(dk_flat);
    mbar_arrive(sm.empty(s));  // every product has read stage s
  }

  // every key of the CTA gets its rows written, zeros where no query attends it
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t j = key_j[h];
    if (j >= p.len_k) continue;
    T* const dk_row = static_cast<T*>(p.dk) + b * p.dk_stride[0] + hkv * p.dk_stride[1] + j * p.dk_stride[2];
    T* const dv_row = static_cast<T*>(p.dv) + b * p.dv_stride[0] + hkv * p.dv_stride[1] + j * p.dv_stride[2];
    store_acc_row(dk_row, acc_dk, h, lane, p.head_dim, p.scale);
    store_acc_row(dv_row, acc_dv, h, lane, p.head_dim_v, 1.f);
  }
#endif
}

template <class Cfg, typename T, bool kFeatures>
__global__ void __launch_bounds__(Cfg::kThreads, 1)
    bwd_q_sm90_kernel(const __grid_constant__ AttnParams p, const __grid_constant__ Sm90Maps maps) {
#if !ATTNKERN_SM90_BODY
  __trap();
#else
  using Smem = typename Cfg::Ring;
  using OwnTile = typename Smem::OwnTile;
  using StreamTile = typename Smem::StreamTile;
  constexpr int kD = Cfg::kD, kStages = Cfg::kStages, kN = Cfg::kStreamRows;  // kN keys per stage
  constexpr int kNT = kN / 8, kDT = kD / 8;
  constexpr bool kBf16 = !std::is_same<T, __half>::value;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  const Smem sm(smem_addr(smem_raw));
  const int tid = threadIdx.x, warpgroup = tid / 128;
  const int64_t b = blockIdx.z;
  const int hq = blockIdx.y;
  const int hkv = hq / static_cast<int>(p.heads_q / p.heads_kv);
  // the last query blocks meet the most keys under a causal band: start them first
  const int64_t m0 = static_cast<int64_t>(gridDim.x - 1 - blockIdx.x) * Cfg::kOwnRows;
  const ScoreRules<kFeatures> rules(p);
  const Band& band = rules.band;

  int64_t key_first, n_blocks;
  band.key_blocks(m0, min(m0 + Cfg::kOwnRows, p.len_q), kN, key_first, n_blocks);

  const bool consumes =
      sm.start(maps.q, maps.dout, m0, hq, maps.k, maps.v, n_blocks, b, [&](int64_t it, int64_t& row, int& head) {
        row = key_first + it * kN;
        head = hkv;
      });
  if (!consumes) return;

  const int consumer = warpgroup - 1;
  const int lane = tid & 31, warp = (tid % 128) / 32;
  const int64_t wm0 = m0 + 64 * consumer;
  const int64_t wm_lo = min(wm0, p.len_q), wm_hi = min(wm0 + 64, p.len_q);
  const bool wg_has_rows = wm_hi > wm_lo;
  const int64_t wg_key_lo = wg_has_rows ? band.lo(wm_lo) : 0;
  const int64_t wg_key_hi = wg_has_rows ? band.hi(wm_hi - 1) : 0;
  const int64_t row_base = (b * p.heads_q + hq) * p.len_q;
  int64_t row_i[2];
  float row_lse[2], row_delta[2];
  for (int h = 0; h < 2; ++h) {
    const int64_t i = wm0 + 16 * warp + (lane >> 2) + 8 * h;
    row_i[h] = min(i, p.len_q);  // len_q: a padding row, no keys
    row_lse[h] = backward_lse_log2(p.lse, row_base + i, i < p.len_q);
    row_delta[h] = i < p.len_q ? p.delta[row_base + i] : 0.f;
  }

  const uint32_t bh = static_cast<uint32_t>(b * p.heads_q + hq);
  const float inv_keep = rules.dropout() ? 1.f / (1.f - p.dropout_p) : 1.f;
  float* const dmask_head = (kFeatures && p.dmask != nullptr) ? p.dmask + row_base * p.len_k : nullptr;
  float acc_dq[kDT][4];
#pragma unroll
  for (int dt = 0; dt < kDT; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_dq[dt][e] = 0.f;
  float(&dq_flat)[kD / 2] = *reinterpret_cast<float(*)[kD / 2]>(&acc_dq[0][0]);

  if (n_blocks > 0) mbar_wait(sm.bar_own, 0);
  for (int64_t it = 0; it < n_blocks; ++it) {
    const int s = static_cast<int>(it % kStages);
    const uint32_t phase = static_cast<uint32_t>((it / kStages) & 1);
    const int64_t key0 = key_first + it * kN;
    mbar_wait(sm.full0(s), phase);
    if (!wg_has_rows || key0 >= p.len_k || key0 + kN <= wg_key_lo || key0 >= wg_key_hi) {
      mbar_wait(sm.full1(s), phase);
      mbar_arrive(sm.empty(s));
      continue;
    }
    const bool edge = key0 + kN > p.len_k || !band.tile_full(wm_lo, wm_hi, key0, key0 + kN);

    // S = Q K^T, then dP = dO V^T, both in flight while P is formed
    float sc[kNT][4], dp[kNT][4];
    float(&sc_flat)[kN / 2] = *reinterpret_cast<float(*)[kN / 2]>(&sc[0][0]);
    float(&dp_flat)[kN / 2] = *reinterpret_cast<float(*)[kN / 2]>(&dp[0][0]);
    const uint32_t q_tile = opaque(sm.own0), do_tile = opaque(sm.own1);  // see opaque()
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk)
      wgmma_ss<kN, kBf16>(sc_flat, OwnTile::k_major(q_tile, 64 * consumer, kk), StreamTile::k_major(sm.stream0(s), 0, kk),
                          kk > 0);
    wgmma_commit();
    mbar_wait(sm.full1(s), phase);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk)
      wgmma_ss<kN, kBf16>(dp_flat, OwnTile::k_major(do_tile, 64 * consumer, kk), StreamTile::k_major(sm.stream1(s), 0, kk),
                          kk > 0);
    wgmma_commit();
    const bool check = rules.checked(edge);
    wgmma_wait<1>();
    fence_operands(sc_flat);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      int lo = 0, hi = kN;
      if (check) rules.query_window(row_i[h], key0, kN, lo, hi);
      const int64_t mask_row = rules.mask_offset(b, hq, row_i[h], key0);
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          float& x = sc[nt][2 * h + c];
          x = exp2f(rules(x, nt * 8 + 2 * (lane & 3) + c, lo, hi, check, mask_row, p.mask_stride[3]) - row_lse[h]);
        }
    }
    wgmma_wait<0>();
    fence_operands(dp_flat);
    // dS = P (dP keep / (1 - p) - delta), also the mask's gradient; then dQ += dS K with K read
    // MN-major (the keys are the reduction)
    uint32_t dsa[kN / 16][4];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t i = row_i[h];
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        const int col = nt * 8 + 2 * (lane & 3);
        bool k0 = true, k1 = true;
        if (rules.dropout()) rules.keep_pair(bh, i, key0 + col, k0, k1);
        sc[nt][2 * h] *= dp[nt][2 * h] * (k0 ? inv_keep : 0.f) - row_delta[h];
        sc[nt][2 * h + 1] *= dp[nt][2 * h + 1] * (k1 ? inv_keep : 0.f) - row_delta[h];
        if (dmask_head != nullptr && i < p.len_q) {
          float* const dm = dmask_head + i * p.len_k + key0 + col;
          if (key0 + col < p.len_k) dm[0] = sc[nt][2 * h];
          if (key0 + col + 1 < p.len_k) dm[1] = sc[nt][2 * h + 1];
        }
      }
    }
#pragma unroll
    for (int k2 = 0; k2 < kN / 16; ++k2) acc_to_a<T>(dsa[k2], sc[2 * k2], sc[2 * k2 + 1]);
    fence_operands(dq_flat);
    wgmma_fence();
#pragma unroll
    for (int k2 = 0; k2 < kN / 16; ++k2) wgmma_rs<kD, kBf16>(dq_flat, dsa[k2], StreamTile::mn_major(sm.stream0(s), k2), true);
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands(dq_flat);
    mbar_arrive(sm.empty(s));
  }

#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t i = row_i[h];
    if (i >= p.len_q) continue;
    T* const dq_row = static_cast<T*>(p.dq) + b * p.dq_stride[0] + hq * p.dq_stride[1] + i * p.dq_stride[2];
    store_acc_row(dq_row, acc_dq, h, lane, p.head_dim, p.scale);
  }
#endif
}

}  // namespace cuda
}  // namespace attnkern
