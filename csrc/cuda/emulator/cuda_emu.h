// The CUDA language as the kernels use it, for compiling them as plain C++ under
// ATTNKERN_CUDA_EMULATOR: keywords, dim3, thread/block indices, the few intrinsics, the half
// types. Every CUDA thread of a CTA runs as a fiber (runtime.h), so __syncthreads and the
// warp-wide instructions (shuffles, ldmatrix, mma) can rendezvous like the hardware's.
//
// It exists to test the kernels' index math, fragment layouts, swizzle, pipelining and
// masking against the float64 reference on a machine without a GPU. It says nothing about
// speed, and it shares the kernels' reading of the PTX spec for ldmatrix/mma fragment layouts
// (written down once more, independently, in runtime.h).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __shared__
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = void*;
using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
constexpr cudaError_t cudaErrorNotSupported = 801;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
struct cudaFuncAttributes {
  int maxThreadsPerBlock;
};
template <class F>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, F) {
  attr->maxThreadsPerBlock = 1024;
  return cudaSuccess;
}

struct float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }

// 16-bit storage types; arithmetic goes through float as in the kernels
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
struct __half2 {
  __half x, y;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
inline __half __float2half_rn(float f) { return {c10::Half(f).x}; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {c10::BFloat16(f).x}; }
inline float __half2float(__half h) { return static_cast<float>(c10::Half(h.bits, c10::Half::from_bits())); }
inline float __bfloat162float(__nv_bfloat16 h) {
  return static_cast<float>(c10::BFloat16(h.bits, c10::BFloat16::from_bits()));
}
inline __half2 __floats2half2_rn(float lo, float hi) { return {__float2half_rn(lo), __float2half_rn(hi)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
inline float __expf(float x) { return std::exp(x); }

namespace attnkern {
namespace emu {

struct Index {
  unsigned x, y, z;
};
inline const Index& thread_index();
inline const Index& block_index();
inline const Index& grid_dim();
[[noreturn]] inline void trap();
inline void syncthreads();
inline float shfl_xor(float v, int lane_mask);

}  // namespace emu

namespace cuda {
using std::max;
using std::min;
}  // namespace cuda
}  // namespace attnkern

#define threadIdx (::attnkern::emu::thread_index())
#define blockIdx (::attnkern::emu::block_index())
#define gridDim (::attnkern::emu::grid_dim())
inline void __trap() { ::attnkern::emu::trap(); }
inline void __syncthreads() { ::attnkern::emu::syncthreads(); }
inline float __shfl_xor_sync(unsigned, float v, int lane_mask) { return ::attnkern::emu::shfl_xor(v, lane_mask); }
