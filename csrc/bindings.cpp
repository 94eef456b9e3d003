// The attnkern op library: schemas (TORCH_LIBRARY), the CPU implementations, and a small
// pybind11 module reporting build information. The CUDA implementations register into the
// same ops from the separate CUDA extension (cuda/bindings_cuda.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#if !defined(ATTNKERN_NO_PYTHON)
// pybind11 with torch's Tensor casters, not <torch/extension.h>: that one also brings the whole
// C++ frontend (torch/all.h), which this file never uses and which doubled its compile time
// (46 against 25 s of headers alone at -O3, g++ 12, torch 2.14.1)
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>
#endif

#include <limits>
#include <map>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cpu/cpu_kernels.h"
#include "cpu/parallel.h"
#include "cpu/tiling.h"
#include "torch_params.h"

#ifndef ATTNKERN_VERSION
#define ATTNKERN_VERSION "unknown"
#endif

namespace attnkern {
namespace {

// Fresh multi-megabyte outputs come straight from mmap and would be faulted in 4 KiB at a
// time by the kernels' first writes (about a fifth of the run time of a 32k-token local
// attention). Asking for transparent huge pages before the first touch, as torch does
// under THP_MEM_ALLOC_ENABLE, removes nearly all of those faults. A no-op for memory
// that is already mapped, and where THP is disabled.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const size_t bytes = t.numel() * t.element_size();
  if (bytes < 2 * kHuge) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(t.data_ptr()) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(t.data_ptr()) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

std::tuple<at::Tensor, at::Tensor> fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                           const std::optional<at::Tensor>& mask,
                                           const std::optional<at::Tensor>& rng_seed, double scale,
                                           int64_t window_left, int64_t window_right, bool bottom_right,
                                           double dropout_p, double softcap, const std::optional<at::Tensor>& sinks,
                                           const std::optional<at::Tensor>& alibi_slopes) {
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  AttnParams p;
  check_and_fill_inputs(p, q, k, v, mask, rng_seed, {scale, window_left, window_right, bottom_right, dropout_p});
  check_and_fill_modifiers(p, q, softcap, sinks, alibi_slopes);
  TORCH_CHECK_VALUE(q.device().is_cpu(), "attnkern::fwd CPU kernel got tensors on ", q.device());
  at::Tensor out = empty_rows_like(q_in, p.head_dim_v, q.scalar_type());
  at::Tensor lse = at::empty({p.batch, p.heads_q, p.len_q}, q.options().dtype(at::kFloat));
  advise_huge_pages(out);
  p.o = out.data_ptr();
  set_strides3(p.o_stride, out);
  p.lse = lse.data_ptr<float>();
  cpu::forward(p);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q_in,
    const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& rng_seed, double scale,
    int64_t window_left, int64_t window_right, bool bottom_right, double dropout_p, bool mask_needs_grad,
    double softcap, const std::optional<at::Tensor>& alibi_slopes) {
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const at::Tensor out = unit_last_stride(out_in), dout = unit_last_stride(grad_out);
  AttnParams p;
  check_and_fill_inputs(p, q, k, v, mask, rng_seed, {scale, window_left, window_right, bottom_right, dropout_p});
  check_and_fill_modifiers(p, q, softcap, std::nullopt, alibi_slopes);
  TORCH_CHECK_VALUE(q.device().is_cpu(), "attnkern::bwd CPU kernel got tensors on ", q.device());
  check_backward_tensors(p, q, dout, out, lse, grad_lse);
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor dlse;
  if (grad_lse.has_value() && grad_lse->defined()) dlse = grad_lse->to(at::kFloat).contiguous();

  at::Tensor dq = empty_rows_like(q_in, p.head_dim, q.scalar_type());
  at::Tensor dk = empty_rows_like(k_in, p.head_dim, q.scalar_type());
  at::Tensor dv = empty_rows_like(v_in, p.head_dim_v, q.scalar_type());
  at::Tensor dmask = mask_needs_grad ? at::zeros({p.batch, p.heads_q, p.len_q, p.len_k}, q.options().dtype(at::kFloat))
                                     : at::empty({0}, q.options().dtype(at::kFloat));
  TORCH_CHECK_VALUE(!mask_needs_grad || p.mask_kind == MaskKind::kFloat,
                    "mask_needs_grad requires a floating attn_mask");
  at::Tensor delta = at::empty({p.batch, p.heads_q, p.len_q}, q.options().dtype(at::kFloat));
  const int64_t parts = cpu::backward_dq_parts(p);
  at::Tensor dq_acc = at::empty({parts, p.batch, p.heads_q, p.len_q, p.head_dim}, q.options().dtype(at::kFloat));
  for (const at::Tensor* t : {&dq, &dk, &dv, &dq_acc}) advise_huge_pages(*t);
  dq_acc.zero_();

  p.o = const_cast<void*>(out.data_ptr());
  set_strides3(p.o_stride, out);
  p.lse = const_cast<float*>(lse_c.data_ptr<float>());
  p.dout = dout.data_ptr();
  set_strides3(p.dout_stride, dout);
  p.dlse = dlse.defined() ? dlse.data_ptr<float>() : nullptr;
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  set_strides3(p.dq_stride, dq);
  set_strides3(p.dk_stride, dk);
  set_strides3(p.dv_stride, dv);
  p.dmask = mask_needs_grad ? dmask.data_ptr<float>() : nullptr;
  p.delta = delta.data_ptr<float>();
  cpu::backward(p, dq_acc.data_ptr<float>(), parts);
  return {dq, dk, dv, dmask};
}

}  // namespace
}  // namespace attnkern

// One schema per op; the Triton backend defines attnkern::triton_fwd / triton_bwd with the
// same signature (attnkern/ops.py checks that they agree). The backward takes no sinks: the
// saved lse holds them, and their gradient is taken in attnkern/ops.py.
TORCH_LIBRARY(attnkern, m) {
  m.def(
      "fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? rng_seed, float scale, int window_left, "
      "int window_right, bool bottom_right, float dropout_p, float softcap=0., Tensor? sinks=None, "
      "Tensor? alibi_slopes=None) -> (Tensor out, Tensor lse)");
  m.def(
      "bwd(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? mask, "
      "Tensor? rng_seed, float scale, int window_left, int window_right, bool bottom_right, float dropout_p, "
      "bool mask_needs_grad, float softcap=0., Tensor? alibi_slopes=None) -> (Tensor grad_q, Tensor grad_k, "
      "Tensor grad_v, Tensor grad_mask)");
}

TORCH_LIBRARY_IMPL(attnkern, CPU, m) {
  m.impl("fwd", &attnkern::fwd_cpu);
  m.impl("bwd", &attnkern::bwd_cpu);
}

#if !defined(ATTNKERN_NO_PYTHON)
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "attnkern C++ extension: CPU kernels and op schemas";
  m.def("version", [] { return std::string(ATTNKERN_VERSION); });
  m.def("cpu_isa", [] { return std::string(attnkern::cpu::select_kernels().isa); },
        "SIMD instruction set the CPU kernels use on this machine");
  m.def("_set_cpu_isa", [](const std::string& name) { attnkern::cpu::set_kernels(name.c_str()); },
        "Switch the CPU kernel variant in this process (benchmarks; 'auto' restores the default); "
        "ATTNKERN_CPU_ISA sets it for a whole process");
  m.def("cpu_amx", [] {
    const std::string why = attnkern::cpu::amx_unusable_reason();
    return why.empty() ? std::string("usable") : "unusable: " + why;
  }, "Whether the amx_bf16 kernels (bf16 block products on AMX tiles) can run in this process, and if not, why");
  m.def("cpu_fp32_amx_terms", [] {
    return std::string(attnkern::cpu::select_kernels().isa) == "amx_bf16" ? attnkern::cpu::fp32_amx_terms() : 0;
  }, "bf16 cross products of the three-way split that make each fp32 forward block product on AMX tiles "
     "(head dims multiple of 32 (q/k) and 16 (v)); 0: fp32 products on FMAs (the default, "
     "ATTNKERN_CPU_FP32_AMX=0, or a kernel variant other than amx_bf16)");
  m.def("_set_cpu_fp32_amx_terms", [](int terms) { attnkern::cpu::set_fp32_amx_terms(terms); },
        "Set the fp32 split's term count in this process (0, 1, 3, 6, 9; -1: ATTNKERN_CPU_FP32_AMX's choice): "
        "benchmarks and accuracy tests. Set it between calls, not during one");
  m.def("_cpu_fp32_split_items", [] { return attnkern::cpu::fp32_split_items(); },
        "Forward items that ran their fp32 block products on the AMX split since the process started");
  m.def("cpu_parallel", [] {
#if defined(_OPENMP)
    return std::string("OpenMP ") + std::to_string(_OPENMP);
#elif AT_PARALLEL_OPENMP
    return std::string("none (built without OpenMP: single-threaded)");
#else
    return std::string("torch native thread pool");
#endif
  }, "How the CPU kernels fork work items over torch's threads (fixed at build time)");
  m.def("cpu_threads", [] { return at::get_num_threads(); }, "torch's intra-op thread count the kernels use now");
  m.def("cpu_work_plan",
        [](int64_t batch, int64_t heads_q, int64_t heads_kv, int64_t len_q, int64_t len_k, int64_t head_dim,
           int64_t window_left, int64_t window_right, int64_t threads, bool kv_heads_interleaved,
           const std::string& dtype) {
          TORCH_CHECK_VALUE(batch >= 0 && heads_q > 0 && heads_kv > 0 && heads_q % heads_kv == 0 && len_q >= 0 &&
                                len_k >= 0 && head_dim > 0 && threads > 0,
                            "cpu_work_plan: shapes must be non-negative, heads and head_dim positive, heads_q a "
                            "multiple of heads_kv, threads >= 1");
          TORCH_CHECK_VALUE(window_left >= -1 && window_right >= -1,
                            "cpu_work_plan: window_left/window_right must be >= -1, got (", window_left, ", ",
                            window_right, ")");
          TORCH_CHECK_VALUE(dtype == "float32" || dtype == "bfloat16" || dtype == "float16",
                            "cpu_work_plan: dtype must be 'float32', 'bfloat16' or 'float16', got '", dtype, "'");
          attnkern::AttnParams p;
          p.dtype = dtype == "float32"    ? attnkern::DType::kFloat32
                    : dtype == "bfloat16" ? attnkern::DType::kBFloat16
                                          : attnkern::DType::kFloat16;
          p.batch = batch, p.heads_q = heads_q, p.heads_kv = heads_kv, p.len_q = len_q, p.len_k = len_k;
          p.head_dim = p.head_dim_v = head_dim;
          p.window_left = attnkern::window_side(window_left, len_q + len_k);
          p.window_right = attnkern::window_side(window_right, len_q + len_k);
          // K/V strides of (B, H, S, D) tensors, or of (B, S, H, D) ones (the kv heads of a key side by side)
          for (int64_t* stride : {p.k_stride, p.v_stride}) {
            stride[0] = heads_kv * len_k * head_dim;
            stride[1] = kv_heads_interleaved ? head_dim : len_k * head_dim;
            stride[2] = kv_heads_interleaved ? heads_kv * head_dim : head_dim;
          }
          const auto plan = attnkern::cpu::forward_plan(p, threads, attnkern::cpu::select_kernels());
          const int64_t parts = attnkern::cpu::backward_dq_parts(p, threads);
          std::map<std::string, int64_t> out;
          out["forward_items"] = attnkern::cpu::forward_items(p, plan);
          out["forward_key_splits"] = plan.splits;
          out["forward_groups_per_item"] = plan.groups_per_item;
          out["backward_items"] = parts * batch * heads_kv;
          out["backward_key_parts"] = parts;
          out["backward_dq_accumulator_bytes"] = parts * batch * heads_q * len_q * head_dim * 4;
          return out;
        },
        "How the CPU kernels would split a problem (window -1: unbounded; causal is window_right 0) over "
        "`threads` threads, K/V of `dtype` laid out (B, H, S, D) or, kv_heads_interleaved, (B, S, H, D): work "
        "items per pass and the backward's dq accumulator bytes (the plan depends on the dtype through the "
        "row stride in bytes and the kernel variant this CPU runs for it)",
        pybind11::arg("batch"), pybind11::arg("heads_q"), pybind11::arg("heads_kv"), pybind11::arg("len_q"),
        pybind11::arg("len_k"), pybind11::arg("head_dim"), pybind11::arg("window_left"), pybind11::arg("window_right"),
        pybind11::arg("threads"), pybind11::arg("kv_heads_interleaved") = false,
        pybind11::arg("dtype") = "float32");
  m.def("forward_in_parallel_for",
        [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
          TORCH_CHECK_VALUE(q.dim() == 5 && k.dim() == 5 && v.dim() == 5 && q.size(0) == k.size(0) &&
                                q.size(0) == v.size(0),
                            "forward_in_parallel_for: q, k, v must be (N, B, H, L, E) with the same N");
          std::vector<at::Tensor> outs(q.size(0));
          at::parallel_for(0, q.size(0), 1, [&](int64_t begin, int64_t end) {
            for (int64_t i = begin; i < end; ++i)
              outs[i] = std::get<0>(attnkern::fwd_cpu(q[i], k[i], v[i], std::nullopt, std::nullopt, scale, -1, -1,
                                                      false, 0.0, 0.0, std::nullopt, std::nullopt));
          });
          return at::stack(outs);
        },
        "Test hook: the forward called from inside an outer at::parallel_for, once per leading index");
  m.def("set_thread_trace", [](bool on) { attnkern::cpu::ThreadTrace::get().on.store(on); },
        "Test hook: record how many distinct threads run the CPU kernels' work items");
  m.def("thread_trace", [] {
    auto& trace = attnkern::cpu::ThreadTrace::get();
    std::lock_guard<std::mutex> g(trace.lock);
    std::vector<std::pair<int64_t, int64_t>> out;
    for (const auto& pass : trace.passes) out.emplace_back(pass.items, pass.threads);
    return out;
  }, "(work items, distinct threads) of each parallel pass of the last traced CPU op");
}
#endif  // ATTNKERN_NO_PYTHON
