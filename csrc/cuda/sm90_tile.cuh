// Shared-memory tiles of the Hopper kernels. A tile of R rows x (64 * C) 16-bit columns is
// stored as C column blocks of R rows x 128 bytes, each row swizzled by TMA's 128-byte pattern;
// that is the layout wgmma reads by descriptor, as a K-major operand (rows = M or N, columns =
// the reduction) or as an MN-major one (rows = the reduction). Tiles start 1024-byte aligned.
#pragma once

#include "ptx_sm90.cuh"

namespace attnkern {
namespace cuda {

template <int kRows, int kColBlocks>
struct Sm90Tile {
  static constexpr uint32_t kRowBytes = 128;
  static constexpr uint32_t kColBlockBytes = kRows * kRowBytes;
  static constexpr uint32_t kBytes = kColBlocks * kColBlockBytes;
  static_assert(kRows % 8 == 0, "whole 1024-byte swizzle atoms");

  // TMA loads of rows row0 .. row0 + kRows - 1 of (head, batch) of `map` (boxes of kRows x 64)
  __device__ static __forceinline__ void load(uint32_t tile, const TmaMap& map, uint32_t bar, int64_t row0, int head,
                                              int64_t batch) {
#pragma unroll
    for (int c = 0; c < kColBlocks; ++c)
      tma_load_4d(tile + c * kColBlockBytes, map, bar, 64 * c, static_cast<int32_t>(row0), head,
                  static_cast<int32_t>(batch));
  }
  // K-major operand: rows row0 .. row0 + 63 (the M or N of one wgmma), columns 16 kk .. 16 kk + 15.
  // Inside a 128-byte swizzled row a 16-column step is 32 bytes; the hardware applies the
  // swizzle to the resulting addresses.
  __device__ static __forceinline__ uint64_t k_major(uint32_t tile, int row0, int kk) {
    return gmma_desc_sw128(tile + (kk / 4) * kColBlockBytes + row0 * kRowBytes + (kk % 4) * 32, 16, 1024);
  }
  // MN-major operand: rows (the reduction index) 16 k2 .. 16 k2 + 15 = two 8-row groups, all
  // columns (the N of one wgmma: column blocks kColBlockBytes apart)
  __device__ static __forceinline__ uint64_t mn_major(uint32_t tile, int k2) {
    return gmma_desc_sw128(tile + k2 * 16 * kRowBytes, kColBlockBytes, 1024);
  }
};

// A Hopper CTA: a producer warpgroup and kConsumers consumer warpgroups of 64 rows, and its
// shared memory: kOwnTiles tiles of 64 * kConsumers rows loaded once (the forward: Q; the dK/dV
// pass: K, V; the dQ pass: Q, dO), a ring of kStages stages of two tiles of kStreamRows rows
// (K, V; or Q, dO), and the mbarriers: owned tiles landed; per stage, first and second streamed
// tile landed (transaction-counted), and the stage released by every consumer thread. Starts at
// the first 1024-byte boundary of the dynamic shared memory.
template <int kOwnTiles, int kStreamRows, int kColBlocks, int kStages, int kConsumers>
struct Sm90Ring {
  static constexpr int kOwnRows = 64 * kConsumers;
  static constexpr int kThreads = 128 * (kConsumers + 1);
  using OwnTile = Sm90Tile<kOwnRows, kColBlocks>;
  using StreamTile = Sm90Tile<kStreamRows, kColBlocks>;
  static constexpr int kBarrierBytes = 8 * (1 + 3 * kStages);
  // what a launch must request: the tiles, the barriers, and 1 KB for the alignment
  static constexpr int kSmemBytes = 1024 + kOwnTiles * OwnTile::kBytes + 2 * kStages * StreamTile::kBytes + kBarrierBytes;
  // registers per thread after setmaxnreg: the producer gives up what the consumers take, all of
  // the 64 K of the SM (one CTA per SM)
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = 240;
  static_assert(128 * kProducerRegs + 128 * kConsumers * kConsumerRegs <= 64 * 1024, "register file");
  uint32_t own0, own1, stream_base, bar_own;

  __device__ explicit Sm90Ring(uint32_t smem_base) {
    own0 = (smem_base + 1023u) & ~1023u;
    own1 = own0 + OwnTile::kBytes;
    stream_base = own0 + kOwnTiles * OwnTile::kBytes;
    bar_own = stream_base + 2 * kStages * StreamTile::kBytes;
  }
  __device__ uint32_t stream0(int s) const { return stream_base + s * StreamTile::kBytes; }
  __device__ uint32_t stream1(int s) const { return stream_base + (kStages + s) * StreamTile::kBytes; }
  __device__ uint32_t full0(int s) const { return bar_own + 8u * (1 + s); }
  __device__ uint32_t full1(int s) const { return bar_own + 8u * (1 + kStages + s); }
  __device__ uint32_t empty(int s) const { return bar_own + 8u * (1 + 2 * kStages + s); }

  __device__ void init_barriers() const {
    mbar_init(bar_own, 1);
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full0(s), 1);
      mbar_init(full1(s), 1);
      mbar_init(empty(s), 128 * kConsumers);
    }
    fence_barrier_init();
  }

  // The start of every Hopper kernel: barriers set up, then the roles. Warpgroup 0 gives up
  // registers and its first thread runs produce() over n_iters iterations; the other producer
  // threads leave. Returns whether the caller is a consumer (with its registers raised); after
  // this no CTA-wide barrier may be used, since the producer threads have left.
  template <class StreamAt>
  __device__ bool start(const TmaMap& own0_map, const TmaMap& own1_map, int64_t own_row, int own_head,
                        const TmaMap& stream0_map, const TmaMap& stream1_map, int64_t n_iters, int64_t batch,
                        StreamAt stream_at) const {
    const int tid = threadIdx.x;
    if (tid == 0) init_barriers();
    __syncthreads();
    if (tid < 128) {
      setmaxnreg_dec<kProducerRegs>();
      if (tid == 0 && n_iters > 0)
        produce(own0_map, own1_map, own_row, own_head, stream0_map, stream1_map, n_iters, batch, stream_at);
      return false;
    }
    setmaxnreg_inc<kConsumerRegs>();
    return true;
  }

  // The producer thread: the owned tiles at (own_row, own_head) (own1_map unused with one
  // owned tile), then for iteration it the streamed tiles at stream_at(it, row, head) into
  // stage it % kStages, once every consumer thread has released it.
  template <class StreamAt>
  __device__ void produce(const TmaMap& own0_map, const TmaMap& own1_map, int64_t own_row, int own_head,
                          const TmaMap& stream0_map, const TmaMap& stream1_map, int64_t n_iters, int64_t batch,
                          StreamAt stream_at) const {
    mbar_arrive_expect_tx(bar_own, kOwnTiles * OwnTile::kBytes);
    OwnTile::load(own0, own0_map, bar_own, own_row, own_head, batch);
    if (kOwnTiles > 1) OwnTile::load(own1, own1_map, bar_own, own_row, own_head, batch);
    for (int64_t it = 0; it < n_iters; ++it) {
      const int s = static_cast<int>(it % kStages);
      if (it >= kStages) mbar_wait(empty(s), static_cast<uint32_t>((it / kStages - 1) & 1));
      int64_t row;
      int head;
      stream_at(it, row, head);
      mbar_arrive_expect_tx(full0(s), StreamTile::kBytes);
      StreamTile::load(stream0(s), stream0_map, full0(s), row, head, batch);
      mbar_arrive_expect_tx(full1(s), StreamTile::kBytes);
      StreamTile::load(stream1(s), stream1_map, full1(s), row, head, batch);
    }
  }
};

// TMA maps of every tensor a Hopper kernel reads (the forward leaves dout unset)
struct Sm90Maps {
  TmaMap q, k, v, dout;  // 4-D: (dim, row, head, batch), boxes of 64 columns
};

}  // namespace cuda
}  // namespace attnkern
