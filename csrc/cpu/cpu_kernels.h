// Interface between the CPU orchestration (forward.cpp / backward.cpp, which own threads
// and scratch memory) and the ISA-specific kernels (kernels_<isa>.cpp). No torch types.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../params.h"

namespace attnkern::cpu {

// Query rows per tile: multiples of every ISA's vector width, so the per-row softmax
// statistics are whole vectors. The forward uses the narrow tile for short queries.
constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockQNarrow = 16;

struct KernelTable {
  const char* isa;
  // Forward of query block `q_block` (rows q_block*block_q ...) of query head (b, h), with
  // block_q kBlockQ or kBlockQNarrow: writes those rows of o and lse.
  void (*forward_item)(const AttnParams& p, int64_t b, int64_t h, int64_t q_block, int64_t block_q, int64_t block_k,
                       float* scratch);
  size_t (*forward_scratch_floats)(const AttnParams& p, int64_t block_q, int64_t block_k);
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
const KernelTable* avx512_kernels();
const KernelTable* avx2_kernels();
const KernelTable* generic_kernels();

// The best table for this CPU; ATTNKERN_CPU_ISA=generic|avx2|avx512 overrides (for tests).
const KernelTable& select_kernels();

}  // namespace attnkern::cpu

namespace attnkern::cpu {

// Entry points used by the bindings (forward.cpp, backward.cpp).
void forward(const AttnParams& p);
// Number of dq accumulators backward() needs (each (B, Hq, L, E) fp32, zero-filled).
int64_t backward_dq_parts(const AttnParams& p);
// p.delta must point to a (B, Hq, L) fp32 workspace; dq_acc to `parts` zeroed accumulators.
void backward(const AttnParams& p, float* dq_acc, int64_t parts);

}  // namespace attnkern::cpu
