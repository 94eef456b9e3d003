// The CUDA ops' work between the tensor checks and the kernels, shared by the CUDA bindings
// (bindings_cuda.cpp) and the CPU emulator (emulator/emulator.cpp): what the kernels can serve,
// bringing tensors to the kernels' preconditions, outputs, workspaces, AttnParams, launch.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <tuple>

#include "../mask.h"
#include "../torch_params.h"
#include "launch.h"

namespace attnkern {
namespace cuda_ops {

constexpr int64_t kMaxHeadDim = 256;
constexpr int64_t kMaxGridYZ = 65535;  // heads and batch index grid dims y and z

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::kFloat16:
      return "float16";
    case DType::kBFloat16:
      return "bfloat16";
    default:
      return "float32";
  }
}

inline std::string compiled_head_dims_text(DType dtype) {
  std::string text;
  for (const cuda::Instance& inst : cuda::compiled_instances())
    if (inst.dtype == dtype) text += (text.empty() ? "" : ", ") + std::to_string(inst.head_dim);
  return text.empty() ? "none" : text;
}

// Why the CUDA kernels cannot serve these head dims and dtype in this build; "" if they can.
// One rule for the op checks below and for attnkern/dispatch.py's "cuda" row.
inline std::string why_not(int64_t head_dim, int64_t head_dim_v, const std::string& dtype) {
  DType d;
  if (dtype == "float16") {
    d = DType::kFloat16;
  } else if (dtype == "bfloat16") {
    d = DType::kBFloat16;
  } else {
    return "backend 'cuda' supports float16 and bfloat16, not " + dtype;
  }
  if (head_dim < 1 || head_dim_v < 1)
    return "backend 'cuda' needs head dims >= 1, got (" + std::to_string(head_dim) + ", " + std::to_string(head_dim_v) +
           ")";
  if (std::max(head_dim, head_dim_v) > kMaxHeadDim)
    return "backend 'cuda' supports head dims up to " + std::to_string(kMaxHeadDim) + ", got (" +
           std::to_string(head_dim) + ", " + std::to_string(head_dim_v) + ")";
  if (cuda::head_dim_bucket(head_dim, head_dim_v, d) == 0)
    return "this build of the CUDA extension has no " + dtype + " kernel for head dim " +
           std::to_string(std::max(head_dim, head_dim_v)) + " (compiled head dims: " + compiled_head_dims_text(d) +
           "; see ATTNKERN_CUDA_HDIMS / ATTNKERN_CUDA_DTYPES)";
  return "";
}

// Checks of the kernels' limits after the shared ones of check_and_fill_inputs; `op` names the op.
inline void check_kernel_limits(const AttnParams& p, const at::Tensor& q, const char* op) {
  const std::string reason = why_not(p.head_dim, p.head_dim_v, dtype_name(p.dtype));
  TORCH_CHECK_VALUE(reason.empty(), op, ": query/key/value of dtype ", q.scalar_type(), " and head dims (", p.head_dim,
                    ", ", p.head_dim_v, "): ", reason);
  TORCH_CHECK_VALUE(p.batch <= kMaxGridYZ, op, ": batch (product of leading dims) must be <= ", kMaxGridYZ,
                    " for the CUDA kernels, got ", p.batch);
  TORCH_CHECK_VALUE(p.heads_q <= kMaxGridYZ, op, ": query heads must be <= ", kMaxGridYZ, ", got ", p.heads_q);
  TORCH_CHECK_VALUE(p.len_q < std::numeric_limits<int32_t>::max() && p.len_k < std::numeric_limits<int32_t>::max(), op,
                    ": sequence lengths must be < 2^31, got L=", p.len_q, ", S=", p.len_k);
}

// The kernels read and write rows in 16-byte chunks: unit stride on the head dim, a head dim
// that is a multiple of 8, row/head/batch strides that are multiples of 8 and a 16-byte aligned
// base. Anything else is copied once into a zero-padded contiguous tensor.
inline bool chunk_aligned(const at::Tensor& t) {
  if (t.size(3) % 8 != 0 || (t.size(3) > 1 && t.stride(3) != 1)) return false;
  for (int d = 0; d < 3; ++d)
    if (t.size(d) > 1 && t.stride(d) % 8 != 0) return false;
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

inline at::Tensor kernel_input(const at::Tensor& t) {
  if (chunk_aligned(t)) return t;
  const int64_t d = t.size(3), padded = (d + 7) / 8 * 8;
  at::Tensor out = at::zeros({t.size(0), t.size(1), t.size(2), padded}, t.options());
  out.narrow(3, 0, d).copy_(t);
  return out;
}

// An output the caller receives (`result`, laid out by empty_rows_like) and the buffer the kernel
// writes: `result` itself, or a padded buffer when the head dim is not a multiple of 8.
struct KernelOutput {
  at::Tensor result, target;
  KernelOutput(const at::Tensor& like, int64_t last, at::ScalarType dtype) {
    result = empty_rows_like(like, last, dtype);
    target = last % 8 == 0 ? result : empty_rows_like(like, (last + 7) / 8 * 8, dtype);
  }
  void finish() {
    if (!target.is_same(result)) result.copy_(target.narrow(3, 0, result.size(3)));
  }
};

inline void set_input(const void*& ptr, int64_t* strides, const at::Tensor& t) {
  ptr = t.data_ptr();
  set_strides3(strides, t);
}
inline void set_output(void*& ptr, int64_t* strides, const at::Tensor& t) {
  ptr = t.data_ptr();
  set_strides3(strides, t);
}

// What the glue needs from the device side.
struct Device {
  int sm_count;
  cudaStream_t stream;
  void (*check)(cudaError_t err, const char* op);  // raise on a launch error
  void (*on_launch)(const AttnParams& p);          // called right before the kernels, may be null
};

// attnkern::fwd on checked inputs: p filled by check_and_fill_inputs and check_kernel_limits passed.
inline std::tuple<at::Tensor, at::Tensor> forward_op(AttnParams& p, const at::Tensor& q_in, const at::Tensor& k_in,
                                                     const at::Tensor& v_in, const Device& dev) {
  KernelOutput out(q_in, p.head_dim_v, q_in.scalar_type());
  at::Tensor lse = at::empty({p.batch, p.heads_q, p.len_q}, q_in.options().dtype(at::kFloat));
  if (p.batch == 0 || p.heads_q == 0 || p.len_q == 0) return {out.result, lse};
  if (p.len_k == 0) {  // no keys: every row is empty
    out.result.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out.result, lse};
  }
  const at::Tensor q = kernel_input(q_in), k = kernel_input(k_in), v = kernel_input(v_in);
  set_input(p.q, p.q_stride, q);
  set_input(p.k, p.k_stride, k);
  set_input(p.v, p.v_stride, v);
  set_output(p.o, p.o_stride, out.target);
  p.lse = lse.data_ptr<float>();

  cuda::FwdSplit split;
  split.num_splits = cuda::decode_num_splits(p, dev.sm_count);
  at::Tensor o_partial, lse_partial;
  if (split.num_splits > 1) {
    o_partial = at::empty({split.num_splits, p.batch, p.heads_q, p.len_q, p.head_dim_v}, lse.options());
    lse_partial = at::empty({split.num_splits, p.batch, p.heads_q, p.len_q, 2}, lse.options());
    split.o_partial = o_partial.data_ptr<float>();
    split.lse_partial = lse_partial.data_ptr<float>();
  }
  if (dev.on_launch != nullptr) dev.on_launch(p);
  dev.check(cuda::forward(p, split, dev.stream), "attnkern::fwd");
  out.finish();
  return {out.result, lse};
}

// attnkern::bwd on checked inputs (check_backward_tensors passed too).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_op(
    AttnParams& p, const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q_in,
    const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse,
    bool mask_needs_grad, const Device& dev) {
  TORCH_CHECK_VALUE(!mask_needs_grad || p.mask_kind == MaskKind::kFloat,
                    "mask_needs_grad requires a floating attn_mask");
  KernelOutput dq(q_in, p.head_dim, q_in.scalar_type());
  KernelOutput dk(k_in, p.head_dim, q_in.scalar_type());
  KernelOutput dv(v_in, p.head_dim_v, q_in.scalar_type());
  const auto f32 = q_in.options().dtype(at::kFloat);
  at::Tensor dmask = mask_needs_grad ? at::zeros({p.batch, p.heads_q, p.len_q, p.len_k}, f32) : at::empty({0}, f32);
  if (p.batch == 0 || p.heads_q == 0 || p.len_q == 0 || p.len_k == 0) {  // no (query, key) pair
    dq.result.zero_();
    dk.result.zero_();
    dv.result.zero_();
    return {dq.result, dk.result, dv.result, dmask};
  }
  const at::Tensor q = kernel_input(q_in), k = kernel_input(k_in), v = kernel_input(v_in);
  const at::Tensor out = kernel_input(out_in), dout = kernel_input(grad_out);
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor dlse;
  if (grad_lse.has_value() && grad_lse->defined()) dlse = grad_lse->to(at::kFloat).contiguous();
  at::Tensor delta = at::empty({p.batch, p.heads_q, p.len_q}, f32);

  set_input(p.q, p.q_stride, q);
  set_input(p.k, p.k_stride, k);
  set_input(p.v, p.v_stride, v);
  p.o = const_cast<void*>(out.data_ptr());
  set_strides3(p.o_stride, out);
  p.lse = const_cast<float*>(lse_c.data_ptr<float>());
  set_input(p.dout, p.dout_stride, dout);
  p.dlse = dlse.defined() ? dlse.data_ptr<float>() : nullptr;
  set_output(p.dq, p.dq_stride, dq.target);
  set_output(p.dk, p.dk_stride, dk.target);
  set_output(p.dv, p.dv_stride, dv.target);
  p.dmask = mask_needs_grad ? dmask.data_ptr<float>() : nullptr;
  p.delta = delta.data_ptr<float>();
  // The rare path (mask.h kHugeLse): a row whose LSE is huge has lost log(sum) in it, so the
  // forward runs once more for every row's (max, log2 sum), which such rows' P then comes from.
  // The plain backward pays one reduction over the LSE and a host sync.
  at::Tensor row_stats;
  if (at::logical_and(lse_c.abs() > kHugeLse, lse_c.isfinite()).any().item<bool>()) {
    row_stats = at::empty({p.batch, p.heads_q, p.len_q, 2}, f32);
    KernelOutput scratch_out(q_in, p.head_dim_v, q_in.scalar_type());
    at::Tensor scratch_lse = at::empty_like(lse_c);
    AttnParams f = p;
    set_output(f.o, f.o_stride, scratch_out.target);
    f.lse = scratch_lse.data_ptr<float>();
    f.row_stats = row_stats.data_ptr<float>();
    dev.check(cuda::forward(f, cuda::FwdSplit{}, dev.stream), "attnkern::bwd (row statistics)");
    p.row_stats = row_stats.data_ptr<float>();
  }
  if (dev.on_launch != nullptr) dev.on_launch(p);
  dev.check(cuda::backward(p, dev.stream), "attnkern::bwd");
  dq.finish();
  dk.finish();
  dv.finish();
  return {dq.result, dk.result, dv.result, dmask};
}

}  // namespace cuda_ops
}  // namespace attnkern
