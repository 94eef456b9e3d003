// CPU attention kernels in portable C++ (any architecture): the fallback.
#include "../mask.h"
#include "../params.h"
#include "../philox.h"
#include "cpu_kernels.h"
#include "topk_kernels.h"
#include "gemm.h"
#include "scalar_convert.h"
#include "simd_generic.h"

namespace attnkern::cpu {
namespace isa_generic {
using Vec = VecGeneric;
constexpr const char* kIsaName = "generic";
#include "kernels_impl.inc"
#include "topk_impl.inc"
}  // namespace isa_generic

const KernelTable* generic_kernels() { return &isa_generic::kTable; }
const TopkKernelTable* generic_topk_kernels() { return &isa_generic::kTopkTable; }

}  // namespace attnkern::cpu
