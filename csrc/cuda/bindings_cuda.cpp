// CUDA implementations of attnkern::fwd / attnkern::bwd (schemas in csrc/bindings.cpp) and the
// _C_cuda module's build information. The only file of csrc/cuda that knows about torch:
// tensors are checked (csrc/torch_params.h), brought to the kernels' preconditions, turned
// into AttnParams and launched on torch's current stream.
//
// Importing this module needs no GPU: nothing here touches the driver until an op runs.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <string>

#include "../torch_params.h"
#include "launch.h"

#ifndef ATTNKERN_VERSION
#define ATTNKERN_VERSION "unknown"
#endif
#ifndef ATTNKERN_CUDA_ARCHS
#define ATTNKERN_CUDA_ARCHS "unknown"
#endif

namespace attnkern {
namespace {

constexpr int64_t kMaxHeadDim = 256;
constexpr int64_t kMaxGridYZ = 65535;  // heads and batch index grid dims y and z

const char* dtype_name(DType d) {
  switch (d) {
    case DType::kFloat16:
      return "float16";
    case DType::kBFloat16:
      return "bfloat16";
    default:
      return "float32";
  }
}

std::string compiled_head_dims_text(DType dtype) {
  std::string text;
  for (const cuda::Instance& inst : cuda::compiled_instances())
    if (inst.dtype == dtype) text += (text.empty() ? "" : ", ") + std::to_string(inst.head_dim);
  return text.empty() ? "none" : text;
}

// Why the CUDA kernels cannot serve these head dims and dtype in this build; "" if they can.
// One rule for the op checks below and for attnkern/dispatch.py's "cuda" row.
std::string why_not(int64_t head_dim, int64_t head_dim_v, const std::string& dtype) {
  DType d;
  if (dtype == "float16") {
    d = DType::kFloat16;
  } else if (dtype == "bfloat16") {
    d = DType::kBFloat16;
  } else {
    return "backend 'cuda' supports float16 and bfloat16, not " + dtype;
  }
  if (head_dim < 1 || head_dim_v < 1)
    return "backend 'cuda' needs head dims >= 1, got (" + std::to_string(head_dim) + ", " +
           std::to_string(head_dim_v) + ")";
  if (std::max(head_dim, head_dim_v) > kMaxHeadDim)
    return "backend 'cuda' supports head dims up to " + std::to_string(kMaxHeadDim) + ", got (" +
           std::to_string(head_dim) + ", " + std::to_string(head_dim_v) + ")";
  if (cuda::head_dim_bucket(head_dim, head_dim_v, d) == 0)
    return "this build of the CUDA extension has no " + dtype + " kernel for head dim " +
           std::to_string(std::max(head_dim, head_dim_v)) + " (compiled head dims: " + compiled_head_dims_text(d) +
           "; see ATTNKERN_CUDA_HDIMS / ATTNKERN_CUDA_DTYPES)";
  return "";
}

// The kernels' reason not to run on this device; "" if they can. Probes for a kernel image so a
// GPU newer than the compiled archs gets a plain answer instead of a launch failure.
std::string device_why_not_uncached(int device) {
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    cudaGetLastError();
    return "cannot query CUDA device " + std::to_string(device);
  }
  const std::string cc = std::to_string(major) + "." + std::to_string(minor);
  if (major < 8)
    return "backend 'cuda' needs compute capability 8.0 or newer, device " + std::to_string(device) + " is " + cc;
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  if (!cuda::has_kernel_image())
    return "the CUDA extension was built for archs " ATTNKERN_CUDA_ARCHS " and has no kernels for compute capability " +
           cc + " (rebuild with TORCH_CUDA_ARCH_LIST including it)";
  return "";
}

std::string device_why_not(int device) {
  constexpr int kCached = 64;
  static std::string reasons[kCached];
  static bool known[kCached] = {false};
  if (device < 0 || device >= kCached) return device_why_not_uncached(device);
  if (!known[device]) {
    reasons[device] = device_why_not_uncached(device);
    known[device] = true;
  }
  return reasons[device];
}

int sm_count(int device) {
  static int cache[64] = {0};
  if (device >= 0 && device < 64 && cache[device] > 0) return cache[device];
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  if (device >= 0 && device < 64) cache[device] = n;
  return n;
}

// Checks only the CUDA kernels need, after the shared ones of check_and_fill_inputs.
void check_cuda_call(const AttnParams& p, const at::Tensor& q, const char* op) {
  TORCH_CHECK_VALUE(q.is_cuda(), op, " CUDA kernel got tensors on ", q.device());
  const std::string reason = why_not(p.head_dim, p.head_dim_v, dtype_name(p.dtype));
  TORCH_CHECK_VALUE(reason.empty(), op, ": query/key/value of dtype ", q.scalar_type(), " and head dims (",
                    p.head_dim, ", ", p.head_dim_v, "): ", reason);
  TORCH_CHECK_VALUE(p.batch <= kMaxGridYZ, op, ": batch (product of leading dims) must be <= ", kMaxGridYZ,
                    " for the CUDA kernels, got ", p.batch);
  TORCH_CHECK_VALUE(p.heads_q <= kMaxGridYZ, op, ": query heads must be <= ", kMaxGridYZ, ", got ", p.heads_q);
  TORCH_CHECK_VALUE(p.len_q < std::numeric_limits<int32_t>::max() && p.len_k < std::numeric_limits<int32_t>::max(),
                    op, ": sequence lengths must be < 2^31, got L=", p.len_q, ", S=", p.len_k);
  const std::string dev = device_why_not(q.get_device());
  TORCH_CHECK(dev.empty(), op, ": ", dev);
}

// The kernels read and write rows in 16-byte chunks: unit stride on the head dim, a head dim
// that is a multiple of 8, row/head/batch strides that are multiples of 8 and a 16-byte aligned
// base. Anything else is copied once into a zero-padded contiguous tensor.
bool chunk_aligned(const at::Tensor& t) {
  if (t.size(3) % 8 != 0 || (t.size(3) > 1 && t.stride(3) != 1)) return false;
  for (int d = 0; d < 3; ++d)
    if (t.size(d) > 1 && t.stride(d) % 8 != 0) return false;
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

at::Tensor kernel_input(const at::Tensor& t) {
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

void set_input(const void*& ptr, int64_t* strides, const at::Tensor& t) {
  ptr = t.data_ptr();
  set_strides3(strides, t);
}
void set_output(void*& ptr, int64_t* strides, const at::Tensor& t) {
  ptr = t.data_ptr();
  set_strides3(strides, t);
}

std::tuple<at::Tensor, at::Tensor> fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                            const std::optional<at::Tensor>& mask,
                                            const std::optional<at::Tensor>& rng_seed, double scale,
                                            int64_t window_left, int64_t window_right, bool bottom_right,
                                            double dropout_p) {
  AttnParams p;
  check_and_fill_inputs(p, q_in, k_in, v_in, mask, rng_seed, {scale, window_left, window_right, bottom_right, dropout_p});
  check_cuda_call(p, q_in, "attnkern::fwd");
  const c10::cuda::CUDAGuard guard(q_in.device());

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
  split.num_splits = cuda::decode_num_splits(p, sm_count(q_in.get_device()));
  at::Tensor o_partial, lse_partial;
  if (split.num_splits > 1) {
    o_partial = at::empty({split.num_splits, p.batch, p.heads_q, p.len_q, p.head_dim_v}, lse.options());
    lse_partial = at::empty({split.num_splits, p.batch, p.heads_q, p.len_q}, lse.options());
    split.o_partial = o_partial.data_ptr<float>();
    split.lse_partial = lse_partial.data_ptr<float>();
  }
  C10_CUDA_CHECK(cuda::forward(p, split, c10::cuda::getCurrentCUDAStream().stream()));
  out.finish();
  return {out.result, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q_in,
    const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& rng_seed, double scale,
    int64_t window_left, int64_t window_right, bool bottom_right, double dropout_p, bool mask_needs_grad) {
  AttnParams p;
  check_and_fill_inputs(p, q_in, k_in, v_in, mask, rng_seed, {scale, window_left, window_right, bottom_right, dropout_p});
  check_backward_tensors(p, q_in, grad_out, out_in, lse, grad_lse);
  check_cuda_call(p, q_in, "attnkern::bwd");
  TORCH_CHECK_VALUE(!mask_needs_grad || p.mask_kind == MaskKind::kFloat,
                    "mask_needs_grad requires a floating attn_mask");
  const c10::cuda::CUDAGuard guard(q_in.device());

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
  set_output(p.o, p.o_stride, out);
  p.lse = lse_c.data_ptr<float>();
  set_input(p.dout, p.dout_stride, dout);
  p.dlse = dlse.defined() ? dlse.data_ptr<float>() : nullptr;
  set_output(p.dq, p.dq_stride, dq.target);
  set_output(p.dk, p.dk_stride, dk.target);
  set_output(p.dv, p.dv_stride, dv.target);
  p.dmask = mask_needs_grad ? dmask.data_ptr<float>() : nullptr;
  p.delta = delta.data_ptr<float>();
  C10_CUDA_CHECK(cuda::backward(p, c10::cuda::getCurrentCUDAStream().stream()));
  dq.finish();
  dk.finish();
  dv.finish();
  return {dq.result, dk.result, dv.result, dmask};
}

}  // namespace
}  // namespace attnkern

TORCH_LIBRARY_IMPL(attnkern, CUDA, m) {
  m.impl("fwd", &attnkern::fwd_cuda);
  m.impl("bwd", &attnkern::bwd_cuda);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "attnkern CUDA extension: sm80+ fused attention kernels for attnkern::fwd / attnkern::bwd";
  m.def("version", [] { return std::string(ATTNKERN_VERSION); });
  m.def("archs", [] { return std::string(ATTNKERN_CUDA_ARCHS); }, "TORCH_CUDA_ARCH_LIST the extension was built for");
  m.def(
      "instances",
      [] {
        std::vector<std::pair<int, std::string>> out;
        for (const attnkern::cuda::Instance& inst : attnkern::cuda::compiled_instances())
          out.emplace_back(inst.head_dim, attnkern::dtype_name(inst.dtype));
        return out;
      },
      "(head-dim bucket, dtype) pairs compiled into this build, forward and backward");
  m.def("why_not", &attnkern::why_not, pybind11::arg("head_dim"), pybind11::arg("head_dim_v"), pybind11::arg("dtype"),
        "Why the CUDA kernels cannot serve these head dims and dtype ('float16'/'bfloat16'); '' if they can");
  m.def("device_why_not", &attnkern::device_why_not, pybind11::arg("device"),
        "Why the CUDA kernels cannot run on this device index; '' if they can (needs a GPU)");
  m.attr("max_head_dim") = attnkern::kMaxHeadDim;
  m.attr("decode_max_len_q") = attnkern::cuda::kDecodeMaxLenQ;
}
