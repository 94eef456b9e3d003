// Launcher of the Hopper backward for one (head-dim bucket, dtype): delta (the sm80 kernel),
// then the dK/dV and dQ passes of bwd_sm90_kernel.cuh. Instantiated by
// instantiations/bwd_hdim*_sm90.cu (9.0a builds only). Like the forward it answers
// cudaErrorNotSupported, before launching anything, for tensors TMA cannot describe.
#pragma once

#include "bwd_sm90_kernel.cuh"
#include "launch_bwd.cuh"       // launch_delta
#include "launch_fwd_sm90.cuh"  // tma_map_rows

namespace attnkern {
namespace cuda {

template <class Cfg>
bool bwd_maps(Sm90Maps& maps, const AttnParams& p, bool owns_keys) {
  const int kv_rows = owns_keys ? Cfg::kOwnRows : Cfg::kStreamRows;
  const int q_rows = owns_keys ? Cfg::kStreamRows : Cfg::kOwnRows;
  return tma_map_rows(&maps.q, p.q, p.q_stride, p.batch, p.heads_q, p.len_q, p.head_dim, q_rows) &&
         tma_map_rows(&maps.dout, p.dout, p.dout_stride, p.batch, p.heads_q, p.len_q, p.head_dim_v, q_rows) &&
         tma_map_rows(&maps.k, p.k, p.k_stride, p.batch, p.heads_kv, p.len_k, p.head_dim, kv_rows) &&
         tma_map_rows(&maps.v, p.v, p.v_stride, p.batch, p.heads_kv, p.len_k, p.head_dim_v, kv_rows);
}

template <class KV, class Q, typename T, bool kFeatures>
cudaError_t run_bwd_sm90_passes(const AttnParams& p, const Sm90Maps& kv_maps, const Sm90Maps& q_maps,
                                cudaStream_t stream) {
  const unsigned batch = static_cast<unsigned>(p.batch);
  const dim3 kv_grid(static_cast<unsigned>((p.len_k + KV::kOwnRows - 1) / KV::kOwnRows),
                     static_cast<unsigned>(p.heads_kv), batch);
  const cudaError_t err = launch_kernel(bwd_kv_sm90_kernel<KV, T, kFeatures>, kv_grid, KV::kThreads, KV::kSmemBytes,
                                        stream, p, kv_maps);
  if (err != cudaSuccess) return err;
  const dim3 q_grid(static_cast<unsigned>((p.len_q + Q::kOwnRows - 1) / Q::kOwnRows), static_cast<unsigned>(p.heads_q),
                    batch);
  return launch_kernel(bwd_q_sm90_kernel<Q, T, kFeatures>, q_grid, Q::kThreads, Q::kSmemBytes, stream, p, q_maps);
}

template <int kD, typename T>
cudaError_t run_bwd_sm90(const AttnParams& p, cudaStream_t stream) {
  using KV = typename BwdSm90Traits<kD>::KV;
  using Q = typename BwdSm90Traits<kD>::Q;
  Sm90Maps kv_maps, q_maps;
  if (!bwd_maps<KV>(kv_maps, p, true) || !bwd_maps<Q>(q_maps, p, false)) return cudaErrorNotSupported;
  const cudaError_t err = launch_delta<T>(p, stream);
  if (err != cudaSuccess) return err;
  if (has_features(p))
    return run_bwd_sm90_passes<KV, Q, T, true>(p, kv_maps, q_maps, stream);
  return run_bwd_sm90_passes<KV, Q, T, false>(p, kv_maps, q_maps, stream);
}

}  // namespace cuda
}  // namespace attnkern
