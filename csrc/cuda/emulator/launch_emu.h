// launch_kernel for the CPU emulator: runs every CTA of the grid, one after another.
#pragma once

#include <functional>

#include "runtime.h"

namespace attnkern {
namespace cuda {

template <class Kernel, class... Args>
cudaError_t launch_kernel(Kernel kernel, dim3 grid, int threads, int smem_bytes, cudaStream_t, const Args&... args) {
  const std::function<void()> body = [&] { kernel(args...); };
  emu::run_grid(grid, threads, smem_bytes, body);
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace attnkern
