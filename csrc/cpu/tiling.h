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
};

// Keys per split part worth a merge: below this the partial outputs cost more than they share.
constexpr int64_t kMinKeysPerSplit = 512;

// Work items per thread the split aims for: with dynamic scheduling, about four items per
// thread keep the last ones from leaving most threads idle (uneven causal/window items).
constexpr int64_t kItemsPerThread = 4;
constexpr int64_t kManyThreads = 16;

// Key-range parts per item that give `items` items about kItemsPerThread per thread, at
// most `most` (1 when there is already work enough, or one thread: splitting then only costs).
inline int64_t parts_for_threads(int64_t items, int64_t threads, int64_t most) {
  if (threads <= 1 || items <= 0 || items >= kItemsPerThread * threads || most <= 1) return 1;
  const int64_t want = (kItemsPerThread * threads + items - 1) / items;
  return want < most ? want : most;
}

inline ForwardPlan forward_plan(const AttnParams& p, int64_t threads) {
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
  const int64_t items = p.batch * plan.row_groups * plan.tiles;
  int64_t keys = 0;
  if (items > 0 && items < kItemsPerThread * threads) {
    const Band band = make_band(p);
    keys = band.range_hi(p.len_q) - band.range_lo(0);
  }
  // On a few cores a split must carry kMinKeysPerSplit keys to pay for its merge (measured on
  // 2 cores); with many threads that would otherwise idle, one key block per split is enough
  // (kManyThreads: unmeasured, no many-core machine here).
  const int64_t min_keys = threads >= kManyThreads ? key_block_size(p) : kMinKeysPerSplit;
  plan.splits = parts_for_threads(items, threads, keys / min_keys);
  return plan;
}

// Work items of one problem under `plan`: group by group (neighbouring query tiles share most
// of their keys, which then stay in cache) and, within a group, from the last query tile to the
// first: under a causal band the last tiles see the most keys, so the cheap ones are left to
// fill in at the end (longest-processing-time order).
inline int64_t forward_items(const AttnParams& p, const ForwardPlan& plan) {
  return p.batch * plan.row_groups * plan.tiles * plan.splits;
}
inline ForwardItem forward_item_at(const AttnParams& p, const ForwardPlan& plan, int64_t index, int64_t block_k,
                                   float* o_part, float* stats_part) {
  const int64_t per_group = plan.tiles * plan.splits;
  const int64_t bg = index / per_group, rest = index % per_group;
  const int64_t tile = plan.tiles - 1 - rest / plan.splits;
  const int64_t g = bg % plan.row_groups;
  const int64_t group_size = p.heads_q / p.heads_kv;
  ForwardItem item;
  item.b = bg / plan.row_groups;
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
