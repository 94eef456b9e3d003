// One kernel launch: the dynamic shared memory opt-in above 48 KB, the launch on `stream`, and
// its error. Under ATTNKERN_CUDA_EMULATOR (emulator/) the same call runs the kernel on the CPU.
#pragma once

#include "launch.h"

#if defined(ATTNKERN_CUDA_EMULATOR)
#include "emulator/launch_emu.h"
#else
namespace attnkern {
namespace cuda {

template <class Kernel, class... Args>
cudaError_t launch_kernel(Kernel kernel, dim3 grid, int threads, int smem_bytes, cudaStream_t stream,
                          const Args&... args) {
  if (smem_bytes > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid, threads, smem_bytes, stream>>>(args...);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace attnkern
#endif
