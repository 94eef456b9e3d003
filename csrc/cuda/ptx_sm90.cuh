// The Hopper (sm_90a) instructions of the wgmma forward as inline PTX: mbarriers, TMA tile
// loads, wgmma and setmaxnreg. emulator/ptx_sm90_emu.h provides the same functions for the CPU
// emulator (written separately, from its own reading of the PTX ISA).
#pragma once

#include <cstdint>

#include "ptx.cuh"

// Whether a Hopper kernel's body is compiled: only for sm_90a (and the emulator). The same
// source compiled for other archs keeps a body that traps; the host never launches it there.
#if !defined(ATTNKERN_CUDA_EMULATOR) && defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define ATTNKERN_SM90_BODY 0
#else
#define ATTNKERN_SM90_BODY 1
#endif

#if defined(ATTNKERN_CUDA_EMULATOR)
#include "emulator/ptx_sm90_emu.h"
namespace attnkern {
namespace cuda {
using TmaMap = emu::TmaMap;
}  // namespace cuda
}  // namespace attnkern
#else
#include <cuda.h>  // CUtensorMap (a type only: the driver is reached at run time, see tma_map.cpp)

#include <string>

namespace attnkern {
namespace cuda {

using TmaMap = CUtensorMap;

// Host: a tiled 4-D map over a 16-bit tensor with unit stride on dim 0 (dims innermost first,
// byte strides of dims 1..3), boxes of box0 x box1 x 1 x 1 elements, 128-byte swizzle, zeros
// out of bounds. "" on success, else the reason (tma_map.cpp).
std::string encode_tma_map(TmaMap* map, const void* base, const int64_t dims[4], const int64_t strides_bytes[3],
                           int box0, int box1);

// ---- mbarriers: a 64-bit object in shared memory, named by its shared address
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// arrive and raise the transaction count by `bytes` (the TMA copies then count them down)
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// until the phase of parity `parity` has completed
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}
// Named CTA barriers (bar.sync / bar.arrive): complete once `count` threads arrived; sync waits,
// arrive does not. Ids 1 .. 15 (0 is __syncthreads).
__device__ __forceinline__ void named_barrier_sync(int id, int count) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
__device__ __forceinline__ void named_barrier_arrive(int id, int count) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
// make barrier initialisation visible to the async proxy (TMA) before any copy names them
__device__ __forceinline__ void fence_barrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void fence_view_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// ---- TMA: one box of a 4-D tiled map into shared memory; completes `bytes` on `bar`
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const TmaMap& map, uint32_t bar, int32_t c0, int32_t c1,
                                            int32_t c2, int32_t c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(&map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
      : "memory");
}

// ---- wgmma: warpgroup-wide (128 threads) asynchronous matrix products
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}

// d (64 x N, fp32) (+)= A B for k = 16: m64nNk16, A and B^T K-major in shared memory (both by
// descriptor). D fragment of thread l of warp w of the warpgroup: d[4j + 2h + c] is
// D(16w + l/4 + 8h, 8j + 2(l%4) + c), the mma.sync m16n8 accumulator layout repeated along N.
template <int N, bool kBf16>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, bool accumulate);
// The same with A from registers (warp w holds rows 16w..16w+15 in the mma.sync m16n8k16 A
// fragment layout) and B MN-major in shared memory (imm-trans-b = 1: B is K x N, N contiguous).
template <int N, bool kBf16>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b, bool accumulate);

#include "wgmma_sm90.inc"  // the specialisations (generated by build_sources.py)

// ---- register reallocation between the producer and consumer warpgroups
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

}  // namespace cuda
}  // namespace attnkern
#endif

namespace attnkern {
namespace cuda {

// Keeps the compiler from moving reads or writes of wgmma accumulators across the asynchronous
// instructions that own them (they are registers, so the "memory" clobbers do not order them).
template <int N>
__device__ __forceinline__ void fence_operands(float (&d)[N]) {
#if !defined(ATTNKERN_CUDA_EMULATOR)
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
#endif
}

// A value the optimiser must treat as unknown here, so what derives from it is rebuilt where it
// is used instead of being hoisted out of the loop and held in registers (the wgmma descriptors
// of a tile loaded once: cheap to rebuild, and holding all of them made the consumers spill).
__device__ __forceinline__ uint32_t opaque(uint32_t x) {
#if !defined(ATTNKERN_CUDA_EMULATOR)
  asm volatile("" : "+r"(x));
#endif
  return x;
}

// wgmma shared-memory matrix descriptor for a 128-byte-swizzled 16-bit operand (PTX ISA, "Matrix
// Descriptor Format"): start address, leading- and stride-dimension byte offsets (all >> 4),
// base offset 0 (every swizzle atom here starts 1024-byte aligned), swizzle mode 1 = 128B.
//   K-major  (rows of 64 elements = 128 bytes along K): LBO unused (1), SBO = 1024, the stride
//            between groups of 8 rows; a k-step of 16 advances the start by 32 bytes in the row.
//   MN-major (rows of 64 elements along MN, one row per k): LBO = the stride between 64-element
//            column blocks along MN, SBO = 1024, the stride between groups of 8 k-rows.
__device__ __forceinline__ uint64_t gmma_desc_sw128(uint32_t smem_address, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  return static_cast<uint64_t>((smem_address & 0x3FFFF) >> 4) | (static_cast<uint64_t>((lbo_bytes >> 4) & 0x3FFF) << 16) |
         (static_cast<uint64_t>((sbo_bytes >> 4) & 0x3FFF) << 32) | (uint64_t{1} << 62);
}

}  // namespace cuda
}  // namespace attnkern
