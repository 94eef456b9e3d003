// Tile shapes of every CUDA kernel, per head-dim bucket. One place: the launchers and the
// kernels read them from here, and the instantiation files only name a bucket and a dtype.
//
// Budget: at most 99 KB of shared memory per CTA so the sm80 build also runs on sm86/sm89,
// which have 99 KB (A100 has 163 KB, H100 227 KB). No kernel should spill registers with
// CUDA 13 on sm_80 or sm_90a; csrc/cuda/check_sass.py fails on any stack frame beyond the few it
// lists (ALLOWED_SPILLS). Within that, the
// forward prefers two 16-row blocks per warp: each K/V fragment loaded by ldmatrix then feeds
// two mma instead of one, halving the shared-memory traffic per mma, the resource mma.sync
// attention kernels tend to run out of first (FlashAttention-2 gives a warp 32 rows for this).
// Head dim 128 cannot afford it without spilling on sm_90a, so it runs 8 warps of one block.
// None of this is tuned on a GPU yet.
#pragma once

#include "sm90_tile.cuh"
#include "smem_tile.cuh"

namespace attnkern {
namespace cuda {

constexpr int kMaxSmemBytes = 99 * 1024;

// Forward. Each warp owns kWarpMTiles blocks of 16 query rows; kKeySplit warps share the same
// rows and each takes a 1/kKeySplit slice of every key block (decode: few rows, many keys), their
// partial softmax states merged at the end.
template <int kD_, int kWarps_, int kWarpMTiles_, int kKeySplit_, int kBlockN_, int kStages_>
struct FwdConfig {
  static constexpr int kD = kD_;
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kWarpMTiles = kWarpMTiles_;
  static constexpr int kKeySplit = kKeySplit_;
  static constexpr int kRowWarps = kWarps / kKeySplit;
  static constexpr int kBlockM = 16 * kWarpMTiles * kRowWarps;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kWarpN = kBlockN / kKeySplit;  // keys of one warp's slice of a key block
  static constexpr int kStages = kStages_;
  using QTile = SmemTile<kBlockM, kD>;
  using KTile = SmemTile<kBlockN, kD>;  // K and V tiles of one stage
  static constexpr int kKVBytes = kStages * 2 * KTile::kBytes;
  // the key-split merge reuses the K/V stages: per slice, kBlockM rows of kD fp32, a max and a sum
  static constexpr int kMergeBytes = kKeySplit > 1 ? kKeySplit * kBlockM * (kD + 2) * 4 : 0;
  static constexpr int kSmemBytes = QTile::kBytes + kKVBytes;
  static_assert(kWarps % kKeySplit == 0, "warps split evenly over key slices");
  static_assert(kWarpN % 16 == 0, "a warp's key slice is whole k-steps of P V");
  static_assert(kStages >= 2, "the K/V pipeline needs two stages");
  static_assert(kMergeBytes <= kKVBytes, "the key-split merge must fit in the K/V stages");
  static_assert(kSmemBytes <= kMaxSmemBytes, "shared memory budget");
};

template <int kD>
struct FwdTraits;  // the prefill/training forward
template <>
struct FwdTraits<32> {
  using Cfg = FwdConfig<32, 4, 2, 1, 64, 2>;
};
template <>
struct FwdTraits<64> {
  using Cfg = FwdConfig<64, 4, 2, 1, 32, 3>;
};
template <>
struct FwdTraits<96> {
  using Cfg = FwdConfig<96, 4, 2, 1, 32, 3>;
};
template <>
struct FwdTraits<128> {
  using Cfg = FwdConfig<128, 8, 1, 1, 64, 2>;
};
template <>
struct FwdTraits<256> {
  using Cfg = FwdConfig<256, 4, 1, 1, 32, 2>;
};

template <int kD>
struct DecodeTraits;  // split-KV forward for short queries: 16 packed (head, query) rows per CTA
template <>
struct DecodeTraits<32> {
  using Cfg = FwdConfig<32, 4, 1, 4, 64, 3>;
};
template <>
struct DecodeTraits<64> {
  using Cfg = FwdConfig<64, 4, 1, 4, 64, 3>;
};
template <>
struct DecodeTraits<96> {
  using Cfg = FwdConfig<96, 4, 1, 4, 64, 2>;
};
template <>
struct DecodeTraits<128> {
  using Cfg = FwdConfig<128, 4, 1, 4, 64, 2>;
};
template <>
struct DecodeTraits<256> {
  using Cfg = FwdConfig<256, 2, 1, 2, 32, 2>;
};

// Backward, dK/dV pass: each warp owns 16 keys (kBlockN = 16 * kWarps per CTA) and walks the
// query blocks of every query head of its kv head. kDoDK / kDoDV select the accumulators; head
// dim 256 runs one pass for each, since both together would not fit in registers.
template <int kD_, int kWarps_, int kBlockM_, int kStages_>
struct BwdKVConfig {
  static constexpr int kD = kD_;
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockN = 16 * kWarps;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kStages = kStages_;
  static constexpr bool kSplitPasses = kD > 128;
  using KTile = SmemTile<kBlockN, kD>;
  using QTile = SmemTile<kBlockM, kD>;  // Q and dO tiles of one stage
  // per stage: Q, dO, and the rows' log2 LSE, delta and log2 sum (bwd_kernel.cuh backward_row)
  static constexpr int kStageBytes = 2 * QTile::kBytes + 3 * kBlockM * 4;
  static constexpr int kSmemBytes = 2 * KTile::kBytes + kStages * kStageBytes;
  static_assert(kBlockM % 16 == 0, "query blocks are whole k-steps of P^T dO");
  static_assert(kStages >= 2, "the Q/dO pipeline needs two stages");
  static_assert(kSmemBytes <= kMaxSmemBytes, "shared memory budget");
};

// Backward, dQ pass: like the forward, each warp owns 16 query rows and walks the key blocks.
template <int kD_, int kWarps_, int kBlockN_, int kStages_>
struct BwdQConfig {
  static constexpr int kD = kD_;
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockM = 16 * kWarps;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kStages = kStages_;
  using QTile = SmemTile<kBlockM, kD>;  // Q and dO
  using KTile = SmemTile<kBlockN, kD>;  // K and V of one stage
  static constexpr int kSmemBytes = 2 * QTile::kBytes + kStages * 2 * KTile::kBytes;
  static_assert(kBlockN % 16 == 0, "key blocks are whole k-steps of dS K");
  static_assert(kStages >= 2, "the K/V pipeline needs two stages");
  static_assert(kSmemBytes <= kMaxSmemBytes, "shared memory budget");
};

template <int kD>
struct BwdTraits;
template <>
struct BwdTraits<32> {
  using KV = BwdKVConfig<32, 8, 64, 2>;
  using Q = BwdQConfig<32, 4, 64, 2>;
};
template <>
struct BwdTraits<64> {
  using KV = BwdKVConfig<64, 8, 64, 2>;
  using Q = BwdQConfig<64, 4, 64, 2>;
};
template <>
struct BwdTraits<96> {
  using KV = BwdKVConfig<96, 8, 32, 2>;
  using Q = BwdQConfig<96, 4, 64, 2>;
};
template <>
struct BwdTraits<128> {
  using KV = BwdKVConfig<128, 8, 32, 2>;
  using Q = BwdQConfig<128, 4, 32, 2>;
};
template <>
struct BwdTraits<256> {
  using KV = BwdKVConfig<256, 4, 16, 2>;
  using Q = BwdQConfig<256, 4, 16, 2>;
};


// Hopper forward (fwd_sm90_kernel.cuh, sm_90a only): a producer warpgroup issues TMA loads of
// K/V blocks into a ring of kStages stages; two consumer warpgroups own 64 query rows each
// (wgmma's M) and compute S = Q K^T and O += P V with wgmma. Tiles are stored as 64-column
// (128-byte) blocks with TMA's 128-byte swizzle, the layout wgmma reads by descriptor. H100
// grants a CTA up to 227 KB of shared memory, and one CTA per SM is the plan (registers: 240 per
// consumer thread after setmaxnreg). Not tuned on a GPU yet.
constexpr int kMaxSmemBytesSm90 = 227 * 1024;

template <int kD_, int kBlockN_, int kStages_>
struct FwdSm90Config {
  static constexpr int kD = kD_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kStages = kStages_;
  // two consumer warpgroups; owned: Q; streamed: K, V (sm90_tile.cuh holds the layout)
  using Ring = Sm90Ring<1, kBlockN, kD / 64, kStages, 2>;
  static constexpr int kThreads = Ring::kThreads;
  static constexpr int kBlockM = Ring::kOwnRows;
  static constexpr int kSmemBytes = Ring::kSmemBytes;
  static_assert(kD % 64 == 0, "rows are whole 128-byte swizzle rows");
  static_assert(kBlockN % 16 == 0 && kBlockN <= 256, "key blocks are whole k-steps of P V and one wgmma N");
  static_assert(kStages >= 2, "the K/V ring needs two stages");
  static_assert(kSmemBytes <= kMaxSmemBytesSm90, "shared memory budget");
};

template <int kD>
struct FwdSm90Traits;
template <>
struct FwdSm90Traits<64> {
  using Cfg = FwdSm90Config<64, 128, 3>;
};
template <>
struct FwdSm90Traits<128> {
  using Cfg = FwdSm90Config<128, 128, 2>;
};


// Hopper backward (bwd_sm90_kernel.cuh): like the forward, a producer warpgroup and two
// consumer warpgroups of 64 rows. A CTA owns 128 rows of two tensors, loaded once (the dK/dV
// pass: K and V of 128 keys; the dQ pass: Q and dO of 128 queries), and streams blocks of
// kStreamRows rows of the two others (Q and dO; K and V) through kStages stages. Every operand
// fits wgmma's N of 64 or 128, and each consumer thread holds at most two 64 x kStreamRows
// score tiles plus its two (or one) 64 x kD gradient accumulators.
template <int kD_, int kStreamRows_, int kStages_>
struct BwdSm90Config {
  static constexpr int kD = kD_;
  static constexpr int kStreamRows = kStreamRows_;
  static constexpr int kStages = kStages_;
  using Ring = Sm90Ring<2, kStreamRows, kD / 64, kStages, 2>;  // two consumer warpgroups
  static constexpr int kThreads = Ring::kThreads;
  static constexpr int kOwnRows = Ring::kOwnRows;
  static constexpr int kSmemBytes = Ring::kSmemBytes;
  static_assert(kD % 64 == 0, "rows are whole 128-byte swizzle rows");
  static_assert(kStreamRows == 64 || kStreamRows == 128, "a streamed block is one wgmma N");
  static_assert(kStages >= 2, "the ring needs two stages");
  static_assert(kSmemBytes <= kMaxSmemBytesSm90, "shared memory budget");
};

template <int kD>
struct BwdSm90Traits;
template <>
struct BwdSm90Traits<64> {
  using KV = BwdSm90Config<64, 64, 3>;
  using Q = BwdSm90Config<64, 128, 2>;
};
template <>
struct BwdSm90Traits<128> {
  using KV = BwdSm90Config<128, 64, 2>;
  using Q = BwdSm90Config<128, 64, 2>;
};

}  // namespace cuda
}  // namespace attnkern
