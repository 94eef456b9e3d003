// CPU backward: a delta pass over query rows, a main pass over (key chunk, batch, kv head)
// items, and a pass that writes dq.
//
// Each main item owns its keys' rows of dk/dv (all query heads of a GQA group are summed
// inside the item, so K/V are never repeated) and adds into a dq accumulator. Items of
// the same (batch, kv head) write the same dq rows, so when there are too few (batch, kv
// head) pairs to occupy the threads the keys are split into `parts` chunks, each with its
// own dq accumulator, summed in a fixed order afterwards: deterministic, no atomics.
//
// The accumulators are the backward's only memory that could grow with the thread count, so
// their total is capped (kDqAccumulatorBudget) whatever the thread count: past the cap, the
// key chunks stay wider and some threads of a many-core server get no main-pass item when
// there are few (batch, kv head) pairs (documented in README, "CPU threads").
//
// Rare path: a query row whose fp32 LSE is huge (mask.h kHugeLse: a row all at a -1e9 or
// finfo.min mask) has lost log(sum) in it, so P = exp(s - LSE) would be wrong. When the saved
// LSE holds such a row, the forward runs once more and writes every row's (max, log2 sum)
// (AttnParams::row_stats), which those rows' P then comes from. The forward keeps its outputs
// and its plain loop; the plain backward pays one scan of the LSE.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "cpu_kernels.h"
#include "parallel.h"
#include "tiling.h"

namespace attnkern::cpu {

std::vector<float> backward_row_stats_if_needed(const AttnParams& p) {
  const int64_t rows = p.batch * p.heads_q * p.len_q, ev = p.head_dim_v;
  bool huge = false;
  for (int64_t r = 0; r < rows; ++r) huge |= lse_is_huge(p.lse[r]);
  if (!huge) return {};
  // the forward again over the backward's inputs, for its row statistics only (its output and
  // LSE go to scratch; dropout changes neither the max nor the sum)
  std::vector<float> stats(static_cast<size_t>(2 * rows));
  auto out = alloc_scratch(static_cast<size_t>(rows * ev));  // fp32-sized: holds any dtype
  auto lse = alloc_scratch(static_cast<size_t>(rows));
  AttnParams f = p;
  f.o = out.get();
  f.o_stride[0] = p.heads_q * p.len_q * ev;
  f.o_stride[1] = p.len_q * ev;
  f.o_stride[2] = ev;
  f.lse = lse.get();
  f.row_stats = stats.data();
  forward(f);
  return stats;
}

// Bytes all dq accumulators together may take (at least one is always allocated).
constexpr int64_t kDqAccumulatorBudget = int64_t(128) << 20;

int64_t backward_dq_parts(const AttnParams& p, int64_t threads) {
  const int64_t block_k = key_block_size(p);
  const int64_t key_blocks = std::max<int64_t>(1, (p.len_k + block_k - 1) / block_k);
  const int64_t pairs = std::max<int64_t>(1, p.batch * p.heads_kv);
  const int64_t accumulator_bytes = std::max<int64_t>(1, p.batch * p.heads_q * p.len_q * p.head_dim * 4);
  const int64_t by_memory = std::max<int64_t>(1, kDqAccumulatorBudget / accumulator_bytes);
  // The (batch, kv head) items all carry the same work: when the threads can share them out
  // evenly, key parts only add dq accumulators to zero and to sum: the Gemma-2-like bf16
  // forward+backward (4 kv heads, 2 threads) now takes one 32 MiB accumulator instead of two, at
  // the same speed (0.99x and 1.02x in two same-process random-order runs of 9 rounds,
  // 2026-11-30). With fewer pairs than threads the parts stay: a causal band gives the first part
  // most of the work, so they are needed for balance.
  if (pairs >= threads && pairs % threads == 0) return 1;
  return parts_for_threads(pairs, threads, std::min(key_blocks, by_memory));
}

int64_t backward_dq_parts(const AttnParams& p) { return backward_dq_parts(p, at::get_num_threads()); }

void backward(const AttnParams& params, float* dq_acc, int64_t parts) {
  // no (batch, kv head) pair: dq/dk/dv are empty (every division below is by a non-zero count
  // of items; a kv head without query rows still writes its zero dk/dv rows)
  if (params.batch == 0 || params.heads_kv == 0) return;
  AttnParams p = params;
  const std::vector<float> row_stats = backward_row_stats_if_needed(p);
  if (!row_stats.empty()) p.row_stats = const_cast<float*>(row_stats.data());
  const KernelTable& kt = select_kernels();
  ThreadTrace::get().begin_op();
  const int64_t heads = p.batch * p.heads_q;
  const int64_t block_k = key_block_size(p);

  parallel_items(heads, 0, [&](int64_t bh, float*) {
    kt.backward_delta(p, bh / p.heads_q, bh % p.heads_q, p.delta + bh * p.len_q);
  });

  const int64_t key_blocks = (p.len_k + block_k - 1) / block_k;
  const int64_t blocks_per_part = (key_blocks + parts - 1) / parts;
  const int64_t pairs = p.batch * p.heads_kv;
  const int64_t part_stride = heads * p.len_q * p.head_dim;
  parallel_items(parts * pairs, kt.backward_scratch_floats(p, block_k), [&](int64_t item, float* scratch) {
    const int64_t part = item / pairs, pair = item % pairs;
    const int64_t key_begin = std::min(p.len_k, part * blocks_per_part * block_k);
    const int64_t key_end = std::min(p.len_k, (part + 1) * blocks_per_part * block_k);
    kt.backward_item(p, pair / p.heads_kv, pair % p.heads_kv, key_begin, key_end, block_k,
                     dq_acc + part * part_stride, scratch);
  });

  parallel_items(heads, 0, [&](int64_t bh, float*) {
    kt.backward_write_dq(p, bh / p.heads_q, bh % p.heads_q, dq_acc, parts, part_stride);
  });
}

}  // namespace attnkern::cpu
