// Shape and index checks of the packed ops (attnkern::varlen_fwd / varlen_bwd), shared by the
// CPU bindings (bindings_varlen.cpp) and the CUDA ones (cuda/varlen_ops.h). The index tensors
// are read on the host: the CUDA op passes host copies. Devices are the callers' checks
// (check_devices).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <initializer_list>
#include <optional>
#include <string>
#include <vector>

namespace attnkern {
namespace varlen {

struct PackedLayout {
  int64_t batch = 0;
  std::vector<int64_t> q_start, len_q, k_start, len_k;
  int64_t total_q = 0;  // cu_seqlens_q[-1]: rows past it belong to no sequence
};

inline const int32_t* int32_vector(const at::Tensor& t, const char* name, int64_t len) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && (len < 0 || t.size(0) == len), name, " must be 1-D",
                    len >= 0 ? " of length " + std::to_string(len) : std::string(), ", got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
  return t.data_ptr<int32_t>();
}

inline void check_cu_seqlens(const int32_t* cu, int64_t n, const char* name, int64_t rows, const char* rows_name) {
  TORCH_CHECK_VALUE(cu[0] == 0, name, "[0] must be 0, got ", cu[0]);
  for (int64_t b = 0; b < n; ++b)
    TORCH_CHECK_VALUE(cu[b + 1] >= cu[b], name, " must be non-decreasing, got ", name, "[", b, "] = ", cu[b],
                      " > ", name, "[", b + 1, "] = ", cu[b + 1]);
  TORCH_CHECK_VALUE(rows < 0 || cu[n] <= rows, name, "[-1] = ", cu[n], " points past the ", rows, " rows of ",
                    rows_name);
}

inline PackedLayout packed_layout(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_seqlens_q,
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
inline void check_packed_tensors(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool paged) {
  TORCH_CHECK_VALUE(q.dim() == 3, "q must be 3-D (total_q, heads, head_dim), got shape ", q.sizes());
  const int64_t kdim = paged ? 4 : 3;
  const char* kshape = paged ? "(num_blocks, page_size, heads_k, head_dim)" : "(total_k, heads_k, head_dim)";
  TORCH_CHECK_VALUE(k.dim() == kdim, "k must be ", kdim, "-D ", kshape, ", got shape ", k.sizes());
  TORCH_CHECK_VALUE(v.dim() == kdim, "v must be ", kdim, "-D ", kshape, ", got shape ", v.sizes());
  TORCH_CHECK_TYPE(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
                   "q, k and v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
                   v.scalar_type());
  const int64_t hk = k.size(kdim - 2);
  for (int64_t d = 0; d < kdim - 1; ++d)
    TORCH_CHECK_VALUE(v.size(d) == k.size(d), "v shape ", v.sizes(), " does not match k shape ", k.sizes(),
                      " before the head dim");
  TORCH_CHECK_VALUE(k.size(-1) == q.size(2), "k head dim ", k.size(-1), " does not match q head dim ", q.size(2));
  TORCH_CHECK_VALUE(hk > 0 && q.size(1) % hk == 0, "q heads ", q.size(1), " must be a multiple of k/v heads ", hk);
  TORCH_CHECK_VALUE(!paged || k.size(1) > 0, "page_size (k dim 1) must be >= 1");
}

// Every tensor of a call, data and indices, lives where the kernels read it: `device`.
struct NamedTensor {
  const char* name;
  const at::Tensor* tensor;  // nullptr or undefined: not given
};
inline const at::Tensor* given(const std::optional<at::Tensor>& t) { return t.has_value() ? &*t : nullptr; }
inline void check_devices(std::initializer_list<NamedTensor> tensors, const at::Device& device, const char* kernels) {
  for (const NamedTensor& n : tensors)
    if (n.tensor != nullptr && n.tensor->defined())
      TORCH_CHECK_VALUE(n.tensor->device() == device, n.name, " must be on ", device, " for ", kernels, ", got ",
                        n.tensor->device());
}

// out/grad_out (total_q, Hq, Ev) of q's dtype, lse and grad_lse (Hq, total_q) fp32
inline void check_backward_tensors(const at::Tensor& q, const at::Tensor& v, const at::Tensor& out,
                                   const at::Tensor& dout, const at::Tensor& lse,
                                   const std::optional<at::Tensor>& grad_lse) {
  const int64_t total_q = q.size(0), heads = q.size(1);
  TORCH_CHECK_VALUE(out.sizes() == at::IntArrayRef({total_q, heads, v.size(2)}) && dout.sizes() == out.sizes(),
                    "out and grad_out must have shape (total_q, heads, head_dim_v) = (", total_q, ", ", heads, ", ",
                    v.size(2), "), got ", out.sizes(), " and ", dout.sizes());
  TORCH_CHECK_TYPE(out.scalar_type() == q.scalar_type() && dout.scalar_type() == q.scalar_type(),
                   "out and grad_out must have q's dtype ", q.scalar_type());
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef({heads, total_q}) && lse.scalar_type() == at::kFloat,
                    "lse must be float32 of shape (heads, total_q) = (", heads, ", ", total_q, "), got ",
                    lse.scalar_type(), " ", lse.sizes());
  if (grad_lse.has_value() && grad_lse->defined())
    TORCH_CHECK_VALUE(grad_lse->sizes() == lse.sizes(), "grad_lse must have shape ", lse.sizes(), ", got ",
                      grad_lse->sizes());
}

inline void check_scalars(double scale, int64_t window_left, int64_t window_right) {
  TORCH_CHECK_VALUE(window_left >= -1 && window_right >= -1, "window_left/window_right must be >= -1, got (",
                    window_left, ", ", window_right, ")");
  TORCH_CHECK_VALUE(std::isfinite(scale), "scale must be finite, got ", scale);
}

}  // namespace varlen
}  // namespace attnkern
