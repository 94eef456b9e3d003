// Picks the CPU kernel table for this machine.
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "cpu_kernels.h"

namespace attnkern::cpu {

static bool cpu_supports_avx512() {
#if defined(__x86_64__) && defined(__GNUC__)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

static bool cpu_supports_avx512_bf16() {
#if defined(__x86_64__) && defined(__GNUC__)
  return cpu_supports_avx512() && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

static bool cpu_supports_avx2() {
#if defined(__x86_64__) && defined(__GNUC__)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

static const KernelTable* pick() {
  const KernelTable* avx512_bf16 = cpu_supports_avx512_bf16() ? avx512_bf16_kernels() : nullptr;
  const KernelTable* avx512 = cpu_supports_avx512() ? avx512_kernels() : nullptr;
  const KernelTable* avx2 = cpu_supports_avx2() ? avx2_kernels() : nullptr;
  if (const char* want = std::getenv("ATTNKERN_CPU_ISA")) {
    if (!std::strcmp(want, "generic")) return generic_kernels();
    if (!std::strcmp(want, "avx2") && avx2) return avx2;
    if (!std::strcmp(want, "avx512") && avx512) return avx512;
    if (!std::strcmp(want, "avx512_bf16") && avx512_bf16) return avx512_bf16;
    if (std::strcmp(want, "") && std::strcmp(want, "auto"))
      throw std::runtime_error(std::string("ATTNKERN_CPU_ISA=") + want +
                               " is not available on this CPU/build (use generic, avx2, avx512, avx512_bf16 or auto)");
  }
  // avx512_bf16 is opt-in: on the Intel Xeon (AMX-era) where it was measured, vdpbf16ps has no
  // more multiply throughput than fp32 FMA and the variant's bf16 forward ran at 0.55x the
  // conversion path (README, "CPU threads and bf16"). CPUs where vdpbf16ps is twice the fp32
  // FMA rate (AMD Zen 4/5) should pick it, once measured there.
  (void)avx512_bf16;
  if (avx512) return avx512;
  if (avx2) return avx2;
  return generic_kernels();
}

const KernelTable& select_kernels() {
  static const KernelTable* table = pick();
  return *table;
}

}  // namespace attnkern::cpu
