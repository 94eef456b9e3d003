// The Hopper forward (sm_90a), FlashAttention-3's design. One CTA owns 128 query rows of one head:
//   * warpgroup 0 is the producer: one thread loads Q once and streams the K and V blocks that
//     meet the tile's band through a ring of shared-memory stages with TMA; mbarriers carry
//     "stage full" (the copies' byte count) and "stage empty" (every consumer thread arrives);
//   * warpgroups 1 and 2 are consumers, 64 rows each (wgmma's M): S = Q K^T by wgmma from
//     shared memory, the online softmax in the exp2 domain on the S registers (the scoring and
//     band rules of score.cuh, so it agrees with the sm80 kernels element for element), then
//     O += P V by wgmma with P from registers and V read MN-major by descriptor; the softmax of
//     one block runs while the previous block's P V is in flight, and the two consumers take
//     turns issuing their products (ping-pong), so one's softmax overlaps the other's products.
// The producer gives up registers (setmaxnreg) so each consumer thread can hold S and O.
//
// Served: fp16/bf16, head-dim buckets 64 and 128, the prefill path, with bool/float masks and
// dropout when kFeatures (launch_fwd_sm90.cuh decides; everything else runs the sm80 kernels). The kernel body exists
// only when compiled for sm_90a; for other archs it traps and the host never launches it.
#pragma once

#include <cmath>
#include <type_traits>

#include "fwd_kernel.cuh"
#include "sm90_tile.cuh"

namespace attnkern {
namespace cuda {

template <class Cfg, typename T, bool kFeatures>
__global__ void __launch_bounds__(Cfg::kThreads, 1)
    fwd_sm90_kernel(const __grid_constant__ AttnParams p, const __grid_constant__ Sm90Maps maps) {
#if !ATTNKERN_SM90_BODY
  __trap();
#else
  constexpr int kD = Cfg::kD, kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kStages = Cfg::kStages;
  constexpr int kNT = kBlockN / 8, kDT = kD / 8;  // n8-tiles of S and of O
  constexpr bool kBf16 = !std::is_same<T, __half>::value;
  using Ring = typename Cfg::Ring;  // Q; K and V stages
  using QTile = typename Ring::OwnTile;
  using KVTile = typename Ring::StreamTile;

  extern __shared__ __align__(128) unsigned char smem_raw[];  // aligned up to 1024 by Ring
  const Ring ring(smem_addr(smem_raw));

  const int tid = threadIdx.x;
  const int warpgroup = tid / 128;
  const int64_t b = blockIdx.z;
  const int hq = blockIdx.y;
  const int hkv = hq / static_cast<int>(p.heads_q / p.heads_kv);
  // the last query blocks meet the most keys under a causal band: start them first
  const int64_t row0 = static_cast<int64_t>(gridDim.x - 1 - blockIdx.x) * kBlockM;
  const ScoreRules<kFeatures> rules(p);
  const Band& band = rules.band;

  // key blocks [0, n_blocks) of kBlockN keys from key_first: those meeting the band of any row
  int64_t key_first, n_blocks;
  band.key_blocks(row0, min(row0 + kBlockM, p.len_q), kBlockN, key_first, n_blocks);

  const bool consumes =
      ring.start(maps.q, maps.q, row0, hq, maps.k, maps.v, n_blocks, b, [&](int64_t it, int64_t& row, int& head) {
        row = key_first + it * kBlockN;
        head = hkv;
      });
  if (!consumes) return;

  // ---- consumers
  const int consumer = warpgroup - 1;
  const int wg_tid = tid % 128, lane = tid & 31, warp = wg_tid / 32;
  const int64_t wg_row0 = row0 + 64 * consumer;  // this warpgroup's first query
  int64_t row_q[2];  // this thread's two rows (fragment rows g and g + 8 of its warp)
  for (int h = 0; h < 2; ++h) row_q[h] = min(wg_row0 + 16 * warp + (lane >> 2) + 8 * h, p.len_q);  // len_q: no keys

  float acc_o[kDT][4];
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
#pragma unroll
  for (int dt = 0; dt < kDT; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_o[dt][e] = 0.f;
  float(&acc_o_flat)[kD / 2] = *reinterpret_cast<float(*)[kD / 2]>(&acc_o[0][0]);

  auto stage = [&](int64_t it) { return static_cast<int>(it % kStages); };
  auto parity = [&](int64_t it) { return static_cast<uint32_t>((it / kStages) & 1); };

  // Two overlaps, as in FlashAttention-3:
  //  * within a warpgroup, a block's softmax runs while the previous block's P V is in flight:
  //    S_it = Q K_it^T and O += P_{it-1} V_{it-1} are issued together, S_it is scored once it
  //    retires, and O is rescaled once that P V has retired. P's fragments stay untouched until
  //    their product retires (wgmma reads registers asynchronously);
  //  * between the two consumer warpgroups, a ping-pong on named barriers: each issues its
  //    products only in its turn, so one warpgroup's softmax overlaps the other's products
  //    instead of both competing for the tensor cores at once.
  // Both warpgroups walk every key block of the CTA (a block outside a warpgroup's band scores
  // -inf throughout and adds nothing), so their turns stay in step; the loop body has no branch
  // between issuing and retiring a product (the window test is a select), so ptxas need not
  // serialise the asynchronous wgmma.
  float acc_s[kNT][4];
  float(&acc_s_flat)[kBlockN / 2] = *reinterpret_cast<float(*)[kBlockN / 2]>(&acc_s[0][0]);
  uint32_t pa[kBlockN / 16][4];
  auto issue_s = [&](int64_t it) {
    mbar_wait(ring.full0(stage(it)), parity(it));
    const uint32_t q_tile = opaque(ring.own0);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk)
      wgmma_ss<kBlockN, kBf16>(acc_s_flat, QTile::k_major(q_tile, 64 * consumer, kk),
                               KVTile::k_major(ring.stream0(stage(it)), 0, kk), kk > 0);
    wgmma_commit();
  };
  auto issue_pv = [&](int64_t it) {
    mbar_wait(ring.full1(stage(it)), parity(it));
    fence_operands(acc_o_flat);
    wgmma_fence();
#pragma unroll
    for (int k2 = 0; k2 < kBlockN / 16; ++k2)
      wgmma_rs<kD, kBf16>(acc_o_flat, pa[k2], KVTile::mn_major(ring.stream1(stage(it)), k2), true);
    wgmma_commit();
  };
  auto retire_pv = [&](int64_t it) {
    wgmma_wait<0>();
    fence_operands(acc_o_flat);
    mbar_arrive(ring.empty(stage(it)));  // both products have read the stage
  };
  // scores and the online softmax of S (as fwd_kernel.cuh, on the same fragment layout); alpha:
  // the factor that brings sums and O to the new row max
  auto softmax = [&](int64_t it, float (&alpha)[2]) {
    fence_operands(acc_s_flat);
    const int64_t key0 = key_first + it * kBlockN;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      int lo, hi;
      rules.query_window(row_q[h], key0, kBlockN, lo, hi);
      const int64_t mask_row = rules.mask_offset(b, hq, row_q[h], key0);
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          float& x = acc_s[nt][2 * h + c];
          x = rules(x, nt * 8 + 2 * (lane & 3) + c, lo, hi, true, mask_row, p.mask_stride[3]);
          mx = fmaxf(mx, x);
        }
      mx = quad_max(mx);
      const float m_new = fmaxf(row_max[h], mx);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;  // a row with no key yet stays at 0
      alpha[h] = exp2f(row_max[h] - m_use);
      row_max[h] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          float& x = acc_s[nt][2 * h + c];
          x = exp2f(x - m_use);
          sum += x;
        }
      row_sum[h] = row_sum[h] * alpha[h] + sum;  // per-thread partial; the quad's sum is taken at the end
      if (rules.dropout()) {  // the sum above is of the undropped weights, as softmax needs
        const uint32_t bh = static_cast<uint32_t>(b * p.heads_q + hq);
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
          bool k0, k1;
          rules.keep_pair(bh, row_q[h], key0 + nt * 8 + 2 * (lane & 3), k0, k1);
          if (!k0) acc_s[nt][2 * h] = 0.f;
          if (!k1) acc_s[nt][2 * h + 1] = 0.f;
        }
      }
    }
  };
  auto rescale_and_keep_p = [&](const float (&alpha)[2]) {
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[dt][e] *= alpha[e >> 1];
#pragma unroll
    for (int k2 = 0; k2 < kBlockN / 16; ++k2) acc_to_a<T>(pa[k2], acc_s[2 * k2], acc_s[2 * k2 + 1]);
  };

  // turns: consumer c issues once named barrier kTurnBarrier + c completes, which takes its 128
  // threads' sync and the other consumer's 128 arrivals. Each makes n_blocks + 1 turns; consumer
  // 1 hands the first turn over and skips the hand-over after its last, so every arrival is
  // matched by a sync.
  constexpr int kTurnBarrier = 1;
  auto wait_turn = [&]() { named_barrier_sync(kTurnBarrier + consumer, 256); };
  auto pass_turn = [&]() { named_barrier_arrive(kTurnBarrier + 1 - consumer, 256); };
  if (n_blocks > 0) {
    mbar_wait(ring.bar_own, 0);
    if (consumer == 1) pass_turn();
    float alpha[2];
    wait_turn();
    issue_s(0);
    pass_turn();
    wgmma_wait<0>();
    softmax(0, alpha);
    rescale_and_keep_p(alpha);
    for (int64_t it = 1; it < n_blocks; ++it) {
      wait_turn();
      issue_s(it);
      issue_pv(it - 1);
      pass_turn();
      wgmma_wait<1>();  // S (the older group) has retired; P V may still run
      softmax(it, alpha);
      retire_pv(it - 1);
      rescale_and_keep_p(alpha);  // O now holds every earlier block
    }
    wait_turn();
    issue_pv(n_blocks - 1);
    if (consumer == 0) pass_turn();
    retire_pv(n_blocks - 1);
  }

  // ---- epilogue: O / l, LSE = ln(sum) + max; rows without keys give 0 and -inf
  const FwdSplit whole;
  const RowWriter<T> out{p, whole, 0, b};
  const int dv = static_cast<int>(p.head_dim_v);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float l = quad_sum(row_sum[h]);
    const int64_t i = row_q[h];
    if (i >= p.len_q) continue;
    const float inv = l != 0.f ? (rules.dropout() ? 1.f / (1.f - p.dropout_p) : 1.f) / l : 0.f;
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt) {
      const int col = dt * 8 + 2 * (lane & 3);
      if (col < dv) out.out2(hq, i, col, acc_o[dt][2 * h] * inv, acc_o[dt][2 * h + 1] * inv);
    }
    if ((lane & 3) == 0) out.stats(hq, i, row_max[h], l);
  }
#endif
}

}  // namespace cuda
}  // namespace attnkern
