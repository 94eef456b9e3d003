// CPU forward: splits (batch, head, query block) work items over threads.
#include "cpu_kernels.h"
#include "parallel.h"
#include "tiling.h"

namespace attnkern::cpu {

void forward(const AttnParams& p) {
  const KernelTable& kt = select_kernels();
  const int64_t block_q = forward_block_q(p);
  const int64_t q_blocks = (p.len_q + block_q - 1) / block_q;
  const int64_t heads = p.batch * p.heads_q;
  const int64_t block_k = key_block_size(p);
  // Items run head by head (neighbouring query blocks share most of their keys, which then
  // stay in cache) and, within a head, from the last query block to the first: under a
  // causal band the last blocks see the most keys, so the cheap ones are left to fill in
  // at the end (longest-processing-time order).
  parallel_items(heads * q_blocks, kt.forward_scratch_floats(p, block_q, block_k), [&](int64_t item, float* scratch) {
    const int64_t bh = item / q_blocks;
    const int64_t q_block = q_blocks - 1 - item % q_blocks;
    kt.forward_item(p, bh / p.heads_q, bh % p.heads_q, q_block, block_q, block_k, scratch);
  });
}

}  // namespace attnkern::cpu
