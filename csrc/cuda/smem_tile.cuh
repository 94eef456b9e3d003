// Shared-memory tiles of 16-bit elements: the swizzled layout, the cp.async loader and the
// ldmatrix fragment loads of the m16n8k16 operands.
//
// A (kRows x kD) tile is stored as panels of 64 columns (128-byte rows); a head dim that is an
// odd multiple of 32 (32, 96) ends in one 32-column panel. Inside a panel the 16-byte chunk c of
// row r sits at chunk c ^ (r & 7) (64-column panels) or c ^ ((r >> 1) & 3) (32-column panels).
// ldmatrix reads one chunk from each of 8 consecutive rows and cp.async writes consecutive
// chunks of a row; with the swizzle both touch 8 distinct 16-byte bank groups, so neither
// conflicts. tests/test_cuda_layout.py replays this index math on the CPU.
#pragma once

#include "../params.h"
#include "ptx.cuh"

namespace attnkern {
namespace cuda {

template <int kRows_, int kD_>
struct SmemTile {
  static constexpr int kRows = kRows_;
  static constexpr int kD = kD_;
  static constexpr int kChunks = kD / 8;  // 16-byte chunks per row
  static constexpr int kFullPanels = kD / 64;
  static constexpr int kTailChunks = (kD % 64) / 8;
  static_assert(kD % 32 == 0, "head dims are bucketed to multiples of 32");
  static_assert(kRows % 16 == 0, "tiles are whole mma row blocks");
  static constexpr int kElems = kRows * kD;
  static constexpr int kBytes = kElems * 2;  // a multiple of 1024: tiles keep 128-byte alignment

  // byte offset of chunk `chunk` (columns 8*chunk .. 8*chunk+7) of row `row`
  __device__ static __forceinline__ uint32_t offset(int row, int chunk) {
    if (kTailChunks == 0 || chunk < kFullPanels * 8) {
      const int panel = chunk >> 3, c = chunk & 7;
      return panel * (kRows * 128) + row * 128 + ((c ^ (row & 7)) << 4);
    }
    const int c = chunk - kFullPanels * 8;
    return kFullPanels * (kRows * 128) + row * 64 + ((c ^ ((row >> 1) & 3)) << 4);
  }

  // A lane's ldmatrix address for (row, chunk lane_chunk in {0, 1}), in a full and in the tail
  // panel. Every other even chunk and every row 8*n further is then one XOR and one add away
  // (at()): for a 128-byte aligned tile the swizzled chunk bits are bits 4-6 of the address
  // itself, and adding multiples of 8 rows leaves the swizzle unchanged. This keeps the
  // unrolled loops from holding a register per fragment address.
  struct Lane {
    uint32_t full, tail;
  };
  __device__ static __forceinline__ Lane lane(uint32_t tile_addr, int row, int lane_chunk) {
    return {tile_addr + row * 128 + ((lane_chunk ^ (row & 7)) << 4),
            tile_addr + kFullPanels * (kRows * 128) + row * 64 + ((lane_chunk ^ ((row >> 1) & 3)) << 4)};
  }
  // address of chunk + lane_chunk, row + row_add; `chunk` even and `row_add` a multiple of 8
  __device__ static __forceinline__ uint32_t at(const Lane& l, int chunk, int row_add) {
    if (kTailChunks == 0 || chunk < kFullPanels * 8)
      return (l.full ^ ((chunk & 7) << 4)) + (chunk >> 3) * (kRows * 128) + row_add * 128;
    return (l.tail ^ (((chunk - kFullPanels * 8) & 3) << 4)) + row_add * 64;
  }
};

// The XOR addressing of SmemTile::at needs 128-byte aligned tiles, hence a 128-byte aligned
// dynamic shared memory base (it is 1024-aligned on sm80+); fail loudly if that ever changes.
__device__ __forceinline__ void check_smem_base(uint32_t base) {
  if (base & 127u) __trap();
}

// Issue cp.async copies of a tile whose row r is at rows + r * row_stride (zero-filled for rows
// at or past rows_valid and for chunks at or past cols_valid, a multiple of 8). `any` is a
// mapped address for the zero-fill copies.
template <class Tile, int kThreads, typename T>
__device__ __forceinline__ void load_rows_async(uint32_t tile_addr, const T* rows, int64_t row_stride,
                                                int64_t rows_valid, int cols_valid, const T* any) {
  constexpr int kTotal = Tile::kRows * Tile::kChunks;
  constexpr int kIters = (kTotal + kThreads - 1) / kThreads;
  const int tid = static_cast<int>(threadIdx.x);
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int id = it * kThreads + tid;
    if (kTotal % kThreads == 0 || id < kTotal) {
      const int r = id / Tile::kChunks, c = id % Tile::kChunks;
      const bool valid = r < rows_valid && c * 8 < cols_valid;
      cp_async_16(tile_addr + Tile::offset(r, c), valid ? rows + r * row_stride + c * 8 : any, valid);
    }
  }
}

// Same for tiles whose rows are not evenly strided: `row_ptr(r)` gives row r's address or nullptr.
template <class Tile, int kThreads, typename T, class RowPtr>
__device__ __forceinline__ void load_tile_async(uint32_t tile_addr, RowPtr row_ptr, int cols_valid, const T* any) {
  constexpr int kTotal = Tile::kRows * Tile::kChunks;
  constexpr int kIters = (kTotal + kThreads - 1) / kThreads;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int id = it * kThreads + static_cast<int>(threadIdx.x);
    if (kTotal % kThreads == 0 || id < kTotal) {
      const int r = id / Tile::kChunks, c = id % Tile::kChunks;
      const T* row = row_ptr(r);
      const bool valid = row != nullptr && c * 8 < cols_valid;
      cp_async_16(tile_addr + Tile::offset(r, c), valid ? row + c * 8 : any, valid);
    }
  }
}

// Lane addresses of the three operand roles of m16n8k16 (ldmatrix.x4: lanes 8m..8m+7 give the
// row addresses of matrix m, and one chunk is 8 columns = one n-tile):
//  A, rows row0..row0+15, chunks c, c+1: matrices (rows 0-7, c), (8-15, c), (0-7, c+1),
//     (8-15, c+1) are a0..a3;
//  B stored n x k (K in S = Q K^T), rows n0..n0+15, chunks c, c+1: matrices (n 0-7, c),
//     (0-7, c+1), (8-15, c), (8-15, c+1) are b0, b1 of n-tile n0/8 and b0, b1 of the next;
//  B stored k x n (V in O = P V), rows k0..k0+15, chunks c, c+1, transposing load: matrices
//     (k 0-7, c), (8-15, c), (0-7, c+1), (8-15, c+1) are b0, b1 of n-tile c and of n-tile c+1.
template <class Tile>
__device__ __forceinline__ typename Tile::Lane lane_a(uint32_t tile_addr, int row0, int lane) {
  return Tile::lane(tile_addr, row0 + (lane & 15), lane >> 4);
}
template <class Tile>
__device__ __forceinline__ typename Tile::Lane lane_b_nk(uint32_t tile_addr, int n0, int lane) {
  return Tile::lane(tile_addr, n0 + (lane & 7) + ((lane >> 4) << 3), (lane >> 3) & 1);
}
template <class Tile>
__device__ __forceinline__ typename Tile::Lane lane_b_kn(uint32_t tile_addr, int k0, int lane) {
  return Tile::lane(tile_addr, k0 + (lane & 7) + (((lane >> 3) & 1) << 3), lane >> 4);
}

// The accumulators of n-tiles 2k and 2k + 1 (16 rows x 16 columns) are, packed, the A operand
// of an mma whose k-block is those 16 columns: C and A fragments share rows g, g + 8 and
// columns 2t, 2t + 1 (+ 8). This is how P, P^T and dS feed the next product from registers.
template <typename T>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&lo)[4], const float (&hi)[4]) {
  a[0] = Elem<T>::pack(lo[0], lo[1]);
  a[1] = Elem<T>::pack(lo[2], lo[3]);
  a[2] = Elem<T>::pack(hi[0], hi[1]);
  a[3] = Elem<T>::pack(hi[2], hi[3]);
}

// acc_to_a of the 16 columns 16 k2 .. 16 k2 + 15 of an accumulator tile acc[kNT][4], each
// element acc[nt][e] times kept(nt, e) (dropout: 1 / (1 - p) where kept, else 0)
template <typename T, int kNT, class Kept>
__device__ __forceinline__ void acc_to_a_kept(uint32_t (&a)[4], const float (&acc)[kNT][4], int k2, Kept kept) {
  float lo[4], hi[4];
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    lo[e] = acc[2 * k2][e] * kept(2 * k2, e);
    hi[e] = acc[2 * k2 + 1][e] * kept(2 * k2 + 1, e);
  }
  acc_to_a<T>(a, lo, hi);
}

// Row h (0: fragment row g, 1: row g + 8) of a 16 x (8 kDT) fp32 accumulator tile, times
// `scale`, into dst[0 .. cols): a thread writes its column pairs 8 dt + 2 (lane % 4), + 1.
template <typename T, int kDT>
__device__ __forceinline__ void store_acc_row(T* dst, const float (&acc)[kDT][4], int h, int lane, int64_t cols,
                                              float scale) {
#pragma unroll
  for (int dt = 0; dt < kDT; ++dt) {
    const int col = dt * 8 + 2 * (lane & 3);
    if (col < cols)
      *reinterpret_cast<uint32_t*>(dst + col) = Elem<T>::pack(acc[dt][2 * h] * scale, acc[dt][2 * h + 1] * scale);
  }
}

// acc (16 x kD) += a (16 x 16) * B, with B rows k0 .. k0 + 15 of a tile stored k x n (V, dO, Q,
// K as the right operand), read by the transposing ldmatrix; `lane` from lane_b_kn, `off` the
// tile's byte offset from where `lane` was taken.
template <class Tile, typename T, int kDT>
__device__ __forceinline__ void mma_a_tile_kn(float (&acc)[kDT][4], const uint32_t (&a)[4],
                                              const typename Tile::Lane& lane, int k0, uint32_t off) {
#pragma unroll
  for (int d2 = 0; d2 < kDT / 2; ++d2) {
    uint32_t b[4];
    ldmatrix_x4_trans(b, Tile::at(lane, 2 * d2, k0) + off);
    Elem<T>::mma(acc[2 * d2], a, b[0], b[1]);
    Elem<T>::mma(acc[2 * d2 + 1], a, b[2], b[3]);
  }
}

// cp.async of key block n0 .. n0 + rows - 1 of K and V (rows past len_k zero-filled) into the
// K and V tiles at dst and dst + Tile::kBytes
template <class Tile, int kThreads, typename T>
__device__ __forceinline__ void load_kv_block(uint32_t dst, const AttnParams& p, const T* k_head, const T* v_head,
                                              int64_t n0) {
  load_rows_async<Tile, kThreads>(dst, k_head + n0 * p.k_stride[2], p.k_stride[2], p.len_k - n0,
                                  static_cast<int>(p.head_dim), k_head);
  load_rows_async<Tile, kThreads>(dst + Tile::kBytes, v_head + n0 * p.v_stride[2], p.v_stride[2], p.len_k - n0,
                                  static_cast<int>(p.head_dim_v), v_head);
}

}  // namespace cuda
}  // namespace attnkern
