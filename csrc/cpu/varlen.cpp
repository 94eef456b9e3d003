// CPU orchestration of packed variable-length batches (see varlen.h).
#include "varlen.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <numeric>

#include "cpu_kernels.h"
#include "parallel.h"
#include "tiling.h"

namespace attnkern::cpu {
namespace {

// Sequences with rows to compute, longest key range first: their items are the most
// expensive, so the dynamic schedule starts them first (longest-processing-time order).
std::vector<int64_t> sequences_by_cost(const std::vector<AttnParams>& seqs) {
  std::vector<int64_t> order;
  for (int64_t s = 0; s < static_cast<int64_t>(seqs.size()); ++s)
    if (seqs[s].len_q > 0 && seqs[s].heads_q > 0) order.push_back(s);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return seqs[a].len_q * seqs[a].len_k > seqs[b].len_q * seqs[b].len_k;
  });
  return order;
}

// Items of all sequences numbered one after another: item i belongs to order[s] with
// first[s] <= i < first[s + 1].
struct ItemRanges {
  std::vector<int64_t> first;
  int64_t total() const { return first.back(); }
  int64_t find(int64_t item) const {
    return std::upper_bound(first.begin(), first.end(), item) - first.begin() - 1;
  }
};

}  // namespace

void varlen_forward(const std::vector<AttnParams>& seqs) {
  const KernelTable& kt = select_kernels();
  const int64_t threads = at::get_num_threads();
  const std::vector<int64_t> order = sequences_by_cost(seqs);
  const int64_t n = static_cast<int64_t>(order.size());
  if (n == 0) return;
  const int64_t block_k = key_block_size(seqs[order[0]]);

  std::vector<ForwardPlan> plans(n);
  int64_t unsplit_items = 0;
  for (int64_t s = 0; s < n; ++s) {
    plans[s] = forward_plan(seqs[order[s]], threads, kt);
    unsplit_items += plans[s].row_groups / plans[s].groups_per_item * plans[s].tiles;
  }
  // forward_plan splits a sequence's keys when that sequence alone cannot occupy the
  // threads; the batch as a whole may. A whole-row sequence (ForwardPlan::groups_per_item)
  // keeps its split: unsplit, its one item would hold every head's keys, and a long sequence
  // among short ones would run on one thread while the others idle.
  if (unsplit_items >= 2 * threads)
    for (ForwardPlan& plan : plans)
      if (plan.groups_per_item == 1) plan.splits = 1;

  // split partial results, one region per split sequence
  std::vector<int64_t> o_off(n + 1, 0), stats_off(n + 1, 0);
  size_t scratch = 0;
  for (int64_t s = 0; s < n; ++s) {
    const AttnParams& p = seqs[order[s]];
    const int64_t rows = plans[s].splits > 1 ? plans[s].splits * p.heads_q * p.len_q : 0;
    o_off[s + 1] = o_off[s] + rows * p.head_dim_v;
    stats_off[s + 1] = stats_off[s] + 2 * rows;  // (max, sum) per row
    scratch = std::max(scratch, kt.forward_scratch_floats(p, plans[s].block_q, block_k, plans[s].groups_per_item));
  }
  std::unique_ptr<float[], FreeDeleter> o_part, stats_part;
  if (o_off[n] > 0) {
    o_part = alloc_scratch(static_cast<size_t>(o_off[n]));
    stats_part = alloc_scratch(static_cast<size_t>(stats_off[n]));
  }

  ItemRanges items{std::vector<int64_t>(n + 1, 0)};
  for (int64_t s = 0; s < n; ++s) items.first[s + 1] = items.first[s] + forward_items(seqs[order[s]], plans[s]);
  parallel_items(items.total(), scratch, [&](int64_t index, float* buf) {
    const int64_t s = items.find(index);
    const AttnParams& p = seqs[order[s]];
    kt.forward_item(p,
                    forward_item_at(p, plans[s], index - items.first[s], block_k, o_part.get() + o_off[s],
                                    stats_part.get() + stats_off[s]),
                    buf);
  });

  ItemRanges merges{std::vector<int64_t>(n + 1, 0)};
  for (int64_t s = 0; s < n; ++s)
    merges.first[s + 1] = merges.first[s] + (plans[s].splits > 1 ? seqs[order[s]].heads_q : 0);
  parallel_items(merges.total(), 0, [&](int64_t index, float*) {
    const int64_t s = merges.find(index);
    kt.forward_merge_splits(seqs[order[s]], 0, index - merges.first[s], plans[s].splits, o_part.get() + o_off[s],
                            stats_part.get() + stats_off[s]);
  });
}

VarlenBackwardPlan varlen_backward_plan(const std::vector<AttnParams>& seqs) {
  // Each (sequence, kv head) item writes its own dk/dv rows; one whose keys are split into
  // chunks writes one dq accumulator per chunk. Chunks aim at an even share of the total
  // cost, so one long sequence among short ones does not run alone at the end.
  const int64_t threads = at::get_num_threads();
  const int64_t n = static_cast<int64_t>(seqs.size());
  double total = 0;
  for (const AttnParams& p : seqs) total += double(p.len_q) * double(p.len_k) * double(p.heads_kv);
  const double target = std::max(1.0, total / double(2 * threads));
  VarlenBackwardPlan plan;
  plan.parts.resize(n);
  plan.acc_offset.resize(n);
  for (int64_t s = 0; s < n; ++s) {
    const AttnParams& p = seqs[s];
    const int64_t block_k = key_block_size(p);
    const int64_t key_blocks = std::max<int64_t>(1, (p.len_k + block_k - 1) / block_k);
    const double cost = double(p.len_q) * double(p.len_k);
    plan.parts[s] = std::clamp<int64_t>(static_cast<int64_t>(cost / target + 0.999), 1, key_blocks);
    plan.acc_offset[s] = plan.acc_floats;
    plan.acc_floats += plan.parts[s] * p.heads_q * p.len_q * p.head_dim;
  }
  return plan;
}

void varlen_backward(const std::vector<AttnParams>& seqs_in, const VarlenBackwardPlan& plan, float* dq_acc) {
  const KernelTable& kt = select_kernels();
  // the rare path of backward.cpp, per sequence: rows with a huge LSE get recomputed statistics
  std::vector<AttnParams> seqs = seqs_in;
  std::vector<std::vector<float>> row_stats(seqs.size());
  for (size_t s = 0; s < seqs.size(); ++s) {
    row_stats[s] = backward_row_stats_if_needed(seqs[s]);
    if (!row_stats[s].empty()) seqs[s].row_stats = row_stats[s].data();
  }
  const std::vector<int64_t> order = sequences_by_cost(seqs);
  const int64_t n = static_cast<int64_t>(order.size());
  if (n == 0) return;
  const int64_t block_k = key_block_size(seqs[order[0]]);

  ItemRanges heads{std::vector<int64_t>(n + 1, 0)}, main{std::vector<int64_t>(n + 1, 0)};
  size_t scratch = 0;
  for (int64_t s = 0; s < n; ++s) {
    const AttnParams& p = seqs[order[s]];
    heads.first[s + 1] = heads.first[s] + p.heads_q;
    main.first[s + 1] = main.first[s] + plan.parts[order[s]] * p.heads_kv;
    scratch = std::max(scratch, kt.backward_scratch_floats(p, block_k));
  }
  auto acc_of = [&](int64_t s) { return dq_acc + plan.acc_offset[order[s]]; };
  auto part_stride = [&](const AttnParams& p) { return p.heads_q * p.len_q * p.head_dim; };

  parallel_items(heads.total(), 0, [&](int64_t index, float*) {
    const int64_t s = heads.find(index), h = index - heads.first[s];
    const AttnParams& p = seqs[order[s]];
    kt.backward_delta(p, 0, h, p.delta + h * p.len_q);
  });

  parallel_items(main.total(), scratch, [&](int64_t index, float* buf) {
    const int64_t s = main.find(index), local = index - main.first[s];
    const AttnParams& p = seqs[order[s]];
    const int64_t parts = plan.parts[order[s]];
    const int64_t part = local / p.heads_kv, hkv = local % p.heads_kv;
    const int64_t key_blocks = (p.len_k + block_k - 1) / block_k;
    const int64_t per_part = (key_blocks + parts - 1) / parts;
    const int64_t key_begin = std::min(p.len_k, part * per_part * block_k);
    const int64_t key_end = std::min(p.len_k, (part + 1) * per_part * block_k);
    kt.backward_item(p, 0, hkv, key_begin, key_end, block_k, acc_of(s) + part * part_stride(p), buf);
  });

  parallel_items(heads.total(), 0, [&](int64_t index, float*) {
    const int64_t s = heads.find(index), h = index - heads.first[s];
    const AttnParams& p = seqs[order[s]];
    kt.backward_write_dq(p, 0, h, acc_of(s), plan.parts[order[s]], part_stride(p));
  });
}

}  // namespace attnkern::cpu
