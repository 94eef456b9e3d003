// Forward launcher for one (head-dim bucket, dtype): picks the decode or the prefill kernel, the
// feature variant (score.cuh: plain, masked, modified), the dense or the packed (varlen) variant,
// and the grid. Instantiated by instantiations/fwd_*.cu.
#pragma once

#include <type_traits>

#include "fwd_kernel.cuh"
#include "launch_kernel.cuh"

namespace attnkern {
namespace cuda {

// the decode path (packed rows, split-KV), for kFeatures kPlain or kModified (dense or varlen)
template <int kD, typename T, int kFeatures, bool kVarlen = false>
cudaError_t run_fwd_decode(const AttnParams& p, const FwdSplit& split, cudaStream_t stream) {
  using Dense = typename DecodeTraits<kD>::Cfg;
  using Cfg = std::conditional_t<kVarlen, Varlen<Dense>, Dense>;
  const int64_t rows = (p.heads_q / p.heads_kv) * p.len_q;
  const dim3 grid(static_cast<unsigned>((rows + Cfg::kBlockM - 1) / Cfg::kBlockM * split.num_splits),
                  static_cast<unsigned>(p.heads_kv), static_cast<unsigned>(p.batch));
  const cudaError_t err =
      launch_kernel(fwd_kernel<Cfg, T, kFeatures, true>, grid, Cfg::kThreads, Cfg::kSmemBytes, stream, p, split);
  if (err != cudaSuccess || split.num_splits == 1) return err;
  AttnParams merged = p;  // packed: the (Hq, total_q) rows merge as one batch entry of total_q queries
  if (kVarlen) {
    merged.batch = 1;
    merged.len_q = p.total_q;
  }
  const int64_t out_rows = merged.batch * merged.heads_q * merged.len_q;
  const dim3 merge_grid(static_cast<unsigned>((out_rows + 3) / 4));
  if (p.sinks != nullptr)  // (only kModified calls have sinks)
    return launch_kernel(merge_splits_kernel<T, true>, merge_grid, 128, 0, stream, merged, split);
  return launch_kernel(merge_splits_kernel<T, false>, merge_grid, 128, 0, stream, merged, split);
}

// the prefill path (never split), for one feature variant; kVarlen: kPlain or kModified
template <int kD, typename T, int kFeatures, bool kVarlen = false>
cudaError_t run_fwd_prefill(const AttnParams& p, cudaStream_t stream) {
  using Dense = typename FwdTraits<kD>::Cfg;
  using Cfg = std::conditional_t<kVarlen, Varlen<Dense>, Dense>;
  const dim3 grid(static_cast<unsigned>((p.len_q + Cfg::kBlockM - 1) / Cfg::kBlockM), static_cast<unsigned>(p.heads_q),
                  static_cast<unsigned>(p.batch));
  const FwdSplit whole;
  return launch_kernel(fwd_kernel<Cfg, T, kFeatures, false>, grid, Cfg::kThreads, Cfg::kSmemBytes, stream, p, whole);
}

template <int kD, typename T>
cudaError_t run_fwd(const AttnParams& p, const FwdSplit& split, cudaStream_t stream) {
  if (p.cu_seqlens_q != nullptr) {  // packed: never a mask; dropout and the modifiers take kModified
    if (p.mask_kind != MaskKind::kNone) return cudaErrorNotSupported;
    if (takes_decode_path(p)) {  // no dropout there
      if (has_modifiers(p)) return run_fwd_decode<kD, T, kModified, true>(p, split, stream);
      return run_fwd_decode<kD, T, kPlain, true>(p, split, stream);
    }
    if (varlen_modified(p)) return run_fwd_prefill<kD, T, kModified, true>(p, stream);
    return run_fwd_prefill<kD, T, kPlain, true>(p, stream);
  }
  if (takes_decode_path(p)) {  // no mask or dropout there
    if (has_modifiers(p)) return run_fwd_decode<kD, T, kModified>(p, split, stream);
    return run_fwd_decode<kD, T, kPlain>(p, split, stream);
  }
  return with_feature_variant(p, [&](auto variant) {
    return run_fwd_prefill<kD, T, decltype(variant)::value>(p, stream);
  });
}

}  // namespace cuda
}  // namespace attnkern
