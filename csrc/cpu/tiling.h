// Tile sizes and the forward's work split for the CPU kernels: one place, shared by forward
// and backward.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../mask.h"
#include "../params.h"
#include "cpu_kernels.h"

namespace attnkern::cpu {

// Keys per tile. The S^T tile (block_k x 64 fp32) should stay in L1/L2 next to the K/V
// rows it came from; 128 keys keeps it at 32 KiB.
inline int64_t key_block_size(const AttnParams&) { return 128; }

// Query rows per forward tile for `rows` rows: narrow tiles for decoding-sized queries.
inline int64_t forward_block_q(int64_t rows) {
  return rows <= kBlockQNarrow ? kBlockQNarrow : rows <= kBlockQMid ? kBlockQMid : kBlockQ;
}

// Tile columns spent on `rows` rows, padding included.
inline int64_t padded_rows(int64_t rows) {
  const int64_t bq = forward_block_q(rows);
  return (rows + bq - 1) / bq * bq;
}

// How the forward cuts its work: per batch, `row_groups` groups of `group_rows` rows (query
// heads of L rows, or, packed, kv heads of (Hq / Hkv) * L rows: see RowMap), each in tiles of
// block_q rows, each tile's key range in `splits` parts.
struct ForwardPlan {
  bool packed;
  int64_t row_groups, group_rows, block_q, tiles, splits;
  int64_t groups_per_item = 1;  // row groups one item covers (whole-row decoding, below)
};

// Keys per split part worth a merge: below this the partial outputs cost more than they share.
constexpr int64_t kMinKeysPerSplit = 512;

// Work items per thread the split aims for: with dynamic scheduling, about four items per
// thread keep the last ones from leaving most threads idle (uneven causal/window items).
constexpr int64_t kItemsPerThread = 4;
constexpr int64_t kManyThreads = 16;

// Key rows this many bytes apart or more (each row of a head in a 4 KiB page of its own) are
// read by whole-row items (forward_plan). Build against build on an AMD EPYC (AVX2), 4 rounds
// of alternating child processes (benchmarks/quiet/forward_build_ab.py whole-rows,
// cpu-avx2-decode-whole-rows-2026-12-01-*.json): six shapes with rows 4-16 KiB apart ran
// 1.08-1.61x as fast on 1 thread and 1.35-1.74x on 2. With whole rows for every
// interleaved layout (an exploratory build, 2-3 runs, not saved), rows 2 KiB apart were mixed
// (fp32 Hkv = 8, D = 64: 0.81x and 0.98x on 1 thread, 1.19-1.36x on 2; bf16 Hkv = 8, D = 128:
// 0.88-0.98x and 0.95-1.03x) and rows 1 KiB apart lost (bf16 Hkv = 8, D = 64: 0.76-0.85x and
// 0.92-0.94x), so those keep an item per head.
constexpr int64_t kWholeRowMinStrideBytes = 4096;

// K and V rows of every kv head of one key lie side by side within that key's row ((B, S, H, D)
// tensors, paged caches, QKV splits), not a head's rows side by side ((B, H, S, D)), and a
// head's consecutive rows at least kWholeRowMinStrideBytes apart
inline bool kv_heads_interleaved(const AttnParams& p) {
  const int64_t elem_bytes = p.dtype == DType::kFloat32 ? 4 : 2;
  const auto inside = [&](const int64_t* stride) {
    return stride[1] > 0 && stride[1] * p.heads_kv <= stride[2] && stride[2] * elem_bytes >= kWholeRowMinStrideBytes;
  };
  return p.heads_kv > 1 && inside(p.k_stride) && inside(p.v_stride);
}

// Key-range parts per item that give `items` items about kItemsPerThread per thread, at
// most `most` (1 when there is already work enough, or one thread: splitting then only costs).
inline int64_t parts_for_threads(int64_t items, int64_t threads, int64_t most) {
  if (threads <= 1 || items <= 0 || items >= kItemsPerThread * threads || most <= 1) return 1;
  const int64_t want = (kItemsPerThread * threads + items - 1) / items;
  return want < most ? want : most;
}

inline ForwardPlan forward_plan(const AttnParams& p, int64_t threads, const KernelTable& kt) {
  ForwardPlan plan;
  const int64_t group = p.heads_kv > 0 ? p.heads_q / p.heads_kv : 1;
  // Packing reads each K/V block once per kv group instead of once per query head; it pays
  // while one head's queries leave a tile part empty (short queries), and the padded tile
  // columns must not grow.
  plan.packed = group > 1 && p.len_q < kBlockQ && padded_rows(group * p.len_q) <= group * padded_rows(p.len_q);
  plan.row_groups = plan.packed ? p.heads_kv : p.heads_q;
  plan.group_rows = plan.packed ? group * p.len_q : p.len_q;
  plan.block_q = forward_block_q(plan.group_rows);
  plan.tiles = (plan.group_rows + plan.block_q - 1) / plan.block_q;
  // Too few tiles to occupy the threads (decoding, or B=1 prefill on a many-core server) and
  // a long key range: the keys are split across threads and the parts merged by their LSE
  // (flash-decoding, forward_merge_splits).
  const Band band = make_band(p);
  const int64_t keys = band.range_hi(p.len_q) - band.range_lo(0);
  // On a few cores a split must carry kMinKeysPerSplit keys to pay for its merge (measured on
  // 2 cores); with many threads that would otherwise idle, one key block per split is enough
  // (kManyThreads: unmeasured, no many-core machine here).
  const int64_t min_keys = threads >= kManyThreads ? key_block_size(p) : kMinKeysPerSplit;
  plan.splits = parts_for_threads(p.batch * plan.row_groups * plan.tiles, threads, keys / min_keys);
  // Whole-row decoding: when the kv heads of a key sit side by side in its row, an item per
  // batch row (and key split) covers every row group, and its decode tile reads each key block
  // of all heads at once (decode_tile), in whole rows rather than one head's slice of each.
  // A head's item alone reads D elements out of every Hkv * D; a standalone read of such a
  // cache (fp32, Hkv = 8, D = 64, ad hoc, not saved) ran at 9.6-12.5 GB/s on 1 thread and
  // 14-18 on 2 head by head, 10-13 and 18-26 in whole-row blocks, 12-18 and 21-29 for a
  // (B, H, S, D) cache. Taken only while the items still give every thread one.
  if (plan.tiles == 1 && plan.group_rows <= kDecodeRows && plan.row_groups > 1 && kv_heads_interleaved(p) &&
      kt.forward_decodes_query_major(p)) {
    const int64_t splits = parts_for_threads(p.batch, threads, keys / min_keys);
    if (p.batch * splits >= threads) {
      plan.groups_per_item = plan.row_groups;
      plan.splits = splits;
    }
  }
  return plan;
}

// Work items of one problem under `plan`: group by group (neighbouring query tiles share most
// of their keys, which then stay in cache) and, within a group, from the last query tile to the
// first: under a causal band the last tiles see the most keys, so the cheap ones are left to
// fill in at the end (longest-processing-time order).
inline int64_t forward_items(const AttnParams& p, const ForwardPlan& plan) {
  return p.batch * (plan.row_groups / plan.groups_per_item) * plan.tiles * plan.splits;
}
inline ForwardItem forward_item_at(const AttnParams& p, const ForwardPlan& plan, int64_t index, int64_t block_k,
                                   float* o_part, float* stats_part) {
  const int64_t per_group = plan.tiles * plan.splits, group_items = plan.row_groups / plan.groups_per_item;
  const int64_t bg = index / per_group, rest = index % per_group;
  const int64_t tile = plan.tiles - 1 - rest / plan.splits;
  const int64_t g = bg % group_items * plan.groups_per_item;
  const int64_t group_size = p.heads_q / p.heads_kv;
  ForwardItem item;
  item.b = bg / group_items;
  item.groups = plan.groups_per_item;
  item.map = RowMap{plan.packed ? g * group_size : g, tile * plan.block_q, p.len_q, plan.packed};
  item.rows = std::min(plan.block_q, plan.group_rows - item.map.row0);
  item.block_q = plan.block_q;
  item.block_k = block_k;
  item.split = rest % plan.splits;
  item.splits = plan.splits;
  item.o_part = o_part;
  item.stats_part = stats_part;
  return item;
}

}  // namespace attnkern::cpu
