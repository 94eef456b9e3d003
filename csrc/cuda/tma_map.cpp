// Host side of TMA: encoding a tensor map. The driver function is reached through the runtime's
// entry-point query, so the extension needs no link against libcuda (absent on build machines).
#include <cuda.h>
#include <cuda_runtime_api.h>
#include <cudaTypedefs.h>

#include <string>

namespace attnkern {
namespace cuda {

namespace {
PFN_cuTensorMapEncodeTiled_v12000 encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess)
      f = nullptr;
    cudaGetLastError();
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}
}  // namespace

std::string encode_tma_map(CUtensorMap* map, const void* base, const int64_t dims[4], const int64_t strides_bytes[3],
                           int box0, int box1) {
  const PFN_cuTensorMapEncodeTiled_v12000 fn = encoder();
  if (fn == nullptr) return "the driver has no cuTensorMapEncodeTiled";
  if (reinterpret_cast<uintptr_t>(base) % 16 != 0) return "base address not 16-byte aligned";
  cuuint64_t size[4], stride[3];
  for (int d = 0; d < 4; ++d) size[d] = static_cast<cuuint64_t>(dims[d]);
  for (int d = 0; d < 3; ++d) {
    if (strides_bytes[d] <= 0 || strides_bytes[d] % 16 != 0) return "a stride is not a positive multiple of 16 bytes";
    stride[d] = static_cast<cuuint64_t>(strides_bytes[d]);
  }
  const cuuint32_t box[4] = {static_cast<cuuint32_t>(box0), static_cast<cuuint32_t>(box1), 1, 1};
  const cuuint32_t elem_stride[4] = {1, 1, 1, 1};
  const CUresult r = fn(map, CU_TENSOR_MAP_DATA_TYPE_UINT16, 4, const_cast<void*>(base), size, stride, box, elem_stride,
                        CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                        CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);  // out-of-bounds elements read as zeros
  return r == CUDA_SUCCESS ? std::string() : "cuTensorMapEncodeTiled failed with CUresult " + std::to_string(r);
}

}  // namespace cuda
}  // namespace attnkern
