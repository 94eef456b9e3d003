// CPU attention kernels compiled for AVX2. The target pragma precedes every include, so all
// code in this file, and only this file, may use those instructions; select_kernels()
// calls into it only on CPUs that have them. Helpers shared with other files are
// always_inline, leaving no out-of-line copy the linker could pick for another file.
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx2,fma,f16c")
#define ATTNKERN_BUILD_AVX2 1
#endif

#include "cpu_kernels.h"
#include "topk_kernels.h"

#if defined(ATTNKERN_BUILD_AVX2)
#include "../mask.h"
#include "../params.h"
#include "../philox.h"
#include "gemm.h"
#include "scalar_convert.h"
#include "simd_avx2.h"

namespace attnkern::cpu {
namespace isa_avx2 {
using Vec = VecAVX2;
constexpr const char* kIsaName = "avx2";
#include "kernels_impl.inc"
#include "topk_impl.inc"
}  // namespace isa_avx2

const KernelTable* avx2_kernels() { return &isa_avx2::kTable; }
const TopkKernelTable* avx2_topk_kernels() { return &isa_avx2::kTopkTable; }

}  // namespace attnkern::cpu
#else
namespace attnkern::cpu {
const KernelTable* avx2_kernels() { return nullptr; }
const TopkKernelTable* avx2_topk_kernels() { return nullptr; }
}  // namespace attnkern::cpu
#endif
