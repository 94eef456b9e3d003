// Tile sizes for the CPU kernels: one place, shared by forward and backward.
#pragma once

#include <cstdint>

#include "../params.h"
#include "cpu_kernels.h"

namespace attnkern::cpu {

// Keys per tile. The S^T tile (block_k x 64 fp32) should stay in L1/L2 next to the K/V
// rows it came from; 128 keys keeps it at 32 KiB.
inline int64_t key_block_size(const AttnParams&) { return 128; }

// Query rows per forward tile: narrow tiles for decoding-sized queries.
inline int64_t forward_block_q(const AttnParams& p) { return p.len_q <= kBlockQNarrow ? kBlockQNarrow : kBlockQ; }

}  // namespace attnkern::cpu
