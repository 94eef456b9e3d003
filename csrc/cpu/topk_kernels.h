// Top-k attention on the CPU: the interface between the orchestration (topk.cpp: threads,
// scratch, torch tensors) and the ISA-specific kernels (topk_impl.inc, compiled inside each
// kernels_<isa>.cpp so it shares their SIMD helpers, GEMM and mask/band tile edits).
//
// Semantics (attnkern/_semantics.py, "Top-k selection"): among the keys query row i may see,
// keep the top_k highest scores, ties to the lower key index; out = softmax over the kept
// scores times their values. Indices are written in selection order (score descending, then
// key index ascending), -1 for empty slots.
#pragma once

#include <algorithm>  // std::nth_element, std::sort: used by topk_impl.inc
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>

#include "../params.h"

namespace attnkern::cpu {

// Largest top_k the CPU kernel serves: the per-row buffers (BQ rows x top_k scores and
// indices) must stay in L1/L2.
constexpr int64_t kTopkMax = 256;

struct TopkParams {
  AttnParams attn;   // shapes, q/k/v/mask, semantics; attn.o, attn.lse (forward outputs)
  int64_t top_k = 0;  // slots per row (min(top_k, S))
  int64_t* indices = nullptr;  // (B, Hq, L, top_k) contiguous int64
  float* dmask = nullptr;      // backward: (B, Hq, L, S) contiguous fp32 float-mask gradient, or none
};

struct TopkKernelTable {
  const char* isa;
  // Selection, softmax and V gather for query rows [row0, row0 + rows) of head (b, hq).
  void (*forward_item)(const TopkParams& p, int64_t b, int64_t hq, int64_t row0, int64_t rows, float* scratch);
  size_t (*forward_scratch_floats)(const TopkParams& p);
  // dq of every query row of the group of kv head (b, hkv), and dk/dv of that kv head, from
  // the stored indices (p.attn.dout, dq, dk, dv, lse set; contiguous outputs).
  void (*backward_item)(const TopkParams& p, int64_t b, int64_t hkv, float* scratch);
  size_t (*backward_scratch_floats)(const TopkParams& p);
};

// nullptr where not compiled for that ISA
const TopkKernelTable* avx512_topk_kernels();
const TopkKernelTable* avx2_topk_kernels();
const TopkKernelTable* generic_topk_kernels();

}  // namespace attnkern::cpu
