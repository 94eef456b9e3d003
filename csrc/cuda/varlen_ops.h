// attnkern::varlen_fwd / varlen_bwd on the CUDA kernels' varlen variants, shared by the CUDA
// bindings (bindings_cuda.cpp) and the CPU emulator (emulator/emulator.cpp). The checks are the
// CPU op's (../varlen_layout.h) on host copies of the index tensors: the grid needs the longest
// lengths anyway, and no index reaches a kernel unchecked (the copy synchronises the stream).
// One launch serves the whole pack; kvcache calls arrive here as paged calls (attnkern/varlen.py).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>

#include "../varlen_layout.h"
#include "torch_ops.h"

namespace attnkern {
namespace cuda_ops {

// A (rows, heads, last) tensor as the kernels read it: unit stride and a head dim padded to a
// multiple of 8, 16-byte rows (kernel_input's rule, on a 4-D view)
inline at::Tensor packed_kernel_input(const at::Tensor& t) {
  if (t.dim() == 4) return kernel_input(t);  // cache pages
  return kernel_input(t.unsqueeze(0)).select(0, 0);
}

// (rows, heads, last) strides as (batch, head, row): the batch stride is unused (0)
inline void set_packed_strides(int64_t* dst, const at::Tensor& t) {
  dst[0] = 0;
  dst[1] = t.stride(1);
  dst[2] = t.stride(0);
}

// A contiguous (rows, heads, last) result and the buffer the kernel writes (padded to 8 columns)
struct PackedOutput {
  at::Tensor result, target;
  PackedOutput(int64_t rows, int64_t heads, int64_t last, const at::TensorOptions& opts, bool zeros) {
    const int64_t padded = (last + 7) / 8 * 8;
    target = zeros ? at::zeros({rows, heads, padded}, opts) : at::empty({rows, heads, padded}, opts);
    result = padded == last ? target : at::Tensor();
    if (!result.defined()) result = at::empty({rows, heads, last}, opts);
  }
  void finish() {
    if (!target.is_same(result)) result.copy_(target.narrow(2, 0, result.size(2)));
  }
};

// The score modifiers and dropout of a packed call, as the op receives them: sinks (Hq,) fp32
// (forward only: the backward's saved LSE holds them), alibi_slopes (B, Hq) fp32 with B the
// number of sequences, rng_seed a CPU int64 tensor when dropout_p > 0.
struct PackedScoreArgs {
  double softcap = 0.0;
  std::optional<at::Tensor> sinks, alibi_slopes;
  double dropout_p = 0.0;
  std::optional<at::Tensor> rng_seed;
};

// What both directions share: the checks, the layout (host copies of the indices), the shapes,
// inputs, index pointers and semantics of p.
inline varlen::PackedLayout fill_packed_params(AttnParams& p, const at::Tensor& q, const at::Tensor& k,
                                               const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                                               const at::Tensor& cu_seqlens_k,
                                               const std::optional<at::Tensor>& seqused_k,
                                               const std::optional<at::Tensor>& block_table, double scale,
                                               int64_t window_left, int64_t window_right,
                                               const PackedScoreArgs& score, const char* op) {
  const bool paged = block_table.has_value() && block_table->defined();
  varlen::check_packed_tensors(q, k, v, paged);
  varlen::check_devices({{"k", &k}, {"v", &v}, {"cu_seqlens_q", &cu_seqlens_q}, {"cu_seqlens_k", &cu_seqlens_k},
                         {"seqused_k", varlen::given(seqused_k)}, {"block_table", varlen::given(block_table)}},
                        q.device(), op);
  varlen::check_scalars(scale, window_left, window_right);
  // the kernels read these in place: a strided one would be read wrong (its host copy may be contiguous)
  for (const varlen::NamedTensor& t : {varlen::NamedTensor{"cu_seqlens_q", &cu_seqlens_q},
                                       varlen::NamedTensor{"cu_seqlens_k", &cu_seqlens_k},
                                       varlen::NamedTensor{"seqused_k", varlen::given(seqused_k)}})
    TORCH_CHECK_VALUE(t.tensor == nullptr || !t.tensor->defined() || t.tensor->is_contiguous(), t.name,
                      " must be contiguous");
  TORCH_CHECK_VALUE(!paged || block_table->dim() != 2 || block_table->stride(1) == 1 || block_table->size(1) <= 1,
                    "block_table rows must be contiguous");
  auto host = [](const std::optional<at::Tensor>& t) -> std::optional<at::Tensor> {
    if (!t.has_value() || !t->defined()) return std::nullopt;
    return t->cpu();
  };
  const varlen::PackedLayout lay =
      varlen::packed_layout(q, k, cu_seqlens_q.cpu(), cu_seqlens_k.cpu(), host(seqused_k), host(block_table));

  p.batch = lay.batch;
  p.heads_q = q.size(1);
  p.heads_kv = k.size(-2);
  p.len_q = lay.batch ? *std::max_element(lay.len_q.begin(), lay.len_q.end()) : 0;
  p.len_k = lay.batch ? *std::max_element(lay.len_k.begin(), lay.len_k.end()) : 0;
  p.total_q = q.size(0);
  p.head_dim = q.size(2);
  p.head_dim_v = v.size(-1);
  p.dtype = dtype_of(q, "q");
  p.scale = static_cast<float>(scale);
  // a side reaching past every sequence's Lq_b + Lk_b is unbounded (torch_params.h window_side)
  p.window_left = window_side(window_left, p.len_q + p.len_k);
  p.window_right = window_side(window_right, p.len_q + p.len_k);
  p.bottom_right = true;  // per sequence: query i sits at key position i + Lk_b - Lq_b
  check_kernel_limits(p, q, op);
  // the kernels' kModified variant applies them per sequence: slope row b, dropout seed + b
  check_and_fill_modifiers(p, q, score.softcap, score.sinks, score.alibi_slopes);
  fill_dropout(p, score.dropout_p, score.rng_seed);
  p.cu_seqlens_q = cu_seqlens_q.data_ptr<int32_t>();
  p.cu_seqlens_k = cu_seqlens_k.data_ptr<int32_t>();
  p.seqused_k = seqused_k.has_value() && seqused_k->defined() ? seqused_k->data_ptr<int32_t>() : nullptr;
  if (paged) {
    p.block_table = block_table->data_ptr<int32_t>();
    p.block_table_stride = block_table->stride(0);
    p.page_size = k.size(1);
    TORCH_CHECK_VALUE(p.page_size < std::numeric_limits<int32_t>::max(), op, ": page_size must be < 2^31, got ",
                      p.page_size);
  }
  return lay;
}

// k/v as the kernels read them: packed rows, or pages (num_blocks, page_size, Hkv, *)
inline void set_packed_keys(AttnParams& p, const at::Tensor& k, const at::Tensor& v) {
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  if (p.block_table == nullptr) {
    set_packed_strides(p.k_stride, k);
    set_packed_strides(p.v_stride, v);
    return;
  }
  for (auto [dst, t] : {std::pair{p.k_stride, &k}, std::pair{p.v_stride, &v}}) {
    dst[0] = t->stride(0);
    dst[1] = t->stride(2);
    dst[2] = t->stride(1);
  }
}

inline std::tuple<at::Tensor, at::Tensor> varlen_forward_op(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, const std::optional<at::Tensor>& seqused_k,
    const std::optional<at::Tensor>& block_table, double scale, int64_t window_left, int64_t window_right,
    const PackedScoreArgs& score, const Device& dev, const char* op) {
  AttnParams p;
  const varlen::PackedLayout lay = fill_packed_params(p, q_in, k_in, v_in, cu_seqlens_q, cu_seqlens_k, seqused_k,
                                                      block_table, scale, window_left, window_right, score, op);
  const int64_t total_q = q_in.size(0), heads = q_in.size(1);
  PackedOutput out(total_q, heads, p.head_dim_v, q_in.options(), false);
  at::Tensor lse = at::empty({heads, total_q}, q_in.options().dtype(at::kFloat));
  // Rows past cu_seqlens_q[-1] belong to no sequence: output 0, LSE -inf, written after the
  // kernels (the split merge writes every row, with the sink in its LSE). When no sequence has a
  // key no kernel runs: every row outputs 0, a sequence's rows with LSE = the sink if any.
  const int64_t first_idle = p.len_k == 0 ? 0 : lay.total_q;
  auto finish = [&] {
    out.target.narrow(0, first_idle, total_q - first_idle).zero_();
    lse.narrow(1, first_idle, total_q - first_idle).fill_(-std::numeric_limits<float>::infinity());
    if (first_idle == 0 && p.sinks != nullptr)
      lse.narrow(1, 0, lay.total_q).copy_(score.sinks->view({heads, 1}).expand({heads, lay.total_q}));
    out.finish();
    return std::tuple<at::Tensor, at::Tensor>{out.result, lse};
  };
  if (first_idle == 0 || heads == 0 || p.len_q == 0) return finish();
  const at::Tensor q = packed_kernel_input(q_in), k = packed_kernel_input(k_in), v = packed_kernel_input(v_in);
  p.q = q.data_ptr();
  set_packed_strides(p.q_stride, q);
  set_packed_keys(p, k, v);
  p.o = out.target.data_ptr();
  set_packed_strides(p.o_stride, out.target);
  p.lse = lse.data_ptr<float>();

  cuda::FwdSplit split;
  split.num_splits = cuda::decode_num_splits(p, dev.sm_count);
  at::Tensor o_partial, lse_partial;
  if (split.num_splits > 1) {
    // partial (max, sum) start at sum 0: rows of no sequence merge to 0 and -inf, as written above
    o_partial = at::empty({split.num_splits, heads, total_q, p.head_dim_v}, lse.options());
    lse_partial = at::zeros({split.num_splits, heads, total_q, 2}, lse.options());
    split.o_partial = o_partial.data_ptr<float>();
    split.lse_partial = lse_partial.data_ptr<float>();
  }
  if (dev.on_launch != nullptr) dev.on_launch(p);
  dev.check(cuda::forward(p, split, dev.stream), op);
  return finish();
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_backward_op(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q_in,
    const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, const std::optional<at::Tensor>& seqused_k,
    double scale, int64_t window_left, int64_t window_right, const PackedScoreArgs& score, const Device& dev,
    const char* op) {
  AttnParams p;
  fill_packed_params(p, q_in, k_in, v_in, cu_seqlens_q, cu_seqlens_k, seqused_k, std::nullopt, scale, window_left,
                     window_right, score, op);
  varlen::check_backward_tensors(q_in, v_in, out_in, grad_out, lse, grad_lse);
  varlen::check_devices({{"out", &out_in}, {"grad_out", &grad_out}, {"lse", &lse},
                         {"grad_lse", varlen::given(grad_lse)}},
                        q_in.device(), op);
  // rows of no sequence, and keys no query sees (past seqused_k, or in no sequence), get 0
  const auto opts = q_in.options();
  PackedOutput dq(q_in.size(0), p.heads_q, p.head_dim, opts, true);
  PackedOutput dk(k_in.size(0), p.heads_kv, p.head_dim, opts, true);
  PackedOutput dv(v_in.size(0), p.heads_kv, p.head_dim_v, opts, true);
  if (p.batch > 0 && p.heads_q > 0 && p.len_q > 0 && p.len_k > 0) {
    const at::Tensor q = packed_kernel_input(q_in), k = packed_kernel_input(k_in), v = packed_kernel_input(v_in);
    const at::Tensor out = packed_kernel_input(out_in), dout = packed_kernel_input(grad_out);
    const at::Tensor lse_c = lse.contiguous();
    at::Tensor dlse;
    if (grad_lse.has_value() && grad_lse->defined()) dlse = grad_lse->to(at::kFloat).contiguous();
    at::Tensor delta = at::empty({p.heads_q, p.total_q}, opts.dtype(at::kFloat));
    p.q = q.data_ptr();
    set_packed_strides(p.q_stride, q);
    set_packed_keys(p, k, v);
    p.o = const_cast<void*>(out.data_ptr());
    set_packed_strides(p.o_stride, out);
    p.dout = dout.data_ptr();
    set_packed_strides(p.dout_stride, dout);
    p.lse = const_cast<float*>(lse_c.data_ptr<float>());
    p.dlse = dlse.defined() ? dlse.data_ptr<float>() : nullptr;
    p.delta = delta.data_ptr<float>();
    for (auto [ptr, strides, t] : {std::tuple{&p.dq, p.dq_stride, &dq.target},
                                   std::tuple{&p.dk, p.dk_stride, &dk.target},
                                   std::tuple{&p.dv, p.dv_stride, &dv.target}}) {
      *ptr = t->data_ptr();
      set_packed_strides(strides, *t);
    }
    // the rare path (mask.h kHugeLse), as in backward_op: the varlen forward runs once more for
    // every row's (max, log2 sum), (Hq, total_q, 2) like the LSE
    at::Tensor row_stats;
    if (at::logical_and(lse_c.abs() > kHugeLse, lse_c.isfinite()).any().item<bool>()) {
      row_stats = at::empty({p.heads_q, p.total_q, 2}, opts.dtype(at::kFloat));
      PackedOutput scratch_out(p.total_q, p.heads_q, p.head_dim_v, opts, false);
      at::Tensor scratch_lse = at::empty_like(lse_c);
      AttnParams f = p;
      f.o = scratch_out.target.data_ptr();
      set_packed_strides(f.o_stride, scratch_out.target);
      f.lse = scratch_lse.data_ptr<float>();
      f.row_stats = row_stats.data_ptr<float>();
      f.dout = nullptr;  // a forward (the emulator's checks tell the directions apart by it)
      if (dev.on_launch != nullptr) dev.on_launch(f);
      dev.check(cuda::forward(f, cuda::FwdSplit{}, dev.stream), op);
      p.row_stats = row_stats.data_ptr<float>();
    }
    if (dev.on_launch != nullptr) dev.on_launch(p);
    dev.check(cuda::backward(p, dev.stream), op);
  }
  dq.finish();
  dk.finish();
  dv.finish();
  return {dq.result, dk.result, dv.result};
}

}  // namespace cuda_ops
}  // namespace attnkern
