// Top-k attention on the CPU: the attnkern::topk_fwd / topk_bwd schemas, their tensor checks,
// and the work split over torch's thread pool. The kernels are in topk_impl.inc.
//
// Forward items are (batch, query head, block of kTopkBlockQ query rows); backward items are
// (batch, kv head), because every query row of a kv group may scatter into any of its dk/dv
// rows. Extra memory: the (B, Hq, L, top_k) indices plus per-thread scratch of
// kTopkBlockQ * top_k (forward) and S * (E + Ev) (backward, the kv head's fp32 dk/dv).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "../torch_params.h"
#include "cpu_kernels.h"
#include "parallel.h"
#include "topk_kernels.h"

namespace attnkern::cpu {
namespace {

constexpr int64_t kTopkRowsPerItem = 64;  // kTopkBlockQ of every ISA

// The table of the ISA the dense kernels use (ATTNKERN_CPU_ISA applies to both).
const TopkKernelTable& select_topk_kernels() {
  const char* isa = select_kernels().isa;
  const TopkKernelTable* t = nullptr;
  // avx512_bf16 and amx_bf16 change only the dense bf16 GEMMs; top-k runs the plain AVX-512 build there
  if (!std::strcmp(isa, "avx512") || !std::strcmp(isa, "avx512_bf16") || !std::strcmp(isa, "amx_bf16"))
    t = avx512_topk_kernels();
  if (!std::strcmp(isa, "avx2")) t = avx2_topk_kernels();
  return t ? *t : *generic_topk_kernels();
}

int64_t checked_slots(int64_t top_k, int64_t len_k) {
  TORCH_CHECK_VALUE(top_k >= 1, "top_k must be >= 1, got ", top_k);
  const int64_t slots = std::min(top_k, len_k);
  TORCH_CHECK_VALUE(slots <= kTopkMax, "the CPU top-k kernel keeps at most ", kTopkMax,
                    " keys per query (min(top_k, S)), got ", slots);
  return slots;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                            const at::Tensor& v_in,
                                                            const std::optional<at::Tensor>& mask, int64_t top_k,
                                                            double scale, int64_t window_left, int64_t window_right,
                                                            bool bottom_right) {
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  TopkParams tp;
  AttnParams& p = tp.attn;
  check_and_fill_inputs(p, q, k, v, mask, std::nullopt, {scale, window_left, window_right, bottom_right, 0.0});
  TORCH_CHECK_VALUE(q.device().is_cpu(), "attnkern::topk_fwd CPU kernel got tensors on ", q.device());
  tp.top_k = checked_slots(top_k, p.len_k);
  at::Tensor out = at::empty({p.batch, p.heads_q, p.len_q, p.head_dim_v}, q.options());
  at::Tensor lse = at::empty({p.batch, p.heads_q, p.len_q}, q.options().dtype(at::kFloat));
  at::Tensor indices = at::empty({p.batch, p.heads_q, p.len_q, tp.top_k}, q.options().dtype(at::kLong));
  p.o = out.data_ptr();
  set_strides3(p.o_stride, out);
  p.lse = lse.data_ptr<float>();
  tp.indices = indices.data_ptr<int64_t>();
  if (out.numel() == 0 && indices.numel() == 0 && lse.numel() == 0) return {out, lse, indices};
  if (tp.top_k == 0 || p.head_dim_v == 0) {  // S == 0: every row is empty; Ev == 0: nothing to gather
    out.zero_();
    if (tp.top_k == 0) {
      lse.fill_(-std::numeric_limits<float>::infinity());
      return {out, lse, indices};
    }
  }
  const TopkKernelTable& kt = select_topk_kernels();
  const int64_t blocks = (p.len_q + kTopkRowsPerItem - 1) / kTopkRowsPerItem;
  parallel_items(p.batch * p.heads_q * blocks, kt.forward_scratch_floats(tp), [&](int64_t item, float* scratch) {
    const int64_t bh = item / blocks, block = item % blocks;
    const int64_t row0 = block * kTopkRowsPerItem;
    kt.forward_item(tp, bh / p.heads_q, bh % p.heads_q, row0, std::min(kTopkRowsPerItem, p.len_q - row0), scratch);
  });
  return {out, lse, indices};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& lse, const at::Tensor& indices, const std::optional<at::Tensor>& mask, double scale,
    int64_t window_left, int64_t window_right, bool bottom_right, bool mask_needs_grad) {
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const at::Tensor dout = unit_last_stride(grad_out);
  TopkParams tp;
  AttnParams& p = tp.attn;
  check_and_fill_inputs(p, q, k, v, mask, std::nullopt, {scale, window_left, window_right, bottom_right, 0.0});
  TORCH_CHECK_VALUE(q.device().is_cpu(), "attnkern::topk_bwd CPU kernel got tensors on ", q.device());
  const std::vector<int64_t> o_shape{p.batch, p.heads_q, p.len_q, p.head_dim_v};
  TORCH_CHECK_VALUE(dout.sizes() == at::IntArrayRef(o_shape) && dout.scalar_type() == q.scalar_type(),
                    "grad_out must have the query's dtype and shape ", at::IntArrayRef(o_shape), ", got ",
                    dout.scalar_type(), " ", dout.sizes());
  const std::vector<int64_t> l_shape{p.batch, p.heads_q, p.len_q};
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef(l_shape) && lse.scalar_type() == at::kFloat,
                    "lse must be float32 of shape ", at::IntArrayRef(l_shape), ", got ", lse.scalar_type(), " ",
                    lse.sizes());
  TORCH_CHECK_VALUE(indices.dim() == 4 && indices.sizes().slice(0, 3) == at::IntArrayRef(l_shape) &&
                        indices.scalar_type() == at::kLong && indices.size(3) <= std::max<int64_t>(p.len_k, 0) &&
                        indices.size(3) <= kTopkMax,
                    "indices must be int64 of shape (B, Hq, L, min(top_k, S)) with B, Hq, L = ",
                    at::IntArrayRef(l_shape), ", got ", indices.scalar_type(), " ", indices.sizes());
  const at::Tensor lse_c = lse.contiguous(), idx_c = indices.contiguous();
  if (idx_c.numel() > 0) {  // the kernel indexes K/V rows with these: no out-of-range read
    const int64_t lo = idx_c.min().item<int64_t>(), hi = idx_c.max().item<int64_t>();
    TORCH_CHECK_VALUE(lo >= -1 && hi < p.len_k, "indices must lie in [-1, S) = [-1, ", p.len_k, "), got [", lo,
                      ", ", hi, "]");
  }
  TORCH_CHECK_VALUE(!mask_needs_grad || p.mask_kind == MaskKind::kFloat, "mask_needs_grad requires a floating mask");
  tp.top_k = idx_c.size(3);
  tp.indices = const_cast<int64_t*>(idx_c.data_ptr<int64_t>());
  p.lse = const_cast<float*>(lse_c.data_ptr<float>());
  p.dout = dout.data_ptr();
  set_strides3(p.dout_stride, dout);
  at::Tensor dq = at::empty({p.batch, p.heads_q, p.len_q, p.head_dim}, q.options());
  at::Tensor dk = at::empty({p.batch, p.heads_kv, p.len_k, p.head_dim}, q.options());
  at::Tensor dv = at::empty({p.batch, p.heads_kv, p.len_k, p.head_dim_v}, q.options());
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  set_strides3(p.dq_stride, dq);
  set_strides3(p.dk_stride, dk);
  set_strides3(p.dv_stride, dv);
  // a float mask's gradient is dS at the kept keys, 0 elsewhere: (B, Hq, L, S) fp32, like the dense op's
  const std::vector<int64_t> dmask_shape =
      mask_needs_grad ? std::vector<int64_t>{p.batch, p.heads_q, p.len_q, p.len_k} : std::vector<int64_t>{0};
  at::Tensor dmask = at::zeros(dmask_shape, q.options().dtype(at::kFloat));
  if (mask_needs_grad) tp.dmask = dmask.data_ptr<float>();
  const TopkKernelTable& kt = select_topk_kernels();
  parallel_items(p.batch * p.heads_kv, kt.backward_scratch_floats(tp), [&](int64_t item, float* scratch) {
    kt.backward_item(tp, item / p.heads_kv, item % p.heads_kv, scratch);
  });
  return {dq, dk, dv, dmask};
}

}  // namespace
}  // namespace attnkern::cpu

// Own schemas: top-k attention returns indices and takes top_k, so it is not a variant of
// attnkern::fwd. attnkern/topk.py registers the fake kernels and the autograd formula.
TORCH_LIBRARY_FRAGMENT(attnkern, m) {
  m.def(
      "topk_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, int top_k, float scale, int window_left, "
      "int window_right, bool bottom_right) -> (Tensor out, Tensor lse, Tensor indices)");
  m.def(
      "topk_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor lse, Tensor indices, Tensor? mask, "
      "float scale, int window_left, int window_right, bool bottom_right, bool mask_needs_grad) -> (Tensor grad_q, "
      "Tensor grad_k, Tensor grad_v, Tensor grad_mask)");
}

TORCH_LIBRARY_IMPL(attnkern, CPU, m) {
  m.impl("topk_fwd", &attnkern::cpu::topk_fwd_cpu);
  m.impl("topk_bwd", &attnkern::cpu::topk_bwd_cpu);
}
