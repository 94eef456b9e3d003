// Packed (varlen) and paged batches in the sm80 kernels. A kernel's varlen variant is the same
// template with its tile config wrapped in Varlen<> (so the dense instantiations, their names
// and their code stay as they are): one launch covers every sequence, the grid is sized for the
// longest, and each CTA reads its sequence's lengths and first rows from cu_seqlens at its start
// (SeqSpan) and leaves at once when its tile lies past them. Keys come from the pack or, with
// p.block_table, from pages of any size. See params.h for the layout.
#pragma once

#include "../params.h"
#include "smem_tile.cuh"

namespace attnkern {
namespace cuda {

template <class Cfg>
struct Varlen : Cfg {};

template <class Cfg>
struct IsVarlen {
  static constexpr bool value = false;
};
template <class Cfg>
struct IsVarlen<Varlen<Cfg>> {
  static constexpr bool value = true;
};

// One batch entry as a CTA sees it. Packed: sequence b's lengths and its first query / key row
// in the pack (key row 0 when paged: the table then places every key). Dense: rows from 0 (the
// batch stride does the rest); the lengths are p's.
//
// The kernels read the lengths as (kVarlen ? seq.len_q : p.len_q), written out at each use:
// the same through a function (even one returning p.len_q for dense kernels) changed the dense
// decode kernel's SASS with CUDA 13.0, and the dense kernels must stay as they were.
template <bool kVarlen>
struct SeqSpan {
  int64_t len_q = 0, len_k = 0, q_row0 = 0, k_row0 = 0;
  int64_t index = 0;  // packed: b, the sequence (its ALiBi slope row, its dropout seed p.dropout_seed + b)

  __device__ __forceinline__ SeqSpan(const AttnParams& p, int64_t b) {
    if constexpr (kVarlen) {
      index = b;
      const int64_t q0 = p.cu_seqlens_q[b], k0 = p.cu_seqlens_k[b];
      len_q = p.cu_seqlens_q[b + 1] - q0;
      len_k = p.seqused_k != nullptr ? p.seqused_k[b] : p.cu_seqlens_k[b + 1] - k0;
      q_row0 = q0;
      k_row0 = p.block_table != nullptr ? 0 : k0;
    }
  }
};

// Offset of query row i's LSE (and delta): (B, Hq, L) dense, (Hq, total_q) packed.
// (q_row0: SeqSpan::q_row0)
template <bool kVarlen>
__device__ __forceinline__ int64_t lse_index(const AttnParams& p, int64_t q_row0, int64_t b, int64_t hq, int64_t i) {
  return kVarlen ? hq * p.total_q + q_row0 + i : (b * p.heads_q + hq) * p.len_q + i;
}

// cp.async of keys n0 .. n0 + Tile::kRows - 1 (those at or past len_k zero-filled) of K and V
// into the tiles at dst and dst + Tile::kBytes. k_head / v_head point at the kv head's key 0:
// rows k_stride[2] apart or, with p.block_table, key j is row j % page_size of page
// block_table[b][j / page_size] (pages k_stride[0] apart).
// Dense: load_kv_block as it was (an explicit len_k argument alone changes the dense kernels'
// code). kMayPage false: a packed call without a table (the backward).
template <class Tile, int kThreads, bool kVarlen, bool kMayPage = true, typename T>
__device__ __forceinline__ void load_seq_kv_block(uint32_t dst, const AttnParams& p, const T* k_head,
                                                  const T* v_head, int64_t n0, int64_t len_k, int64_t b) {
  if constexpr (!kVarlen) {
    load_kv_block<Tile, kThreads>(dst, p, k_head, v_head, n0);
    return;
  }
  if (!kMayPage || p.block_table == nullptr) {
    load_rows_async<Tile, kThreads>(dst, k_head + n0 * p.k_stride[2], p.k_stride[2], len_k - n0,
                                    static_cast<int>(p.head_dim), k_head);
    load_rows_async<Tile, kThreads>(dst + Tile::kBytes, v_head + n0 * p.v_stride[2], p.v_stride[2], len_k - n0,
                                    static_cast<int>(p.head_dim_v), v_head);
    return;
  }
  const int32_t* const table = p.block_table + b * p.block_table_stride;
  const int page = static_cast<int>(p.page_size);  // keys < 2^31 (the bindings check it)
  auto page_row = [&](int r, const T* head, int64_t page_stride, int64_t row_stride) -> const T* {
    const int64_t j = n0 + r;
    if (j >= len_k) return nullptr;
    const int jj = static_cast<int>(j);
    return head + table[jj / page] * page_stride + (jj % page) * row_stride;
  };
  load_tile_async<Tile, kThreads>(
      dst, [&](int r) { return page_row(r, k_head, p.k_stride[0], p.k_stride[2]); }, static_cast<int>(p.head_dim),
      k_head);
  load_tile_async<Tile, kThreads>(
      dst + Tile::kBytes, [&](int r) { return page_row(r, v_head, p.v_stride[0], p.v_stride[2]); },
      static_cast<int>(p.head_dim_v), v_head);
}

}  // namespace cuda
}  // namespace attnkern
