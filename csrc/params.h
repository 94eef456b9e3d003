// AttnParams: everything a kernel needs, in plain C types. No torch headers here:
// the bindings fill it, the CPU and CUDA kernels read it.
#pragma once

#include <cstdint>

namespace attnkern {

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
enum class MaskKind : int32_t { kNone = 0, kBool = 1, kFloat = 2 };

// Strides are in elements. Canonical index order is (batch, head, row, col);
// q/o/do/dq rows are queries, k/v/dk/dv rows are keys. The last dim of q, k, v, o
// and their gradients has stride 1 (the bindings copy otherwise).
struct AttnParams {
  // shapes
  int64_t batch = 0, heads_q = 0, heads_kv = 0;
  int64_t len_q = 0, len_k = 0;
  int64_t head_dim = 0, head_dim_v = 0;

  // inputs
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t q_stride[3] = {0, 0, 0};  // batch, head, row
  int64_t k_stride[3] = {0, 0, 0};
  int64_t v_stride[3] = {0, 0, 0};
  DType dtype = DType::kFloat32;

  // optional paged K/V (forward only): key j of the sequence is row j % page_size of page
  // block_table[j / page_size]; k_stride[0] / v_stride[0] are then the page strides
  const int32_t* block_table = nullptr;
  int64_t page_size = 0;

  // optional mask, (B, Hq, L, S) with any strides (0 for broadcast dims)
  const void* mask = nullptr;
  int64_t mask_stride[4] = {0, 0, 0, 0};
  MaskKind mask_kind = MaskKind::kNone;
  DType mask_dtype = DType::kFloat32;  // for kFloat: the element type of the additive mask

  // outputs of the forward (inputs of the backward)
  void* o = nullptr;
  int64_t o_stride[3] = {0, 0, 0};
  float* lse = nullptr;  // (B, Hq, L) contiguous, natural log; -inf for empty rows

  // backward
  const void* dout = nullptr;
  int64_t dout_stride[3] = {0, 0, 0};
  const float* dlse = nullptr;  // optional incoming gradient of lse, (B, Hq, L) contiguous
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  int64_t dq_stride[3] = {0, 0, 0};
  int64_t dk_stride[3] = {0, 0, 0};
  int64_t dv_stride[3] = {0, 0, 0};
  float* dmask = nullptr;  // optional (B, Hq, L, S) contiguous fp32: d(loss)/d(score incl. mask)
  // workspace filled before the backward's main pass: delta[i] = dot(dout[i], o[i]) - dlse[i],
  // (B, Hq, L) contiguous fp32
  float* delta = nullptr;
  // Per-row softmax statistics, (B, Hq, L, 2) contiguous fp32, in the log2 domain of the scores:
  // (row max, log2 of the row sum), sink included; (+inf, 0) for a row with no key. The forward
  // writes them when this is set; the backward then takes P = 2^((s - max) - log2 sum) from them
  // instead of 2^(s - lse) for the rows whose fp32 LSE is too coarse (mask.h, backward_row_stats).
  // Only the backward's rare path sets it.
  float* row_stats = nullptr;

  // semantics (see attnkern/_semantics.py)
  float scale = 1.f;
  int64_t window_left = -1;   // -1: unbounded
  int64_t window_right = -1;  // -1: unbounded; causal is folded in as 0
  bool bottom_right = false;  // query row i sits at key position i + (len_k - len_q)

  // score modifiers (attnkern/_semantics.py), in this order: s = scale * q.k, then
  //   softcap > 0:   s <- softcap * tanh(s / softcap)
  //   alibi_slopes:  s <- s - slope[b, h] * |i + offset - j|   ((B, Hq) fp32 contiguous)
  // then the float mask, band and bool mask; sinks ((Hq,) fp32) join each row's softmax
  // denominator once: lse = logaddexp(lse_keys, sink[h]). The backward needs no sink: the
  // saved lse already holds it (the sink's own gradient is taken in attnkern/ops.py).
  float softcap = 0.f;
  const float* alibi_slopes = nullptr;
  const float* sinks = nullptr;

  // dropout: keep iff philox word >= dropout_threshold; kept values scaled by 1/(1-p)
  float dropout_p = 0.f;
  uint32_t dropout_threshold = 0;
  uint64_t dropout_seed = 0;

  // packed batches in the CUDA kernels' varlen variants (last, so the dense kernels' parameter
  // offsets stay put): sequence b's queries are rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1
  // of q/o (batch strides 0), its keys rows cu_seqlens_k[b] .. of k/v or, with block_table,
  // pages of table row b (block_table_stride apart); seqused_k, if set, caps its key count.
  // len_q / len_k are then the longest lengths, lse/delta (Hq, total_q), total_q the rows of q.
  const int32_t* cu_seqlens_q = nullptr;
  const int32_t* cu_seqlens_k = nullptr;
  const int32_t* seqused_k = nullptr;
  int64_t block_table_stride = 0;
  int64_t total_q = 0;
};

// whether a call uses a score modifier (softcap, sinks or ALiBi)
inline bool has_modifiers(const AttnParams& p) { return p.softcap > 0.f || p.sinks || p.alibi_slopes; }

}  // namespace attnkern
