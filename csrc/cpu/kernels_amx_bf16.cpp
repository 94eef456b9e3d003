// CPU attention kernels compiled for AVX512 with AMX (amx-tile, amx-bf16): the avx512
// variant, plus the forward and backward on bf16 inputs computing their block products
// (Q.K^T, P.V; in the backward also dO.V^T, P^T.dO, dS^T.Q, dS.K) as AMX tile matmuls on
// bf16 operands (gemm_amx.h), softmax and accumulators in fp32. The target pragma precedes
// every include, so all code in this file, and only this file, may use those instructions
// (the per-file equivalent of -mamx-tile -mamx-bf16); select_kernels() calls into it only
// on CPUs that have them and after the kernel granted this process the tile data state
// (amx_usable in select.cpp). Helpers shared with other files are always_inline, leaving no
// out-of-line copy the linker could pick for another file.
#if defined(__x86_64__) && defined(__GNUC__) && (__GNUC__ >= 11 || defined(__clang__))
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16,avx2,fma,f16c")
#include "avx512_intrinsics.h"
#define ATTNKERN_BUILD_AMX_BF16 1
#define ATTNKERN_AMX 1
#endif

#include "cpu_kernels.h"

#if defined(ATTNKERN_BUILD_AMX_BF16)
#include "../mask.h"
#include "../params.h"
#include "../philox.h"
#include "gemm.h"
#include "gemm_amx.h"
#include "scalar_convert.h"
#include "simd_avx512.h"

namespace attnkern::cpu {
namespace isa_amx_bf16 {
using Vec = VecAVX512;
constexpr const char* kIsaName = "amx_bf16";
#include "kernels_impl.inc"
}  // namespace isa_amx_bf16

const KernelTable* amx_bf16_kernels() { return &isa_amx_bf16::kTable; }

}  // namespace attnkern::cpu
#else
namespace attnkern::cpu {
const KernelTable* amx_bf16_kernels() { return nullptr; }
}  // namespace attnkern::cpu
#endif
