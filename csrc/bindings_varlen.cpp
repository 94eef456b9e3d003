// The packed variable-length ops (attnkern::varlen_fwd / varlen_bwd): schemas, tensor and
// index checks, and the CPU implementations. A separate schema from the dense op: q/out are
// (total_q, Hq, *) rows packed by cu_seqlens_q; k/v are (total_k, Hkv, *) packed by
// cu_seqlens_k or, with block_table, pages (num_blocks, page_size, Hkv, *) of a cache.
// Every index is checked here before a kernel reads through it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <tuple>
#include <vector>

#include "cpu/varlen.h"
#include "torch_params.h"
#include "varlen_layout.h"

namespace attnkern {
namespace {

using varlen::check_packed_tensors;
using varlen::check_scalars;
using varlen::packed_layout;
using varlen::PackedLayout;


// Row `row` of a packed (rows, heads, *) tensor; its (batch, head, row) strides go to `strides`.
void* packed_rows(const at::Tensor& t, int64_t row, int64_t* strides) {
  strides[0] = 0;
  strides[1] = t.stride(1);
  strides[2] = t.stride(0);
  return static_cast<char*>(const_cast<void*>(t.data_ptr())) + row * t.stride(0) * t.element_size();
}

// The dense problem of sequence b (batch 1): rows of packed tensors start at its first row.
AttnParams sequence_params(const PackedLayout& lay, int64_t b, const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& v, const std::optional<at::Tensor>& block_table, double scale,
                           int64_t window_left, int64_t window_right) {
  AttnParams p;
  const bool paged = block_table.has_value() && block_table->defined();
  p.batch = 1;
  p.heads_q = q.size(1);
  p.heads_kv = k.size(-2);
  p.len_q = lay.len_q[b];
  p.len_k = lay.len_k[b];
  p.head_dim = q.size(2);
  p.head_dim_v = v.size(-1);
  p.dtype = dtype_of(q, "q");
  p.q = packed_rows(q, lay.q_start[b], p.q_stride);
  if (paged) {
    // every key in the sequence's first page (a contiguous cache passed as one page per
    // sequence, or pages longer than the sequence): that page is read as a dense (1, page, Hkv, D)
    // K/V, by the dense kernels' paths (bf16 on AMX or vdpbf16ps, which skip paged K/V)
    const bool one_page = p.len_k > 0 && p.len_k <= k.size(1);
    const int32_t* table = block_table->data_ptr<int32_t>() + b * block_table->stride(0);
    const int64_t first = one_page ? table[0] : 0;
    for (auto [ptr, dst, t] : {std::tuple{&p.k, p.k_stride, &k}, std::tuple{&p.v, p.v_stride, &v}}) {
      *ptr = static_cast<char*>(t->data_ptr()) + first * t->stride(0) * t->element_size();
      dst[0] = t->stride(0);
      dst[1] = t->stride(2);
      dst[2] = t->stride(1);
    }
    if (!one_page) {
      p.block_table = table;
      p.page_size = k.size(1);
    }
  } else {
    p.k = packed_rows(k, lay.k_start[b], p.k_stride);
    p.v = packed_rows(v, lay.k_start[b], p.v_stride);
  }
  p.scale = static_cast<float>(scale);
  p.window_left = window_side(window_left, p.len_q + p.len_k);
  p.window_right = window_side(window_right, p.len_q + p.len_k);
  p.bottom_right = true;  // per sequence: query i sits at key position i + Lk_b - Lq_b
  return p;
}

// The score modifiers of every sequence: checked once against the packed batch (alibi_slopes
// (B, Hq) with B the number of sequences), then sequence b reads row b of the slopes.
void fill_sequence_modifiers(std::vector<AttnParams>& seqs, const at::Tensor& q, double softcap,
                             const std::optional<at::Tensor>& sinks,
                             const std::optional<at::Tensor>& alibi_slopes) {
  AttnParams all;
  all.batch = static_cast<int64_t>(seqs.size());
  all.heads_q = q.size(1);
  check_and_fill_modifiers(all, q, softcap, sinks, alibi_slopes);
  for (int64_t b = 0; b < all.batch; ++b) {
    seqs[b].softcap = all.softcap;
    seqs[b].sinks = all.sinks;
    seqs[b].alibi_slopes = all.alibi_slopes ? all.alibi_slopes + b * all.heads_q : nullptr;
  }
}

// Dropout of every sequence (flash-attn's varlen dropout_p): sequence b draws the dense op's
// Philox pattern (attnkern/reference.py: dropout_keep_mask) as a batch of one, keyed by
// seed + b, so the backward regenerates it from the same rng_seed.
void fill_sequence_dropout(std::vector<AttnParams>& seqs, double dropout_p,
                           const std::optional<at::Tensor>& rng_seed) {
  // (dropout_p = 1 drops everything: attnkern.dispatch.run_packed answers it without the kernels)
  AttnParams all;
  fill_dropout(all, dropout_p, rng_seed);
  if (dropout_p == 0.0) return;
  for (size_t b = 0; b < seqs.size(); ++b) {
    seqs[b].dropout_p = all.dropout_p;
    seqs[b].dropout_threshold = all.dropout_threshold;
    seqs[b].dropout_seed = all.dropout_seed + b;
  }
}

// The kernels keep a sequence's LSE (and delta) as one (Hq, Lq_b) block at Hq * cu_seqlens_q[b];
// the op's lse is (Hq, total_q). These move between the two (O(Hq * total_q)).
void blocks_to_heads(const PackedLayout& lay, int64_t heads, const float* blocks, float* out, int64_t total_rows) {
  at::parallel_for(0, lay.batch, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t i = 0; i < lay.len_q[b]; ++i)
          out[h * total_rows + lay.q_start[b] + i] = blocks[heads * lay.q_start[b] + h * lay.len_q[b] + i];
  });
}
void heads_to_blocks(const PackedLayout& lay, int64_t heads, const float* in, int64_t total_rows, float* blocks) {
  at::parallel_for(0, lay.batch, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t i = 0; i < lay.len_q[b]; ++i)
          blocks[heads * lay.q_start[b] + h * lay.len_q[b] + i] = in[h * total_rows + lay.q_start[b] + i];
  });
}

std::tuple<at::Tensor, at::Tensor> varlen_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                  const at::Tensor& v_in, const at::Tensor& cu_seqlens_q,
                                                  const at::Tensor& cu_seqlens_k,
                                                  const std::optional<at::Tensor>& seqused_k,
                                                  const std::optional<at::Tensor>& block_table, double scale,
                                                  int64_t window_left, int64_t window_right, double softcap,
                                                  const std::optional<at::Tensor>& sinks,
                                                  const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
                                                  const std::optional<at::Tensor>& rng_seed) {
  const bool paged = block_table.has_value() && block_table->defined();
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  check_packed_tensors(q, k, v, paged);
  varlen::check_devices({{"q", &q}, {"k", &k}, {"v", &v}, {"cu_seqlens_q", &cu_seqlens_q},
                         {"cu_seqlens_k", &cu_seqlens_k},
                         {"seqused_k", varlen::given(seqused_k)}, {"block_table", varlen::given(block_table)}},
                        at::kCPU, "the CPU kernels");
  check_scalars(scale, window_left, window_right);
  const PackedLayout lay = packed_layout(q, k, cu_seqlens_q, cu_seqlens_k, seqused_k, block_table);
  const int64_t total_q = q.size(0), heads = q.size(1);
  at::Tensor out = at::empty({total_q, heads, v.size(-1)}, q.options());
  at::Tensor lse = at::empty({heads, total_q}, q.options().dtype(at::kFloat));
  // rows past cu_seqlens_q[-1] belong to no sequence: they see no key
  out.narrow(0, lay.total_q, total_q - lay.total_q).zero_();
  lse.narrow(1, lay.total_q, total_q - lay.total_q).fill_(-std::numeric_limits<float>::infinity());
  at::Tensor lse_blocks = at::empty({heads * lay.total_q}, lse.options());

  std::vector<AttnParams> seqs;
  seqs.reserve(lay.batch);
  for (int64_t b = 0; b < lay.batch; ++b) {
    AttnParams p = sequence_params(lay, b, q, k, v, block_table, scale, window_left, window_right);
    p.o = packed_rows(out, lay.q_start[b], p.o_stride);
    p.lse = lse_blocks.data_ptr<float>() + heads * lay.q_start[b];
    seqs.push_back(p);
  }
  fill_sequence_modifiers(seqs, q, softcap, sinks, alibi_slopes);
  fill_sequence_dropout(seqs, dropout_p, rng_seed);
  cpu::varlen_forward(seqs);
  blocks_to_heads(lay, heads, lse_blocks.data_ptr<float>(), lse.data_ptr<float>(), total_q);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_bwd_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q_in,
    const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, const std::optional<at::Tensor>& seqused_k,
    double scale, int64_t window_left, int64_t window_right, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, double dropout_p, const std::optional<at::Tensor>& rng_seed) {
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const at::Tensor out = unit_last_stride(out_in), dout = unit_last_stride(grad_out);
  check_packed_tensors(q, k, v, false);
  varlen::check_devices({{"q", &q}, {"k", &k}, {"v", &v}, {"cu_seqlens_q", &cu_seqlens_q},
                         {"cu_seqlens_k", &cu_seqlens_k},
                         {"seqused_k", varlen::given(seqused_k)}, {"out", &out}, {"grad_out", &dout}, {"lse", &lse},
                         {"grad_lse", varlen::given(grad_lse)}},
                        at::kCPU, "the CPU kernels");
  check_scalars(scale, window_left, window_right);
  const PackedLayout lay = packed_layout(q, k, cu_seqlens_q, cu_seqlens_k, seqused_k, std::nullopt);
  const int64_t total_q = q.size(0), heads = q.size(1);
  varlen::check_backward_tensors(q, v, out, dout, lse, grad_lse);
  const bool has_dlse = grad_lse.has_value() && grad_lse->defined();

  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor lse_blocks = at::empty({heads * lay.total_q}, f32), delta = at::empty({heads * lay.total_q}, f32);
  heads_to_blocks(lay, heads, lse.contiguous().data_ptr<float>(), total_q, lse_blocks.data_ptr<float>());
  at::Tensor dlse_blocks;
  if (has_dlse) {
    dlse_blocks = at::empty({heads * lay.total_q}, f32);
    heads_to_blocks(lay, heads, grad_lse->to(at::kFloat).contiguous().data_ptr<float>(), total_q,
                    dlse_blocks.data_ptr<float>());
  }
  // rows of no sequence, and keys no query sees (past seqused_k, or in no sequence), get 0
  at::Tensor dq = at::zeros(q.sizes(), q.options());
  at::Tensor dk = at::zeros(k.sizes(), q.options());
  at::Tensor dv = at::zeros(v.sizes(), q.options());

  std::vector<AttnParams> seqs;
  seqs.reserve(lay.batch);
  for (int64_t b = 0; b < lay.batch; ++b) {
    AttnParams p = sequence_params(lay, b, q, k, v, std::nullopt, scale, window_left, window_right);
    const int64_t row = lay.q_start[b], krow = lay.k_start[b];
    p.o = packed_rows(out, row, p.o_stride);
    p.dout = packed_rows(dout, row, p.dout_stride);
    p.dq = packed_rows(dq, row, p.dq_stride);
    p.dk = packed_rows(dk, krow, p.dk_stride);
    p.dv = packed_rows(dv, krow, p.dv_stride);
    p.lse = lse_blocks.data_ptr<float>() + heads * row;
    p.delta = delta.data_ptr<float>() + heads * row;
    p.dlse = has_dlse ? dlse_blocks.data_ptr<float>() + heads * row : nullptr;
    seqs.push_back(p);
  }
  // no sinks: the saved lse includes them (as in the dense backward)
  fill_sequence_modifiers(seqs, q, softcap, std::nullopt, alibi_slopes);
  fill_sequence_dropout(seqs, dropout_p, rng_seed);
  const cpu::VarlenBackwardPlan plan = cpu::varlen_backward_plan(seqs);
  at::Tensor dq_acc = at::zeros({plan.acc_floats}, f32);
  cpu::varlen_backward(seqs, plan, dq_acc.data_ptr<float>());
  return {dq, dk, dv};
}

}  // namespace
}  // namespace attnkern

TORCH_LIBRARY_FRAGMENT(attnkern, m) {
  m.def(
      "varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, Tensor? seqused_k, "
      "Tensor? block_table, float scale, int window_left, int window_right, float softcap=0., Tensor? sinks=None, "
      "Tensor? alibi_slopes=None, float dropout_p=0., Tensor? rng_seed=None) -> (Tensor out, Tensor lse)");
  m.def(
      "varlen_bwd(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor cu_seqlens_q, Tensor cu_seqlens_k, Tensor? seqused_k, float scale, int window_left, "
      "int window_right, float softcap=0., Tensor? alibi_slopes=None, float dropout_p=0., Tensor? rng_seed=None) "
      "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
}

TORCH_LIBRARY_IMPL(attnkern, CPU, m) {
  m.impl("varlen_fwd", &attnkern::varlen_fwd_cpu);
  m.impl("varlen_bwd", &attnkern::varlen_bwd_cpu);
}
