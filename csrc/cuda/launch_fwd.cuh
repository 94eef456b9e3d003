// Forward launcher for one (head-dim bucket, dtype): picks the decode or the prefill kernel,
// the fast or the masked/dropout variant, the dense or the packed (varlen) variant, and the grid.
// Instantiated by instantiations/fwd_*.cu.
#pragma once

#include <type_traits>

#include "fwd_kernel.cuh"
#include "launch_kernel.cuh"

namespace attnkern {
namespace cuda {

template <int kD, typename T, bool kVarlen>
cudaError_t run_fwd_kernels(const AttnParams& p, const FwdSplit& split, cudaStream_t stream) {
  const unsigned batch = static_cast<unsigned>(p.batch);
  if (takes_decode_path(p)) {
    using Dense = typename DecodeTraits<kD>::Cfg;
    using Cfg = std::conditional_t<kVarlen, Varlen<Dense>, Dense>;
    const int64_t rows = (p.heads_q / p.heads_kv) * p.len_q;
    const dim3 grid(static_cast<unsigned>((rows + Cfg::kBlockM - 1) / Cfg::kBlockM * split.num_splits),
                    static_cast<unsigned>(p.heads_kv), batch);
    const cudaError_t err =
        launch_kernel(fwd_kernel<Cfg, T, false, true>, grid, Cfg::kThreads, Cfg::kSmemBytes, stream, p, split);
    if (err != cudaSuccess || split.num_splits == 1) return err;
    AttnParams merged = p;  // packed: the (Hq, total_q) rows merge as one batch entry of total_q queries
    if (kVarlen) {
      merged.batch = 1;
      merged.len_q = p.total_q;
    }
    const int64_t out_rows = merged.batch * merged.heads_q * merged.len_q;
    return launch_kernel(merge_splits_kernel<T>, dim3(static_cast<unsigned>((out_rows + 3) / 4)), 128, 0, stream,
                         merged, split);
  }
  using Dense = typename FwdTraits<kD>::Cfg;
  using Cfg = std::conditional_t<kVarlen, Varlen<Dense>, Dense>;
  const dim3 grid(static_cast<unsigned>((p.len_q + Cfg::kBlockM - 1) / Cfg::kBlockM), static_cast<unsigned>(p.heads_q),
                  batch);
  const FwdSplit whole;  // the prefill path never splits
  if constexpr (!kVarlen) {  // packed calls have no mask or dropout
    if (has_features(p))
      return launch_kernel(fwd_kernel<Cfg, T, true, false>, grid, Cfg::kThreads, Cfg::kSmemBytes, stream, p, whole);
  }
  return launch_kernel(fwd_kernel<Cfg, T, false, false>, grid, Cfg::kThreads, Cfg::kSmemBytes, stream, p, whole);
}

template <int kD, typename T>
cudaError_t run_fwd(const AttnParams& p, const FwdSplit& split, cudaStream_t stream) {
  if (p.cu_seqlens_q != nullptr) return run_fwd_kernels<kD, T, true>(p, split, stream);
  return run_fwd_kernels<kD, T, false>(p, split, stream);
}

}  // namespace cuda
}  // namespace attnkern
