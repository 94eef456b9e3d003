// CUDA implementations of attnkern::fwd / attnkern::bwd (schemas in csrc/bindings.cpp) and the
// _C_cuda module's build information. With torch_ops.h, the only code of csrc/cuda that knows
// about torch: tensors are checked (csrc/torch_params.h), brought to the kernels'
// preconditions, turned into AttnParams and launched on torch's current stream.
//
// Importing this module needs no GPU: nothing here touches the driver until an op runs.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>  // not <torch/extension.h>: see csrc/bindings.cpp
#include <torch/library.h>

#include <atomic>
#include <mutex>
#include <string>

#include "torch_ops.h"
#include "varlen_ops.h"

#ifndef ATTNKERN_VERSION
#define ATTNKERN_VERSION "unknown"
#endif
#ifndef ATTNKERN_CUDA_ARCHS
#define ATTNKERN_CUDA_ARCHS "unknown"
#endif

namespace attnkern {
namespace {

using cuda_ops::dtype_name;

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
  static std::mutex lock;
  static std::string reasons[kCached];
  static bool known[kCached] = {false};
  if (device < 0 || device >= kCached) return device_why_not_uncached(device);
  const std::lock_guard<std::mutex> guard(lock);
  if (!known[device]) {
    reasons[device] = device_why_not_uncached(device);
    known[device] = true;
  }
  return reasons[device];
}

int sm_count(int device) {
  static std::atomic<int> cache[64] = {};
  if (device >= 0 && device < 64 && cache[device].load() > 0) return cache[device].load();
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  if (device >= 0 && device < 64) cache[device].store(n);
  return n;
}

void check_device(const AttnParams& p, const at::Tensor& q, const char* op) {
  TORCH_CHECK_VALUE(q.is_cuda(), op, " CUDA kernel got tensors on ", q.device());
  cuda_ops::check_kernel_limits(p, q, op);
  const std::string reason = device_why_not(q.get_device());
  TORCH_CHECK(reason.empty(), op, ": ", reason);
}

void check_launch(cudaError_t err, const char*) { C10_CUDA_CHECK(err); }

cuda_ops::Device current_device(const at::Tensor& q) {
  return {sm_count(q.get_device()), c10::cuda::getCurrentCUDAStream(q.get_device()).stream(), &check_launch, nullptr};
}

std::tuple<at::Tensor, at::Tensor> fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                            const std::optional<at::Tensor>& mask,
                                            const std::optional<at::Tensor>& rng_seed, double scale,
                                            int64_t window_left, int64_t window_right, bool bottom_right,
                                            double dropout_p, double softcap, const std::optional<at::Tensor>& sinks,
                                            const std::optional<at::Tensor>& alibi_slopes) {
  AttnParams p;
  check_and_fill_inputs(p, q, k, v, mask, rng_seed, {scale, window_left, window_right, bottom_right, dropout_p});
  check_and_fill_modifiers(p, q, softcap, sinks, alibi_slopes);
  check_device(p, q, "attnkern::fwd");
  const c10::cuda::CUDAGuard guard(q.device());
  return cuda_ops::forward_op(p, q, k, v, current_device(q));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& rng_seed, double scale, int64_t window_left, int64_t window_right,
    bool bottom_right, double dropout_p, bool mask_needs_grad, double softcap,
    const std::optional<at::Tensor>& alibi_slopes) {
  AttnParams p;
  check_and_fill_inputs(p, q, k, v, mask, rng_seed, {scale, window_left, window_right, bottom_right, dropout_p});
  check_and_fill_modifiers(p, q, softcap, std::nullopt, alibi_slopes);
  check_backward_tensors(p, q, grad_out, out, lse, grad_lse);
  check_device(p, q, "attnkern::bwd");
  const c10::cuda::CUDAGuard guard(q.device());
  return cuda_ops::backward_op(p, grad_out, grad_lse, q, k, v, out, lse, mask_needs_grad, current_device(q));
}

// attnkern::varlen_fwd / varlen_bwd (schemas in csrc/bindings_varlen.cpp): packed and paged
// batches through the kernels' varlen variants (varlen_ops.h)
void check_packed_device(const at::Tensor& q, const char* op) {
  TORCH_CHECK_VALUE(q.is_cuda(), op, " CUDA kernel got tensors on ", q.device());
  const std::string reason = device_why_not(q.get_device());
  TORCH_CHECK(reason.empty(), op, ": ", reason);
}

std::tuple<at::Tensor, at::Tensor> varlen_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                   const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                                   const std::optional<at::Tensor>& seqused_k,
                                                   const std::optional<at::Tensor>& block_table, double scale,
                                                   int64_t window_left, int64_t window_right, double softcap,
                                                   const std::optional<at::Tensor>& sinks,
                                                   const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
                                                   const std::optional<at::Tensor>& rng_seed) {
  check_packed_device(q, "attnkern::varlen_fwd");
  const c10::cuda::CUDAGuard guard(q.device());
  return cuda_ops::varlen_forward_op(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, block_table, scale, window_left,
                                     window_right, {softcap, sinks, alibi_slopes, dropout_p, rng_seed},
                                     current_device(q), "attnkern::varlen_fwd");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_bwd_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, const std::optional<at::Tensor>& seqused_k, double scale, int64_t window_left,
    int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
    const std::optional<at::Tensor>& rng_seed) {
  check_packed_device(q, "attnkern::varlen_bwd");
  const c10::cuda::CUDAGuard guard(q.device());
  return cuda_ops::varlen_backward_op(grad_out, grad_lse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k,
                                      scale, window_left, window_right,
                                      {softcap, std::nullopt, alibi_slopes, dropout_p, rng_seed}, current_device(q),
                                      "attnkern::varlen_bwd");
}

}  // namespace
}  // namespace attnkern

TORCH_LIBRARY_IMPL(attnkern, CUDA, m) {
  m.impl("fwd", &attnkern::fwd_cuda);
  m.impl("bwd", &attnkern::bwd_cuda);
  m.impl("varlen_fwd", &attnkern::varlen_fwd_cuda);
  m.impl("varlen_bwd", &attnkern::varlen_bwd_cuda);
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
  m.def(
      "sm90_instances",
      [] {
        std::vector<std::pair<int, std::string>> out;
        for (const attnkern::cuda::Instance& inst : attnkern::cuda::compiled_sm90_instances())
          out.emplace_back(inst.head_dim, attnkern::dtype_name(inst.dtype));
        return out;
      },
      "(head-dim bucket, dtype) pairs of the Hopper wgmma forward in this build (empty without 9.0a); it runs on "
      "compute capability 9.0 when ATTNKERN_CUDA_WGMMA=1");
  m.def("why_not", &attnkern::cuda_ops::why_not, pybind11::arg("head_dim"), pybind11::arg("head_dim_v"),
        pybind11::arg("dtype"),
        "Why the CUDA kernels cannot serve these head dims and dtype ('float16'/'bfloat16'); '' if they can");
  m.def("device_why_not", &attnkern::device_why_not, pybind11::arg("device"),
        "Why the CUDA kernels cannot run on this device index; '' if they can (needs a GPU)");
  m.attr("max_head_dim") = attnkern::cuda_ops::kMaxHeadDim;
  m.attr("decode_max_len_q") = attnkern::cuda::kDecodeMaxLenQ;
}
