// CPU attention kernels compiled for AVX512. The target pragma precedes every include, so all
// code in this file, and only this file, may use those instructions; select_kernels()
// calls into it only on CPUs that have them. Helpers shared with other files are
// always_inline, leaving no out-of-line copy the linker could pick for another file.
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#include "avx512_intrinsics.h"
#define ATTNKERN_BUILD_AVX512 1
#endif

#include "cpu_kernels.h"
#include "topk_kernels.h"

#if defined(ATTNKERN_BUILD_AVX512)
#include "../mask.h"
#include "../params.h"
#include "../philox.h"
#include "gemm.h"
#include "scalar_convert.h"
#include "simd_avx512.h"

namespace attnkern::cpu {
namespace isa_avx512 {
using Vec = VecAVX512;
constexpr const char* kIsaName = "avx512";
#include "kernels_impl.inc"
#include "topk_impl.inc"
}  // namespace isa_avx512

const KernelTable* avx512_kernels() { return &isa_avx512::kTable; }
const TopkKernelTable* avx512_topk_kernels() { return &isa_avx512::kTopkTable; }

}  // namespace attnkern::cpu
#else
namespace attnkern::cpu {
const KernelTable* avx512_kernels() { return nullptr; }
const TopkKernelTable* avx512_topk_kernels() { return nullptr; }
}  // namespace attnkern::cpu
#endif
