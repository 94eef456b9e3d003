// Interface between the CPU orchestration (forward.cpp / backward.cpp, which own threads
// and scratch memory) and the ISA-specific kernels (kernels_<isa>.cpp). No torch types.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "../mask.h"
#include "../params.h"

namespace attnkern::cpu {

// Query rows per tile: multiples of every ISA's vector width, so the per-row softmax
// statistics are whole vectors. The forward uses the narrow tile for short queries.
constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockQNarrow = 16;
constexpr int64_t kBlockQMid = 32;  // groups of 17-32 rows: half the padding of a 64-row tile
// Rows of the forward's query-major decoding items (kernels_impl.inc, decode_tile)
constexpr int64_t kDecodeRows = 8;

// Query rows of one forward tile. Unpacked: tile row m is query row0 + m of head hq0.
// Packed (decoding, GQA): the rows of all query heads of one kv group are numbered
// x = g * len_q + i (head hq0 + g, query i), and tile row m is x = row0 + m, so the group's
// K/V blocks are read once for all of its heads and short queries still fill a tile.
struct RowMap {
  int64_t hq0, row0, len_q;
  bool packed;

  // always_inline (ATTNKERN_HD): no out-of-line copy compiled for one ISA may serve another
  ATTNKERN_HD int64_t head(int64_t m) const { return packed ? hq0 + (row0 + m) / len_q : hq0; }
  ATTNKERN_HD int64_t query(int64_t m) const { return packed ? (row0 + m) % len_q : row0 + m; }
};

// One forward work item: `rows` rows (at most block_q) of batch b. With splits > 1 it covers
// only key blocks [split * n / splits, (split + 1) * n / splits) of the n blocks its rows
// meet, and writes its normalised partial output to o_part (fp32, indexed [split][(b * Hq + h)
// * L + i][:]) and its softmax (max, sum) in the log2 domain to stats_part (same index, 2
// floats) for forward_merge_splits, instead of o and lse. With groups > 1 it covers that many
// row groups of batch b (ForwardPlan::groups_per_item): `map` is the first one's, and group g
// starts at query head map.hq0 + g * (packed ? Hq / Hkv : 1) with the same rows.
struct ForwardItem {
  int64_t b;
  RowMap map;
  int64_t rows, block_q, block_k;
  int64_t split, splits;
  float *o_part, *stats_part;
  int64_t groups = 1;
};

struct KernelTable {
  const char* isa;
  // Forward of one item (block_q kBlockQ, kBlockQMid or kBlockQNarrow).
  void (*forward_item)(const AttnParams& p, const ForwardItem& item, float* scratch);
  // scratch of one item of `groups` row groups (ForwardItem::groups)
  size_t (*forward_scratch_floats)(const AttnParams& p, int64_t block_q, int64_t block_k, int64_t groups);
  // whether this variant's forward serves decoding-sized items (at most kDecodeRows rows, one
  // narrow tile) of p query-major (decode_tile), the tile that reads a key's rows of every kv
  // head in one pass when an item holds several row groups
  bool (*forward_decodes_query_major)(const AttnParams& p);
  // o, lse (and row_stats when set) of head (b, h) from `splits` partial results (ForwardItem),
  // weighted by their softmax sums
  void (*forward_merge_splits)(const AttnParams& p, int64_t b, int64_t h, int64_t splits, const float* o_part,
                               const float* stats_part);
  // Backward for keys [key_begin, key_end) of kv head (b, hkv) against every query head of
  // its group: writes those rows of dk and dv, and adds into dq_acc (fp32, (B, Hq, L, E)
  // contiguous, unscaled) the contribution of these keys. Items with disjoint key ranges
  // for the same (b, hkv) need separate dq_acc buffers.
  void (*backward_item)(const AttnParams& p, int64_t b, int64_t hkv, int64_t key_begin, int64_t key_end,
                        int64_t block_k, float* dq_acc, float* scratch);
  size_t (*backward_scratch_floats)(const AttnParams& p, int64_t block_k);
  // delta[i] = dot(dout[i], o[i]) - dlse[i] for `rows` rows starting at row `row` of head (b, h)
  void (*backward_delta)(const AttnParams& p, int64_t b, int64_t h, float* delta_bh);
  // dq[b, h, :, :] = scale * sum over `parts` partial fp32 accumulators (stride part_stride)
  void (*backward_write_dq)(const AttnParams& p, int64_t b, int64_t h, const float* dq_acc, int64_t parts,
                            int64_t part_stride);
};

// nullptr where the file was not compiled for that ISA (non-x86 builds)
const KernelTable* amx_bf16_kernels();
const KernelTable* avx512_bf16_kernels();
const KernelTable* avx512_kernels();
const KernelTable* avx2_kernels();
const KernelTable* generic_kernels();

// The best table for this CPU; ATTNKERN_CPU_ISA=generic|avx2|avx512|avx512_bf16|amx_bf16
// overrides (for tests).
const KernelTable& select_kernels();
// Switches this process to the variant `name` ("auto" or "": back to select_kernels()'s own
// choice), throwing if it cannot run here: for benchmarks comparing variants in one process.
// Set it between calls, not during one.
void set_kernels(const char* name);
// Why the amx_bf16 kernels cannot run in this process (one line), or "" when they can.
const char* amx_unusable_reason();

// fp32 inputs in the amx_bf16 variant: how many bf16 cross products of the three-way split
// (gemm_amx.h, kSplitTerms) make each forward block product on AMX tiles, 0 for the AVX-512 FMA
// path. Opt-in: ATTNKERN_CPU_FP32_AMX (read once: 0 = FMA path, the default; 6 or 9 = terms)
// sets it for a process, set_fp32_amx_terms (0, 1, 3, 6 or 9; -1: back to the environment's
// choice) between calls (benchmarks, accuracy tests). The FMA path stays the default because
// the split measured slower on the one AMX CPU tried (benchmarks/bench_cpu_fp32_split.py).
int fp32_amx_terms();
void set_fp32_amx_terms(int terms);
// Introspection: forward items that ran their fp32 products on the split since the process
// started (a relaxed counter bumped once per item).
void note_fp32_split_item();
int64_t fp32_split_items();

}  // namespace attnkern::cpu

namespace attnkern::cpu {

// Entry points used by the bindings (forward.cpp, backward.cpp).
void forward(const AttnParams& p);
// Number of dq accumulators backward() needs (each (B, Hq, L, E) fp32, zero-filled), for
// torch's current thread count or for `threads` (work-plan reports).
int64_t backward_dq_parts(const AttnParams& p);
int64_t backward_dq_parts(const AttnParams& p, int64_t threads);
// p.delta must point to a (B, Hq, L) fp32 workspace; dq_acc to `parts` zeroed accumulators.
void backward(const AttnParams& p, float* dq_acc, int64_t parts);
// The backward's rare path (backward.cpp): every row's (max, log2 sum) for AttnParams::row_stats
// when some row of p.lse is huge (mask.h lse_is_huge), else empty.
std::vector<float> backward_row_stats_if_needed(const AttnParams& p);

}  // namespace attnkern::cpu
