// Backward launcher for one (head-dim bucket, dtype): delta, then the dK/dV pass (two passes,
// dK and dV, for head dims whose accumulators do not fit together), then the dQ pass, all on one
// stream; packed (varlen) batches run the passes' varlen variants. Instantiated by
// instantiations/bwd_*.cu.
#pragma once

#include <type_traits>

#include "bwd_kernel.cuh"
#include "launch_kernel.cuh"

namespace attnkern {
namespace cuda {

template <int kD, typename T, int kFeatures, bool kVarlen = false>
cudaError_t run_bwd_passes(const AttnParams& p, cudaStream_t stream) {
  using KV = std::conditional_t<kVarlen, Varlen<typename BwdTraits<kD>::KV>, typename BwdTraits<kD>::KV>;
  using Q = std::conditional_t<kVarlen, Varlen<typename BwdTraits<kD>::Q>, typename BwdTraits<kD>::Q>;
  const unsigned batch = static_cast<unsigned>(p.batch);
  const dim3 kv_grid(static_cast<unsigned>((p.len_k + KV::kBlockN - 1) / KV::kBlockN),
                     static_cast<unsigned>(p.heads_kv), batch);
  cudaError_t err;
  if constexpr (KV::kSplitPasses) {
    err = launch_kernel(bwd_kv_kernel<KV, T, kFeatures, true, false>, kv_grid, KV::kThreads, KV::kSmemBytes, stream, p);
    if (err != cudaSuccess) return err;
    err = launch_kernel(bwd_kv_kernel<KV, T, kFeatures, false, true>, kv_grid, KV::kThreads, KV::kSmemBytes, stream, p);
  } else {
    err = launch_kernel(bwd_kv_kernel<KV, T, kFeatures, true, true>, kv_grid, KV::kThreads, KV::kSmemBytes, stream, p);
  }
  if (err != cudaSuccess) return err;
  const dim3 q_grid(static_cast<unsigned>((p.len_q + Q::kBlockM - 1) / Q::kBlockM), static_cast<unsigned>(p.heads_q),
                    batch);
  return launch_kernel(bwd_q_kernel<Q, T, kFeatures>, q_grid, Q::kThreads, Q::kSmemBytes, stream, p);
}

// delta = rowsum(dO * O) - dLSE, the first step of every backward (sm80 and Hopper)
template <typename T>
cudaError_t launch_delta(const AttnParams& p, cudaStream_t stream) {
  const int64_t rows = p.batch * p.heads_q * p.len_q;
  return launch_kernel(delta_kernel<T>, dim3(static_cast<unsigned>((rows + 3) / 4)), 128, 0, stream, p);
}

template <int kD, typename T>
cudaError_t run_bwd(const AttnParams& p, cudaStream_t stream) {
  if (p.cu_seqlens_q != nullptr) {  // packed: delta over the (Hq, total_q) rows as one batch entry
    if (p.mask_kind != MaskKind::kNone) return cudaErrorNotSupported;  // packed calls have no mask
    AttnParams rows = p;
    rows.batch = 1;
    rows.len_q = p.total_q;
    const cudaError_t err = launch_delta<T>(rows, stream);
    if (err != cudaSuccess) return err;
    if (varlen_modified(p)) return run_bwd_passes<kD, T, kModified, true>(p, stream);
    return run_bwd_passes<kD, T, kPlain, true>(p, stream);
  }
  const cudaError_t err = launch_delta<T>(p, stream);
  if (err != cudaSuccess) return err;
  return with_feature_variant(p, [&](auto variant) {
    return run_bwd_passes<kD, T, decltype(variant)::value>(p, stream);
  });
}

}  // namespace cuda
}  // namespace attnkern
