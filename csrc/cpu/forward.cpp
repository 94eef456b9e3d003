// CPU forward: splits (batch, row group, query tile, key split) work items over threads
// (see ForwardPlan), then merges the key splits' partial results when there are several.
#include <atomic>
#include <thread>

#include "cpu_kernels.h"
#include "parallel.h"
#include "tiling.h"

namespace attnkern::cpu {

// Bytes the forward's once-per-call copy of V may take (KernelTable::forward_v_pairs_bytes).
constexpr size_t kSharedVBudget = size_t(256) << 20;

void forward(const AttnParams& p) {
  // no output rows: nothing to do (and heads_kv may be 0, which the group size divides by)
  if (p.batch == 0 || p.heads_q == 0 || p.len_q == 0) return;
  const KernelTable& kt = select_kernels();
  ThreadTrace::get().begin_op();
  const ForwardPlan plan = forward_plan(p, at::get_num_threads());
  const int64_t block_k = key_block_size(p);

  std::unique_ptr<float[], FreeDeleter> o_part, stats_part;
  if (plan.splits > 1) {
    const int64_t rows = p.batch * p.heads_q * p.len_q;
    o_part = alloc_scratch(static_cast<size_t>(plan.splits * rows * p.head_dim_v));
    stats_part = alloc_scratch(static_cast<size_t>(2 * plan.splits * rows));  // (max, sum) per row
  }
  // V packed once for the whole call when each V block serves several query tiles (each would
  // pack it again): as many bytes as V itself, capped at kSharedVBudget (past it, per tile). The
  // packing runs as the first items of the forward's own parallel pass (a pass of its own costs a
  // fork and join, which on a busy machine waits for a descheduled thread), and an item waits
  // until its kv head's V is packed: items are pulled in order, so that item was pulled before
  // it and is running or done (no cycle: an item only waits on a smaller index).
  const size_t v_bytes = kt.forward_v_pairs_bytes(p);
  const int64_t tiles_per_kv_head = plan.tiles * (plan.packed ? 1 : p.heads_q / p.heads_kv);
  const bool share_v = v_bytes > 0 && v_bytes <= kSharedVBudget && tiles_per_kv_head > 1;
  const int64_t packs = share_v ? p.batch * p.heads_kv : 0;
  std::unique_ptr<float[], FreeDeleter> v_pairs;
  std::unique_ptr<std::atomic<bool>[]> packed;
  if (share_v) {
    v_pairs = alloc_scratch((v_bytes + 3) / 4);
    packed.reset(new std::atomic<bool>[packs]);
    for (int64_t i = 0; i < packs; ++i) packed[i].store(false, std::memory_order_relaxed);
  }
  uint32_t* v_dst = reinterpret_cast<uint32_t*>(v_pairs.get());
  parallel_items(packs + forward_items(p, plan), kt.forward_scratch_floats(p, plan.block_q, block_k),
                 [&](int64_t index, float* scratch) {
                   if (index < packs) {
                     kt.forward_pack_v(p, index / p.heads_kv, index % p.heads_kv, v_dst);
                     packed[index].store(true, std::memory_order_release);
                     return;
                   }
                   ForwardItem item =
                       forward_item_at(p, plan, index - packs, block_k, o_part.get(), stats_part.get());
                   if (share_v) {
                     const int64_t pair = item.b * p.heads_kv + item.map.head(0) / (p.heads_q / p.heads_kv);
                     while (!packed[pair].load(std::memory_order_acquire)) std::this_thread::yield();
                     item.v_pairs = v_dst;
                   }
                   kt.forward_item(p, item, scratch);
                 });
  if (plan.splits > 1)
    parallel_items(p.batch * p.heads_q, 0, [&](int64_t bh, float*) {
      kt.forward_merge_splits(p, bh / p.heads_q, bh % p.heads_q, plan.splits, o_part.get(), stats_part.get());
    });
}

}  // namespace attnkern::cpu
