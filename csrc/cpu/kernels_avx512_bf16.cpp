// CPU attention kernels compiled for AVX512 with AVX512_BF16: the avx512 variant, plus the
// forward on bf16 inputs computing Q.K^T and P.V with vdpbf16ps (gemm_dpbf16.h; softmax and
// accumulators stay fp32). The target pragma precedes every include, so all code in this file, and only this file, may use those instructions; select_kernels()
// calls into it only on CPUs that have them. Helpers shared with other files are
// always_inline, leaving no out-of-line copy the linker could pick for another file.
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")
#include "avx512_intrinsics.h"
#define ATTNKERN_BUILD_AVX512_BF16 1
#define ATTNKERN_DPBF16 1
#endif

#include "cpu_kernels.h"

#if defined(ATTNKERN_BUILD_AVX512_BF16)
#include "../mask.h"
#include "../params.h"
#include "../philox.h"
#include "gemm.h"
#include "gemm_dpbf16.h"
#include "scalar_convert.h"
#include "simd_avx512.h"

namespace attnkern::cpu {
namespace isa_avx512_bf16 {
using Vec = VecAVX512;
constexpr const char* kIsaName = "avx512_bf16";
#include "kernels_impl.inc"
}  // namespace isa_avx512_bf16

const KernelTable* avx512_bf16_kernels() { return &isa_avx512_bf16::kTable; }

}  // namespace attnkern::cpu
#else
namespace attnkern::cpu {
const KernelTable* avx512_bf16_kernels() { return nullptr; }
}  // namespace attnkern::cpu
#endif
