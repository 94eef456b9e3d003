// CPU forward: splits (batch, row group(s), query tile, key split) work items over threads
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
  const ForwardPlan plan = forward_plan(p, at::get_num_threads(), kt);
  const int64_t block_k = key_block_size(p);

  std::unique_ptr<float[], FreeDeleter> o_part, stats_part;
  if (plan.splits > 1) {
    const int64_t rows = p.batch * p.heads_q * p.len_q;
    o_part = alloc_scratch(static_cast<size_t>(plan.splits * rows * p.head_dim_v));
    stats_part = alloc_scratch(static_cast<size_t>(2 * plan.splits * rows));  // (max, sum) per row
  }
  parallel_items(forward_items(p, plan), kt.forward_scratch_floats(p, plan.block_q, block_k, plan.groups_per_item),
                 [&](int64_t index, float* scratch) {
                   const ForwardItem item = forward_item_at(p, plan, index, block_k, o_part.get(), stats_part.get());
                   kt.forward_item(p, item, scratch);
                 });
  if (plan.splits > 1)
    parallel_items(p.batch * p.heads_q, 0, [&](int64_t bh, float*) {
      kt.forward_merge_splits(p, bh / p.heads_q, bh % p.heads_q, plan.splits, o_part.get(), stats_part.get());
    });
}

}  // namespace attnkern::cpu
