// Tile sizes for the CPU kernels: one place, shared by forward and backward.
#pragma once

#include <cstdint>

#include "../params.h"

namespace attnkern::cpu {

// Keys per tile. The S^T tile (block_k x 64 fp32) should stay in L1/L2 next to the K/V
// rows it came from; 128 keys keeps it at 32 KiB.
inline int64_t key_block_size(const AttnParams&) { return 128; }

}  // namespace attnkern::cpu
