// Packed variable-length batches on the CPU kernels. Each sequence is handed to the dense
// tile loop as a problem of batch 1 (its own AttnParams: pointers offset to its first rows,
// len_q / len_k its lengths, its own band), and the work items of every sequence share one
// thread pool: (sequence, row group, query tile, key split) forward, (sequence, kv head, key
// chunk) backward. Nothing is padded to the longest sequence; the cost is sum_b Lq_b * Lk_b
// (or the band's share of it).
#pragma once

#include <cstdint>
#include <vector>

#include "../params.h"

namespace attnkern::cpu {

// Per-sequence problems: batch 1, lse/delta pointing to the sequence's (Hq, len_q) block.
void varlen_forward(const std::vector<AttnParams>& seqs);

// The backward's dq accumulators: sequence s has parts[s] of them, (Hq, len_q, E) fp32 each,
// from float offset acc_offset[s] of one zero-filled buffer of acc_floats floats.
struct VarlenBackwardPlan {
  std::vector<int64_t> parts, acc_offset;
  int64_t acc_floats = 0;
};
VarlenBackwardPlan varlen_backward_plan(const std::vector<AttnParams>& seqs);
// Per-sequence problems with the backward's pointers set; deterministic (no atomics).
void varlen_backward(const std::vector<AttnParams>& seqs, const VarlenBackwardPlan& plan, float* dq_acc);

}  // namespace attnkern::cpu
