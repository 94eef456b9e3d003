// Launcher of the Hopper forward for one (head-dim bucket, dtype): the three TMA maps and the
// grid. Instantiated by instantiations/fwd_hdim*_sm90.cu, which build_sources.py compiles only
// when TORCH_CUDA_ARCH_LIST holds 9.0a. Returns cudaErrorNotSupported, before launching
// anything, for tensors TMA cannot describe; dispatch.cu then runs the sm80 kernel.
#pragma once

#include "fwd_sm90_kernel.cuh"
#include "launch_kernel.cuh"

namespace attnkern {
namespace cuda {

// A (batch, heads, rows, cols) 16-bit tensor as a TMA map with boxes of box_rows x 64 columns.
// Strides of dims of size 1 are never used; they get a contiguous stride, since TMA wants
// every stride a positive multiple of 16 bytes.
inline bool tma_map_rows(TmaMap* map, const void* base, const int64_t (&stride)[3], int64_t batch, int64_t heads,
                         int64_t rows, int64_t cols, int box_rows) {
  const int64_t dims[4] = {cols, rows, heads, batch};
  const int64_t given[3] = {stride[2], stride[1], stride[0]};
  int64_t bytes[3];
  int64_t contiguous = cols * 2;
  for (int d = 0; d < 3; ++d) {
    bytes[d] = dims[d + 1] == 1 ? contiguous : given[d] * 2;
    contiguous = bytes[d] * dims[d + 1];
  }
  return encode_tma_map(map, base, dims, bytes, 64, box_rows).empty();
}

template <int kD, typename T>
cudaError_t run_fwd_sm90(const AttnParams& p, cudaStream_t stream) {
  using Cfg = typename FwdSm90Traits<kD>::Cfg;
  Sm90Maps maps;
  if (!tma_map_rows(&maps.q, p.q, p.q_stride, p.batch, p.heads_q, p.len_q, p.head_dim, Cfg::kBlockM) ||
      !tma_map_rows(&maps.k, p.k, p.k_stride, p.batch, p.heads_kv, p.len_k, p.head_dim, Cfg::kBlockN) ||
      !tma_map_rows(&maps.v, p.v, p.v_stride, p.batch, p.heads_kv, p.len_k, p.head_dim_v, Cfg::kBlockN))
    return cudaErrorNotSupported;
  const dim3 grid(static_cast<unsigned>((p.len_q + Cfg::kBlockM - 1) / Cfg::kBlockM), static_cast<unsigned>(p.heads_q),
                  static_cast<unsigned>(p.batch));
  if (has_features(p))
    return launch_kernel(fwd_sm90_kernel<Cfg, T, true>, grid, Cfg::kThreads, Cfg::kSmemBytes, stream, p, maps);
  return launch_kernel(fwd_sm90_kernel<Cfg, T, false>, grid, Cfg::kThreads, Cfg::kSmemBytes, stream, p, maps);
}

}  // namespace cuda
}  // namespace attnkern
