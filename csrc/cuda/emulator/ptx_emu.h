// The instructions of ptx.cuh for the CPU emulator: cp.async, ldmatrix and mma.sync m16n8k16,
// carried out by runtime.h with the semantics of the PTX ISA, plus checks the hardware does not
// make (bounds, alignment, data in flight, shared-memory bank conflicts).
#pragma once

#include <cstdint>

#include "cuda_emu.h"

namespace attnkern {
namespace emu {

inline uint32_t shared_address(const void* p);
inline void cp_async(uint32_t dst, const void* src, bool valid);
inline void cp_async_commit();
inline void cp_async_wait(int pending);
inline void ldmatrix(uint32_t (&r)[4], uint32_t addr, bool trans);
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16);

}  // namespace emu

namespace cuda {

inline uint32_t smem_addr(const void* p) { return emu::shared_address(p); }
inline void cp_async_16(uint32_t dst, const void* src, bool valid) { emu::cp_async(dst, src, valid); }
inline void cp_async_commit() { emu::cp_async_commit(); }
template <int kPending>
inline void cp_async_wait() {
  emu::cp_async_wait(kPending);
}
inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) { emu::ldmatrix(r, addr, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) { emu::ldmatrix(r, addr, true); }
inline void mma_16816_f16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu::mma_16816(d, a, b0, b1, false);
}
inline void mma_16816_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu::mma_16816(d, a, b0, b1, true);
}

}  // namespace cuda
}  // namespace attnkern
