// The packed variable-length ops (attnkern::varlen_fwd / varlen_bwd): schemas, tensor and
// index checks, and the CPU implementations. A separate schema from the dense op: q/out are
// (total_q, Hq, *) rows packed by cu_seqlens_q; k/v are (total_k, Hkv, *) packed by
// cu_seqlens_k or, with block_table, pages (num_blocks, page_size, Hkv, *) of a cache.
// Every index is checked here before a kernel reads through it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "cpu/varlen.h"
#include "torch_params.h"

namespace attnkern {
namespace {

struct PackedLayout {
  int64_t batch = 0;
  std::vector<int64_t> q_start, len_q, k_start, len_k;
  int64_t total_q = 0;  // cu_seqlens_q[-1]: rows past it belong to no sequence
};

const int32_t* int32_vector(const at::Tensor& t, const char* name, int64_t len) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && (len < 0 || t.size(0) == len), name, " must be 1-D",
                    len >= 0 ? " of length " + std::to_string(len) : std::string(), ", got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor for the CPU kernels, got ", t.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
  return t.data_ptr<int32_t>();
}

void check_cu_seqlens(const int32_t* cu, int64_t n, const char* name, int64_t rows, const char* rows_name) {
  TORCH_CHECK_VALUE(cu[0] == 0, name, "[0] must be 0, got ", cu[0]);
  for (int64_t b = 0; b < n; ++b)
    TORCH_CHECK_VALUE(cu[b + 1] >= cu[b], name, " must be non-decreasing, got ", name, "[", b, "] = ", cu[b],
                      " > ", name, "[", b + 1, "] = ", cu[b + 1]);
  TORCH_CHECK_VALUE(rows < 0 || cu[n] <= rows, name, "[-1] = ", cu[n], " points past the ", rows, " rows of ",
                    rows_name);
}

PackedLayout packed_layout(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_seqlens_q,
                           const at::Tensor& cu_seqlens_k, const std::optional<at::Tensor>& seqused_k,
                           const std::optional<at::Tensor>& block_table) {
  const int32_t* cq = int32_vector(cu_seqlens_q, "cu_seqlens_q", -1);
  TORCH_CHECK_VALUE(cu_seqlens_q.size(0) >= 1, "cu_seqlens_q must have at least one entry (0)");
  PackedLayout lay;
  lay.batch = cu_seqlens_q.size(0) - 1;
  const int64_t B = lay.batch;
  const int32_t* ck = int32_vector(cu_seqlens_k, "cu_seqlens_k", -1);
  TORCH_CHECK_VALUE(cu_seqlens_k.size(0) == B + 1, "cu_seqlens_q and cu_seqlens_k must give the same number of ",
                    "sequences, got ", B, " and ", cu_seqlens_k.size(0) - 1);
  const bool paged = block_table.has_value() && block_table->defined();
  check_cu_seqlens(cq, B, "cu_seqlens_q", q.size(0), "q");
  check_cu_seqlens(ck, B, "cu_seqlens_k", paged ? -1 : k.size(0), "k");
  const int32_t* used = nullptr;
  if (seqused_k.has_value() && seqused_k->defined()) used = int32_vector(*seqused_k, "seqused_k", B);
  lay.total_q = cq[B];
  for (int64_t b = 0; b < B; ++b) {
    lay.q_start.push_back(cq[b]);
    lay.len_q.push_back(cq[b + 1] - cq[b]);
    lay.k_start.push_back(ck[b]);
    int64_t lk = ck[b + 1] - ck[b];
    if (used) {
      TORCH_CHECK_VALUE(used[b] >= 0 && used[b] <= lk, "seqused_k[", b, "] = ", used[b],
                        " must be in [0, cu_seqlens_k[", b + 1, "] - cu_seqlens_k[", b, "]] = [0, ", lk, "]");
      lk = used[b];
    }
    lay.len_k.push_back(lk);
  }
  if (paged) {
    const at::Tensor& bt = *block_table;
    TORCH_CHECK_TYPE(bt.scalar_type() == at::kInt, "block_table must be int32, got ", bt.scalar_type());
    TORCH_CHECK_VALUE(bt.dim() == 2 && bt.size(0) == B, "block_table must be (batch, max_blocks) = (", B,
                      ", max_blocks), got shape ", bt.sizes());
    TORCH_CHECK_VALUE(bt.device().is_cpu(), "block_table must be a CPU tensor for the CPU kernels");
    TORCH_CHECK_VALUE(bt.stride(1) == 1 || bt.size(1) <= 1, "block_table rows must be contiguous");
    const int64_t page = k.size(1), blocks = k.size(0), coverage = bt.size(1) * page;
    const int32_t* table = bt.data_ptr<int32_t>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK_VALUE(lay.len_k[b] <= coverage, "sequence ", b, " has ", lay.len_k[b],
                        " keys, beyond the block_table's coverage of ", bt.size(1), " pages x page size ", page,
                        " = ", coverage, " keys");
      const int64_t pages = (lay.len_k[b] + page - 1) / page;
      for (int64_t j = 0; j < pages; ++j) {
        const int32_t e = table[b * bt.stride(0) + j];
        TORCH_CHECK_VALUE(e >= 0 && e < blocks, "block_table[", b, ", ", j, "] = ", e,
                          " is outside the cache's ", blocks, " blocks");
      }
    }
  }
  return lay;
}

// q (total_q, Hq, E), k/v (total_k, Hkv, *) or paged (num_blocks, page_size, Hkv, *)
void check_packed_tensors(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool paged) {
  TORCH_CHECK_VALUE(q.dim() == 3, "q must be 3-D (total_q, heads, head_dim), got shape ", q.sizes());
  const int64_t kdim = paged ? 4 : 3;
  const char* kshape = paged ? "(num_blocks, page_size, heads_k, head_dim)" : "(total_k, heads_k, head_dim)";
  TORCH_CHECK_VALUE(k.dim() == kdim, "k must be ", kdim, "-D ", kshape, ", got shape ", k.sizes());
  TORCH_CHECK_VALUE(v.dim() == kdim, "v must be ", kdim, "-D ", kshape, ", got shape ", v.sizes());
  TORCH_CHECK_TYPE(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
                   "q, k and v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
                   v.scalar_type());
  for (const at::Tensor* t : {&q, &k, &v})
    TORCH_CHECK_VALUE(t->device().is_cpu(), "the CPU varlen kernels got a tensor on ", t->device());
  const int64_t hk = k.size(kdim - 2);
  for (int64_t d = 0; d < kdim - 1; ++d)
    TORCH_CHECK_VALUE(v.size(d) == k.size(d), "v shape ", v.sizes(), " does not match k shape ", k.sizes(),
                      " before the head dim");
  TORCH_CHECK_VALUE(k.size(-1) == q.size(2), "k head dim ", k.size(-1), " does not match q head dim ", q.size(2));
  TORCH_CHECK_VALUE(hk > 0 && q.size(1) % hk == 0, "q heads ", q.size(1), " must be a multiple of k/v heads ", hk);
  TORCH_CHECK_VALUE(!paged || k.size(1) > 0, "page_size (k dim 1) must be >= 1");
}

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
    p.k = k.data_ptr();
    p.v = v.data_ptr();
    p.block_table = block_table->data_ptr<int32_t>() + b * block_table->stride(0);
    p.page_size = k.size(1);
    for (auto [dst, t] : {std::pair{p.k_stride, &k}, std::pair{p.v_stride, &v}}) {
      dst[0] = t->stride(0);
      dst[1] = t->stride(2);
      dst[2] = t->stride(1);
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
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ", dropout_p);
  if (dropout_p == 0.0) return;
  TORCH_CHECK_VALUE(rng_seed.has_value() && rng_seed->defined() && rng_seed->numel() >= 1 &&
                        rng_seed->scalar_type() == at::kLong && rng_seed->device().is_cpu(),
                    "rng_seed must be a CPU int64 tensor with at least one element when dropout_p > 0");
  const uint64_t seed = static_cast<uint64_t>(rng_seed->data_ptr<int64_t>()[0]);
  const double t = dropout_p * 4294967296.0;
  const uint32_t threshold = t >= 4294967295.0 ? 4294967295u : static_cast<uint32_t>(t);
  for (size_t b = 0; b < seqs.size(); ++b) {
    seqs[b].dropout_p = static_cast<float>(dropout_p);
    seqs[b].dropout_threshold = threshold;
    seqs[b].dropout_seed = seed + b;
  }
}

void check_scalars(double scale, int64_t window_left, int64_t window_right) {
  TORCH_CHECK_VALUE(window_left >= -1 && window_right >= -1, "window_left/window_right must be >= -1, got (",
                    window_left, ", ", window_right, ")");
  TORCH_CHECK_VALUE(std::isfinite(scale), "scale must be finite, got ", scale);
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
  check_scalars(scale, window_left, window_right);
  const PackedLayout lay = packed_layout(q, k, cu_seqlens_q, cu_seqlens_k, seqused_k, std::nullopt);
  const int64_t total_q = q.size(0), heads = q.size(1);
  TORCH_CHECK_VALUE(out.sizes() == at::IntArrayRef({total_q, heads, v.size(2)}) && dout.sizes() == out.sizes(),
                    "out and grad_out must have shape (total_q, heads, head_dim_v) = (", total_q, ", ", heads, ", ",
                    v.size(2), "), got ", out.sizes(), " and ", dout.sizes());
  TORCH_CHECK_TYPE(out.scalar_type() == q.scalar_type() && dout.scalar_type() == q.scalar_type(),
                   "out and grad_out must have q's dtype ", q.scalar_type());
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef({heads, total_q}) && lse.scalar_type() == at::kFloat,
                    "lse must be float32 of shape (heads, total_q) = (", heads, ", ", total_q, "), got ",
                    lse.scalar_type(), " ", lse.sizes());
  const bool has_dlse = grad_lse.has_value() && grad_lse->defined();
  if (has_dlse)
    TORCH_CHECK_VALUE(grad_lse->sizes() == lse.sizes(), "grad_lse must have shape ", lse.sizes(), ", got ",
                      grad_lse->sizes());

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
