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

// TMA maps of every tensor a Hopper kernel reads (the forward leaves dout unset)
struct Sm90Maps {
  TmaMap q, k, v, dout;  // 4-D: (dim, row, head, batch), boxes of 64 columns
};

}  // namespace cuda
}  // namespace attnkern
