// Tensor checks at the op boundary and the conversion of tensors to AttnParams, shared by
// the CPU bindings (bindings.cpp) and the CUDA bindings (cuda/bindings_cuda.cpp).
// Errors name the argument, the shape received and what was expected.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

#include "mask.h"
#include "params.h"

namespace attnkern {

inline DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

// Kernels read the head dim with unit stride; anything else is copied once here.
inline at::Tensor unit_last_stride(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

// Output/gradient allocation: keep the row/head interleaving of `like` (B, H, rows, *) so
// flash-layout (B, rows, H, D) callers get flash-layout results without a copy. The rule
// depends only on strides; attnkern/ops.py applies the same rule for fake tensors.
inline at::Tensor empty_rows_like(const at::Tensor& like, int64_t last, at::ScalarType dtype) {
  const int64_t b = like.size(0), h = like.size(1), rows = like.size(2);
  auto opts = like.options().dtype(dtype);
  if (like.stride(1) < like.stride(2)) return at::empty({b, rows, h, last}, opts).transpose(1, 2);
  return at::empty({b, h, rows, last}, opts);
}

inline void set_strides3(int64_t* dst, const at::Tensor& t) {
  dst[0] = t.stride(0);
  dst[1] = t.stride(1);
  dst[2] = t.stride(2);
}

// A window side of `reach` (L + S) or more reaches past every key of every row: it is unbounded
// (-1), which keeps the band's index arithmetic (row + offset + right + 1) far from overflow for
// any int64 the op accepts.
inline int64_t window_side(int64_t side, int64_t reach) { return side >= reach ? -1 : side; }

inline void check_dropout_p(double dropout_p) {
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ", dropout_p);
}

// Dropout of p: keep a weight iff its Philox word (philox.h) >= dropout_p * 2^32, the stream
// keyed by rng_seed[0] (a CPU int64 tensor, drawn by attnkern.dispatch.new_rng_seed).
inline void fill_dropout(AttnParams& p, double dropout_p, const std::optional<at::Tensor>& rng_seed) {
  check_dropout_p(dropout_p);
  p.dropout_p = static_cast<float>(dropout_p);
  if (dropout_p == 0.0) return;
  TORCH_CHECK_VALUE(rng_seed.has_value() && rng_seed->defined() && rng_seed->numel() >= 1 &&
                        rng_seed->scalar_type() == at::kLong && rng_seed->device().is_cpu(),
                    "rng_seed must be a CPU int64 tensor with at least one element when dropout_p > 0");
  p.dropout_seed = static_cast<uint64_t>(rng_seed->data_ptr<int64_t>()[0]);
  const double t = dropout_p * 4294967296.0;
  p.dropout_threshold = t >= 4294967295.0 ? 4294967295u : static_cast<uint32_t>(t);
}

struct Semantics {
  double scale;
  int64_t window_left, window_right;
  bool bottom_right;
  double dropout_p;
};

// Checks q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev), mask (B, Hq, L, S) and the
// scalar arguments; fills shapes, inputs, mask and semantics of `p`.
inline void check_and_fill_inputs(AttnParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& rng_seed,
                                  const Semantics& sem) {
  TORCH_CHECK_VALUE(q.dim() == 4, "query must be 4-D (B, Hq, L, E), got shape ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == 4, "key must be 4-D (B, Hkv, S, E), got shape ", k.sizes());
  TORCH_CHECK_VALUE(v.dim() == 4, "value must be 4-D (B, Hkv, S, Ev), got shape ", v.sizes());
  TORCH_CHECK_TYPE(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
                   "query, key and value must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
                   v.scalar_type());
  TORCH_CHECK_VALUE(q.device() == k.device() && q.device() == v.device(),
                    "query, key and value must be on one device, got ", q.device(), ", ", k.device(), ", ",
                    v.device());
  const int64_t B = q.size(0), Hq = q.size(1), L = q.size(2), E = q.size(3);
  const int64_t Hkv = k.size(1), S = k.size(2);
  TORCH_CHECK_VALUE(k.size(0) == B && v.size(0) == B, "batch sizes differ: query ", B, ", key ", k.size(0),
                    ", value ", v.size(0));
  TORCH_CHECK_VALUE(k.size(3) == E, "key head dim ", k.size(3), " does not match query head dim ", E);
  TORCH_CHECK_VALUE(v.size(1) == Hkv && v.size(2) == S, "value shape ", v.sizes(),
                    " does not match key heads/length (", Hkv, ", ", S, ")");
  TORCH_CHECK_VALUE(Hkv > 0 ? Hq % Hkv == 0 : Hq == 0, "query heads ", Hq,
                    " must be a multiple of key/value heads ", Hkv);
  TORCH_CHECK_VALUE(sem.window_left >= -1 && sem.window_right >= -1,
                    "window_left/window_right must be >= -1, got (", sem.window_left, ", ", sem.window_right, ")");
  check_dropout_p(sem.dropout_p);
  TORCH_CHECK_VALUE(std::isfinite(sem.scale), "scale must be finite, got ", sem.scale);

  p.batch = B;
  p.heads_q = Hq;
  p.heads_kv = Hkv;
  p.len_q = L;
  p.len_k = S;
  p.head_dim = E;
  p.head_dim_v = v.size(3);
  p.dtype = dtype_of(q, "query");
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  set_strides3(p.q_stride, q);
  set_strides3(p.k_stride, k);
  set_strides3(p.v_stride, v);
  p.scale = static_cast<float>(sem.scale);
  p.window_left = window_side(sem.window_left, L + S);
  p.window_right = window_side(sem.window_right, L + S);
  p.bottom_right = sem.bottom_right;

  if (mask.has_value() && mask->defined()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK_VALUE(m.dim() == 4 && m.size(0) == B && m.size(1) == Hq && m.size(2) == L && m.size(3) == S,
                      "attn_mask must have shape (B, Hq, L, S) = (", B, ", ", Hq, ", ", L, ", ", S, "), got ",
                      m.sizes());
    TORCH_CHECK_VALUE(m.device() == q.device(), "attn_mask must be on the query's device ", q.device(), ", got ",
                      m.device());
    if (m.scalar_type() == at::kBool) {
      p.mask_kind = MaskKind::kBool;
    } else {
      TORCH_CHECK_TYPE(m.scalar_type() == at::kFloat || m.scalar_type() == q.scalar_type(),
                       "attn_mask must be bool, float32 or the query's dtype ", q.scalar_type(), ", got ",
                       m.scalar_type());
      p.mask_kind = MaskKind::kFloat;
      p.mask_dtype = dtype_of(m, "attn_mask");
    }
    p.mask = m.data_ptr();
    for (int i = 0; i < 4; ++i) p.mask_stride[i] = m.stride(i);
  }

  fill_dropout(p, sem.dropout_p, rng_seed);
}

// Score modifiers (see params.h): softcap, sinks (Hq,) and alibi_slopes (B, Hq), fp32 on the
// query's device; attnkern/_semantics.py normalises them, these checks guard the op boundary.
inline void check_and_fill_modifiers(AttnParams& p, const at::Tensor& q, double softcap,
                                     const std::optional<at::Tensor>& sinks,
                                     const std::optional<at::Tensor>& alibi_slopes) {
  TORCH_CHECK_VALUE(std::isfinite(softcap) && softcap >= 0.0, "softcap must be finite and >= 0, got ", softcap);
  // held in [kSoftcapMin, kSoftcapMax] (mask.h: no fp32 result changes, every kernel's constants stay finite)
  p.softcap = softcap > 0.0 ? static_cast<float>(std::min(std::max(softcap, double(kSoftcapMin)), double(kSoftcapMax)))
                            : 0.f;
  if (sinks.has_value() && sinks->defined()) {
    const at::Tensor& s = *sinks;
    TORCH_CHECK_TYPE(s.scalar_type() == at::kFloat, "sinks must be float32, got ", s.scalar_type());
    TORCH_CHECK_VALUE(s.dim() == 1 && s.size(0) == p.heads_q && s.is_contiguous(),
                      "sinks must be a contiguous tensor of shape (", p.heads_q, "), got ", s.sizes());
    TORCH_CHECK_VALUE(s.device() == q.device(), "sinks must be on the query's device ", q.device(), ", got ",
                      s.device());
    p.sinks = s.data_ptr<float>();
  }
  if (alibi_slopes.has_value() && alibi_slopes->defined()) {
    const at::Tensor& a = *alibi_slopes;
    TORCH_CHECK_TYPE(a.scalar_type() == at::kFloat, "alibi_slopes must be float32, got ", a.scalar_type());
    TORCH_CHECK_VALUE(a.dim() == 2 && a.size(0) == p.batch && a.size(1) == p.heads_q && a.is_contiguous(),
                      "alibi_slopes must be a contiguous tensor of shape (", p.batch, ", ", p.heads_q, "), got ",
                      a.sizes());
    TORCH_CHECK_VALUE(a.device() == q.device(), "alibi_slopes must be on the query's device ", q.device(),
                      ", got ", a.device());
    p.alibi_slopes = a.data_ptr<float>();
  }
}

// Checks of the backward-only tensors against the forward's shapes in `p`.
inline void check_backward_tensors(const AttnParams& p, const at::Tensor& q, const at::Tensor& dout,
                                   const at::Tensor& out, const at::Tensor& lse,
                                   const std::optional<at::Tensor>& grad_lse) {
  const std::vector<int64_t> o_shape{p.batch, p.heads_q, p.len_q, p.head_dim_v};
  TORCH_CHECK_VALUE(out.sizes() == at::IntArrayRef(o_shape), "out must have shape ", at::IntArrayRef(o_shape),
                    ", got ", out.sizes());
  TORCH_CHECK_VALUE(dout.sizes() == at::IntArrayRef(o_shape), "grad_out must have shape ", at::IntArrayRef(o_shape),
                    ", got ", dout.sizes());
  TORCH_CHECK_TYPE(out.scalar_type() == q.scalar_type() && dout.scalar_type() == q.scalar_type(),
                   "out and grad_out must have the query's dtype ", q.scalar_type());
  const std::vector<int64_t> l_shape{p.batch, p.heads_q, p.len_q};
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef(l_shape) && lse.scalar_type() == at::kFloat,
                    "lse must be float32 of shape ", at::IntArrayRef(l_shape), ", got ", lse.scalar_type(), " ",
                    lse.sizes());
  if (grad_lse.has_value() && grad_lse->defined())
    TORCH_CHECK_VALUE(grad_lse->sizes() == at::IntArrayRef(l_shape), "grad_lse must have shape ",
                      at::IntArrayRef(l_shape), ", got ", grad_lse->sizes());
  for (const at::Tensor* t : {&dout, &out, &lse})
    TORCH_CHECK_VALUE(t->device() == q.device(), "backward tensors must be on the query's device ", q.device());
  if (grad_lse.has_value() && grad_lse->defined())
    TORCH_CHECK_VALUE(grad_lse->device() == q.device(), "grad_lse must be on the query's device ", q.device(),
                      ", got ", grad_lse->device());
}

}  // namespace attnkern
