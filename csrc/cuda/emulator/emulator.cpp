// A CPU build of the CUDA backend: the kernels, launchers, dispatch and op glue of csrc/cuda,
// compiled as C++ with ATTNKERN_CUDA_EMULATOR and run by the fiber emulator (runtime.h) on CPU
// tensors. tests/test_cuda.py builds it with torch.utils.cpp_extension.load and holds it to
// the float64 reference; the GPU build is the same source.
//
// ATTNKERN_EMU_HDIMS (a compile-time list, default every bucket) trims the instantiations to
// shorten the build.
#include <ATen/ATen.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>  // not <torch/extension.h>: see csrc/bindings.cpp

#include <cstdint>
#include <limits>
#include <string>

#include "../dispatch.cu"
#include "../launch_bwd.cuh"
#include "../launch_fwd.cuh"
#include "../launch_bwd_sm90.cuh"
#include "../launch_fwd_sm90.cuh"
#include "../torch_ops.h"
#include "../varlen_ops.h"
#include "runtime.h"
#include "selftest_sm90.h"

namespace attnkern {
namespace cuda {

__attribute__((aligned(1024))) unsigned char smem_raw[emu::kSharedCapacity];  // like the shared window: 1024-aligned
int emulated_device_arch = 80;  // 90 sends eligible forwards to the wgmma kernel (with ATTNKERN_CUDA_WGMMA=1)

namespace {

template <int kD>
bool register_bucket() {
  register_forward(kD, DType::kFloat16, &run_fwd<kD, __half>);
  register_forward(kD, DType::kBFloat16, &run_fwd<kD, __nv_bfloat16>);
  register_backward(kD, DType::kFloat16, &run_bwd<kD, __half>);
  register_backward(kD, DType::kBFloat16, &run_bwd<kD, __nv_bfloat16>);
  return true;
}

#ifndef ATTNKERN_EMU_HDIMS
#define ATTNKERN_EMU_HDIMS 32, 64, 96, 128, 256
#endif
template <int... kDs>
bool register_buckets() {
  return (register_bucket<kDs>() && ...);
}
const bool registered = register_buckets<ATTNKERN_EMU_HDIMS>();

template <int kD>
bool register_sm90_bucket() {
  register_forward_sm90(kD, DType::kFloat16, &run_fwd_sm90<kD, __half>);
  register_forward_sm90(kD, DType::kBFloat16, &run_fwd_sm90<kD, __nv_bfloat16>);
  register_backward_sm90(kD, DType::kFloat16, &run_bwd_sm90<kD, __half>);
  register_backward_sm90(kD, DType::kBFloat16, &run_bwd_sm90<kD, __nv_bfloat16>);
  return true;
}
#ifndef ATTNKERN_EMU_SM90
#define ATTNKERN_EMU_SM90 1
#endif
const bool registered_sm90 = !ATTNKERN_EMU_SM90 || (register_sm90_bucket<64>() && register_sm90_bucket<128>());

}  // namespace
}  // namespace cuda

namespace {

// cp.async may read exactly the bytes of the launch's tensors, as their shapes and strides span
// them (rows rounded up to the 16-byte chunks the kernels read)
emu::Range span(const void* base, const int64_t* strides, std::initializer_list<int64_t> sizes, int64_t row_elems,
                int64_t elem_bytes) {
  int64_t last = 0, d = 0;
  for (int64_t n : sizes) last += (n - 1) * strides[d++];
  const char* b = static_cast<const char*>(base);
  return {b, b + (last + (row_elems + 7) / 8 * 8) * elem_bytes};
}

void allow_reads(const AttnParams& p) {
  std::vector<emu::Range>& r = emu::state().readable;
  r.clear();
  r.push_back(span(p.q, p.q_stride, {p.batch, p.heads_q, p.len_q}, p.head_dim, 2));
  r.push_back(span(p.k, p.k_stride, {p.batch, p.heads_kv, p.len_k}, p.head_dim, 2));
  r.push_back(span(p.v, p.v_stride, {p.batch, p.heads_kv, p.len_k}, p.head_dim_v, 2));
  if (p.dout != nullptr) r.push_back(span(p.dout, p.dout_stride, {p.batch, p.heads_q, p.len_q}, p.head_dim_v, 2));
}

// Fill what the kernels are about to write with NaN, so an element they skip cannot pass.
// (0xffff is NaN in fp16 and bf16, 0xffffffff in fp32)
template <typename Word>
void poison_rows(void* base, const int64_t* strides, int64_t n0, int64_t n1, int64_t rows, int64_t cols) {
  if (base == nullptr) return;
  for (int64_t a = 0; a < n0; ++a)
    for (int64_t h = 0; h < n1; ++h)
      for (int64_t r = 0; r < rows; ++r) {
        Word* row = static_cast<Word*>(base) + a * strides[0] + h * strides[1] + r * strides[2];
        for (int64_t c = 0; c < cols; ++c) row[c] = static_cast<Word>(~Word{0});
      }
}

void poison_outputs(const AttnParams& p) {
  const int64_t ev8 = (p.head_dim_v + 7) / 8 * 8, e8 = (p.head_dim + 7) / 8 * 8;
  const int64_t lse_stride[3] = {p.heads_q * p.len_q, p.len_q, 1};
  if (p.dout == nullptr) {  // forward: o and lse
    poison_rows<uint16_t>(p.o, p.o_stride, p.batch, p.heads_q, p.len_q, ev8);
    poison_rows<uint32_t>(p.lse, lse_stride, p.batch, p.heads_q, p.len_q, 1);
  } else {  // backward: the gradients and the delta workspace
    poison_rows<uint16_t>(p.dq, p.dq_stride, p.batch, p.heads_q, p.len_q, e8);
    poison_rows<uint16_t>(p.dk, p.dk_stride, p.batch, p.heads_kv, p.len_k, e8);
    poison_rows<uint16_t>(p.dv, p.dv_stride, p.batch, p.heads_kv, p.len_k, ev8);
    poison_rows<uint32_t>(p.delta, lse_stride, p.batch, p.heads_q, p.len_q, 1);
  }
}

// Packed calls (p.cu_seqlens_q set): the rows of each sequence, the keys it reads (pages too),
// and NaN over exactly what the kernels must write (the op writes the rest: the backward's rows
// of no sequence and keys past seqused_k are zeros before the launch and must stay so; the
// forward's rows of no sequence are written after it, as the split merge writes every row)
struct PackedSeq {
  int64_t q0, len_q, k0, len_k;
};
std::vector<PackedSeq> packed_seqs(const AttnParams& p) {
  std::vector<PackedSeq> seqs;
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t k0 = p.cu_seqlens_k[b];
    const int64_t len_k = p.seqused_k != nullptr ? p.seqused_k[b] : p.cu_seqlens_k[b + 1] - k0;
    seqs.push_back({p.cu_seqlens_q[b], p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b], k0, len_k});
  }
  return seqs;
}

void allow_packed_reads(const AttnParams& p) {
  std::vector<emu::Range>& r = emu::state().readable;
  r.clear();
  const int64_t rows_q = p.cu_seqlens_q[p.batch];
  if (rows_q > 0) {
    r.push_back(span(p.q, p.q_stride, {1, p.heads_q, rows_q}, p.head_dim, 2));
    if (p.dout != nullptr) r.push_back(span(p.dout, p.dout_stride, {1, p.heads_q, rows_q}, p.head_dim_v, 2));
  }
  const std::vector<PackedSeq> seqs = packed_seqs(p);
  // key rows [row0, row0 + rows) of a pack, or of page `page`
  auto allow_keys = [&](int64_t page, int64_t row0, int64_t rows) {
    const int64_t ks[3] = {0, p.k_stride[1], p.k_stride[2]}, vs[3] = {0, p.v_stride[1], p.v_stride[2]};
    const uint16_t* k = static_cast<const uint16_t*>(p.k) + page * p.k_stride[0] + row0 * p.k_stride[2];
    const uint16_t* v = static_cast<const uint16_t*>(p.v) + page * p.v_stride[0] + row0 * p.v_stride[2];
    r.push_back(span(k, ks, {1, p.heads_kv, rows}, p.head_dim, 2));
    r.push_back(span(v, vs, {1, p.heads_kv, rows}, p.head_dim_v, 2));
  };
  for (int64_t b = 0; b < p.batch; ++b) {
    if (p.block_table == nullptr) {
      if (seqs[b].len_k > 0) allow_keys(0, seqs[b].k0, seqs[b].len_k);
      continue;
    }
    // every page the sequence's keys occupy, whole (its rows past len_k lie inside the page)
    for (int64_t j = 0; j < (seqs[b].len_k + p.page_size - 1) / p.page_size; ++j)
      allow_keys(p.block_table[b * p.block_table_stride + j], 0, p.page_size);
  }
}

void poison_packed_outputs(const AttnParams& p) {
  const int64_t ev8 = (p.head_dim_v + 7) / 8 * 8, e8 = (p.head_dim + 7) / 8 * 8;
  const int64_t lse_stride[3] = {0, p.total_q, 1};
  auto rows_of = [](void* base, const int64_t* strides, int64_t row0) -> void* {
    return base == nullptr ? nullptr : static_cast<uint16_t*>(base) + row0 * strides[2];
  };
  for (const PackedSeq& s : packed_seqs(p)) {
    if (p.dout == nullptr) {
      poison_rows<uint16_t>(rows_of(p.o, p.o_stride, s.q0), p.o_stride, 1, p.heads_q, s.len_q, ev8);
      poison_rows<uint32_t>(p.lse + s.q0, lse_stride, 1, p.heads_q, s.len_q, 1);
    } else {
      poison_rows<uint16_t>(rows_of(p.dq, p.dq_stride, s.q0), p.dq_stride, 1, p.heads_q, s.len_q, e8);
      poison_rows<uint16_t>(rows_of(p.dk, p.dk_stride, s.k0), p.dk_stride, 1, p.heads_kv, s.len_k, e8);
      poison_rows<uint16_t>(rows_of(p.dv, p.dv_stride, s.k0), p.dv_stride, 1, p.heads_kv, s.len_k, ev8);
    }
  }
  if (p.dout != nullptr) poison_rows<uint32_t>(p.delta, lse_stride, 1, p.heads_q, p.total_q, 1);
}

void before_launch(const AttnParams& p) {
  if (p.cu_seqlens_q != nullptr) {
    allow_packed_reads(p);
    poison_packed_outputs(p);
    return;
  }
  allow_reads(p);
  poison_outputs(p);
}

void check_launch(cudaError_t err, const char* op) { TORCH_CHECK(err == cudaSuccess, op, ": launch error ", err); }

void set_options(bool late_copies, int order, uint64_t seed) {
  emu::state().options = {late_copies, order, seed};
  emu::state().stats = {};
}

pybind11::dict stats() {
  const emu::Stats& s = emu::state().stats;
  pybind11::dict d;
  d["ctas"] = s.ctas;
  d["barriers"] = s.barriers;
  d["cp_async"] = s.cp_async;
  d["ldmatrix"] = s.ldmatrix;
  d["ldmatrix_conflicts"] = s.ldmatrix_conflicts;
  d["mma"] = s.mma;
  d["shuffles"] = s.shuffles;
  d["wgmma"] = s.wgmma;
  d["tma"] = s.tma;
  return d;
}

std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& rng_seed,
                                       double scale, int64_t window_left, int64_t window_right, bool bottom_right,
                                       double dropout_p, int sm_count, double softcap,
                                       const std::optional<at::Tensor>& sinks,
                                       const std::optional<at::Tensor>& alibi_slopes) {
  AttnParams p;
  check_and_fill_inputs(p, q, k, v, mask, rng_seed, {scale, window_left, window_right, bottom_right, dropout_p});
  check_and_fill_modifiers(p, q, softcap, sinks, alibi_slopes);
  cuda_ops::check_kernel_limits(p, q, "emulated attnkern::fwd");
  return cuda_ops::forward_op(p, q, k, v, {sm_count, nullptr, &check_launch, &before_launch});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& rng_seed, double scale, int64_t window_left, int64_t window_right,
    bool bottom_right, double dropout_p, bool mask_needs_grad, double softcap,
    const std::optional<at::Tensor>& alibi_slopes) {
  AttnParams p;
  check_and_fill_inputs(p, q, k, v, mask, rng_seed, {scale, window_left, window_right, bottom_right, dropout_p});
  check_and_fill_modifiers(p, q, softcap, std::nullopt, alibi_slopes);
  check_backward_tensors(p, q, grad_out, out, lse, grad_lse);
  cuda_ops::check_kernel_limits(p, q, "emulated attnkern::bwd");
  return cuda_ops::backward_op(p, grad_out, grad_lse, q, k, v, out, lse, mask_needs_grad,
                               {1, nullptr, &check_launch, &before_launch});
}

std::tuple<at::Tensor, at::Tensor> varlen_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                              const std::optional<at::Tensor>& seqused_k,
                                              const std::optional<at::Tensor>& block_table, double scale,
                                              int64_t window_left, int64_t window_right, int sm_count,
                                              double dropout_p, const std::optional<at::Tensor>& rng_seed,
                                              double softcap, const std::optional<at::Tensor>& sinks,
                                              const std::optional<at::Tensor>& alibi_slopes) {
  return cuda_ops::varlen_forward_op(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, block_table, scale, window_left,
                                     window_right, {softcap, sinks, alibi_slopes, dropout_p, rng_seed},
                                     {sm_count, nullptr, &check_launch, &before_launch},
                                     "emulated attnkern::varlen_fwd");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_bwd(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, const std::optional<at::Tensor>& seqused_k, double scale, int64_t window_left,
    int64_t window_right, double dropout_p, const std::optional<at::Tensor>& rng_seed, double softcap,
    const std::optional<at::Tensor>& alibi_slopes) {
  return cuda_ops::varlen_backward_op(grad_out, grad_lse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k,
                                      scale, window_left, window_right,
                                      {softcap, std::nullopt, alibi_slopes, dropout_p, rng_seed},
                                      {1, nullptr, &check_launch, &before_launch}, "emulated attnkern::varlen_bwd");
}

}  // namespace
}  // namespace attnkern

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "The CUDA backend's kernels run on CPU tensors by a fiber emulator (tests only)";
  namespace py = pybind11;
  m.def("fwd", &attnkern::fwd, "attnkern::fwd through the emulated CUDA kernels; sm_count sets the split-KV count",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("mask"), py::arg("rng_seed"), py::arg("scale"),
        py::arg("window_left"), py::arg("window_right"), py::arg("bottom_right"), py::arg("dropout_p"),
        py::arg("sm_count"), py::arg("softcap") = 0.0, py::arg("sinks") = py::none(),
        py::arg("alibi_slopes") = py::none());
  m.def("bwd", &attnkern::bwd, "attnkern::bwd through the emulated CUDA kernels (the sinks' gradient: ops.sink_grad)",
        py::arg("grad_out"), py::arg("grad_lse"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("lse"), py::arg("mask"), py::arg("rng_seed"), py::arg("scale"), py::arg("window_left"),
        py::arg("window_right"), py::arg("bottom_right"), py::arg("dropout_p"), py::arg("mask_needs_grad"),
        py::arg("softcap") = 0.0, py::arg("alibi_slopes") = py::none());
  m.def("varlen_fwd", &attnkern::varlen_fwd, "attnkern::varlen_fwd through the emulated kernels' varlen variants",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"),
        py::arg("seqused_k"), py::arg("block_table"), py::arg("scale"), py::arg("window_left"),
        py::arg("window_right"), py::arg("sm_count"), py::arg("dropout_p") = 0.0, py::arg("rng_seed") = py::none(),
        py::arg("softcap") = 0.0, py::arg("sinks") = py::none(), py::arg("alibi_slopes") = py::none());
  m.def("varlen_bwd", &attnkern::varlen_bwd, "attnkern::varlen_bwd through the emulated kernels' varlen variants",
        py::arg("grad_out"), py::arg("grad_lse"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("lse"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("seqused_k"), py::arg("scale"),
        py::arg("window_left"), py::arg("window_right"), py::arg("dropout_p") = 0.0, py::arg("rng_seed") = py::none(),
        py::arg("softcap") = 0.0, py::arg("alibi_slopes") = py::none());
  m.def("set_options", &attnkern::set_options, pybind11::arg("late_copies"), pybind11::arg("order"),
        pybind11::arg("seed"), "cp.async timing, thread order (0 up, 1 down, 2 shuffled); resets the stats");
  m.def("stats", &attnkern::stats, "counters since set_options: CTAs, barriers, instructions, ldmatrix bank conflicts");
  m.def("why_not", &attnkern::cuda_ops::why_not);
  m.def(
      "set_device_arch", [](int arch) { attnkern::cuda::emulated_device_arch = arch; },
      "compute capability the emulator reports (90: Hopper, so the wgmma forward may run)");
  m.def("sm90_instances", [] {
    std::vector<int> dims;
    for (const auto& inst : attnkern::cuda::compiled_sm90_instances()) dims.push_back(inst.head_dim);
    return dims;
  });
  m.def("selftest_sm90", &attnkern::sm90_selftest::selftest, pybind11::arg("seed"), pybind11::arg("late_copies") = true,
        pybind11::arg("fault") = "", "the emulated sm90 instructions on random tiles (tests/test_cuda_emu_sm90.py)");
  m.def("decode_num_splits", [](int64_t len_q, int64_t heads_q, int64_t heads_kv, int64_t len_k, int64_t head_dim,
                                int64_t batch, int sm_count) {
    attnkern::AttnParams p;
    p.batch = batch;
    p.len_q = len_q;
    p.heads_q = heads_q;
    p.heads_kv = heads_kv;
    p.len_k = len_k;
    p.head_dim = p.head_dim_v = head_dim;
    p.dtype = attnkern::DType::kBFloat16;
    return attnkern::cuda::decode_num_splits(p, sm_count);
  });
}
