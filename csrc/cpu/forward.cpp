// CPU forward: splits (batch, row group, query tile, key split) work items over threads
// (see ForwardPlan), then merges the key splits' partial results when there are several.
#include "cpu_kernels.h"
#include "parallel.h"
#include "tiling.h"

namespace attnkern::cpu {

void forward(const AttnParams& p) {
  // no output rows: nothing to do (and heads_kv may be 0, which the group size divides by)
  if (p.batch == 0 || p.heads_q == 0 || p.len_q == 0) return;
  const KernelTable& kt = select_kernels();
  ThreadTrace::get().begin_op();
  const ForwardPlan plan = forward_plan(p, at::get_num_threads());
  const int64_t block_k = key_block_size(p);
  const int64_t groups = p.batch * plan.row_groups;
  const int64_t group_size = p.heads_q / p.heads_kv;

  std::unique_ptr<float[], FreeDeleter> o_part, lse_part;
  if (plan.splits > 1) {
    const int64_t rows = p.batch * p.heads_q * p.len_q;
    o_part = alloc_scratch(static_cast<size_t>(plan.splits * rows * p.head_dim_v));
    lse_part = alloc_scratch(static_cast<size_t>(plan.splits * rows));
  }
  // Items run group by group (neighbouring query tiles share most of their keys, which then
  // stay in cache) and, within a group, from the last query tile to the first: under a
  // causal band the last tiles see the most keys, so the cheap ones are left to fill in at
  // the end (longest-processing-time order).
  const int64_t per_group = plan.tiles * plan.splits;
  parallel_items(groups * per_group, kt.forward_scratch_floats(p, plan.block_q, block_k),
                 [&](int64_t index, float* scratch) {
                   const int64_t bg = index / per_group, rest = index % per_group;
                   const int64_t tile = plan.tiles - 1 - rest / plan.splits;
                   const int64_t g = bg % plan.row_groups;
                   ForwardItem item;
                   item.b = bg / plan.row_groups;
                   item.map = RowMap{plan.packed ? g * group_size : g, tile * plan.block_q, p.len_q, plan.packed};
                   item.rows = std::min(plan.block_q, plan.group_rows - item.map.row0);
                   item.block_q = plan.block_q;
                   item.block_k = block_k;
                   item.split = rest % plan.splits;
                   item.splits = plan.splits;
                   item.o_part = o_part.get();
                   item.lse_part = lse_part.get();
                   kt.forward_item(p, item, scratch);
                 });
  if (plan.splits > 1)
    parallel_items(p.batch * p.heads_q, 0, [&](int64_t bh, float*) {
      kt.forward_merge_splits(p, bh / p.heads_q, bh % p.heads_q, plan.splits, o_part.get(), lse_part.get());
    });
}

}  // namespace attnkern::cpu
