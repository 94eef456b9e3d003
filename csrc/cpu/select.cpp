// Picks the CPU kernel table for this machine.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "cpu_kernels.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#endif
#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#endif

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

// AMX-TILE and AMX-BF16 (CPUID leaf 7: EDX bits 24 and 22), read directly: not every
// compiler's __builtin_cpu_supports knows their names
static bool cpu_has_amx_bf16() {
#if defined(__x86_64__) && defined(__GNUC__)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  return (d >> 24 & 1u) && (d >> 22 & 1u);
#else
  return false;
#endif
}

// Whether this process may use the AMX tiles, and if not, why (one line). Linux (>= 5.16)
// hands the tile data state (XTILEDATA, 8 KiB per thread) only to processes that ask with
// arch_prctl(ARCH_REQ_XCOMP_PERM); a tile instruction without it dies with SIGILL. The
// permission is process-wide, so it is asked once (a function-local static: thread-safe),
// after checking whether it was already granted (oneDNN, in torch, asks the same way).
struct AmxStatus {
  bool usable;
  std::string reason;
};
static AmxStatus query_amx() {
  if (!cpu_supports_avx512_bf16() || !cpu_has_amx_bf16()) return {false, "this CPU has no AMX-BF16"};
#if defined(__linux__) && defined(__x86_64__)
  constexpr long kGetPerm = 0x1022, kReqPerm = 0x1023;  // ARCH_GET_XCOMP_PERM, ARCH_REQ_XCOMP_PERM
  constexpr unsigned long kXtileData = 18;              // XFEATURE_XTILEDATA
  unsigned long granted = 0;
  if (syscall(SYS_arch_prctl, kGetPerm, &granted) == 0 && (granted >> kXtileData & 1ul)) return {true, ""};
  if (syscall(SYS_arch_prctl, kReqPerm, kXtileData) != 0)
    return {false, std::string("the kernel refused AMX tile data (arch_prctl ARCH_REQ_XCOMP_PERM: ") +
                       std::strerror(errno) + ")"};
  if (syscall(SYS_arch_prctl, kGetPerm, &granted) != 0 || !(granted >> kXtileData & 1ul))
    return {false, "the kernel did not grant AMX tile data (arch_prctl ARCH_GET_XCOMP_PERM)"};
  return {true, ""};
#else
  return {false, "AMX needs Linux's arch_prctl permission, which this build does not ask for"};
#endif
}

static const AmxStatus& amx_status() {
  static const AmxStatus status = query_amx();
  return status;
}

const char* amx_unusable_reason() {
  if (!amx_bf16_kernels()) return "this build has no amx_bf16 kernels (compiler without AMX support)";
  return amx_status().usable ? "" : amx_status().reason.c_str();
}

static bool cpu_supports_avx2() {
#if defined(__x86_64__) && defined(__GNUC__)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

// The table called `name` if this CPU (and, for amx_bf16, the kernel) can run it; nullptr if
// not; an exception naming the choices for an unknown name.
static const KernelTable* table_named(const std::string& name) {
  if (name == "generic") return generic_kernels();
  if (name == "avx2") return cpu_supports_avx2() ? avx2_kernels() : nullptr;
  if (name == "avx512") return cpu_supports_avx512() ? avx512_kernels() : nullptr;
  if (name == "avx512_bf16") return cpu_supports_avx512_bf16() ? avx512_bf16_kernels() : nullptr;
  if (name == "amx_bf16") return !*amx_unusable_reason() ? amx_bf16_kernels() : nullptr;
  throw std::runtime_error("ATTNKERN_CPU_ISA=" + name +
                           " is not a CPU kernel variant (use generic, avx2, avx512, avx512_bf16, amx_bf16 or auto)");
}

static const KernelTable* table_or_throw(const std::string& name) {
  if (const KernelTable* t = table_named(name)) return t;
  throw std::runtime_error("ATTNKERN_CPU_ISA=" + name + " is not available on this CPU/build" +
                           (name == "amx_bf16" ? std::string(": ") + amx_unusable_reason() : std::string()));
}

static const KernelTable* pick() {
  fp32_amx_terms();  // reads ATTNKERN_CPU_FP32_AMX: a bad value fails here, before any kernel runs
  const char* want = std::getenv("ATTNKERN_CPU_ISA");
  if (want && std::strcmp(want, "") && std::strcmp(want, "auto")) return table_or_throw(want);
  // amx_bf16 is the avx512 variant but for bf16 inputs, whose block products run on AMX tiles:
  // measured faster there (benchmarks/bench_cpu_bf16_isa.py), so it is the default where usable.
  // avx512_bf16 is opt-in: on the Intel Xeon (AMX-era) where it was measured, vdpbf16ps does
  // its multiply-adds at half the fp32 FMA rate (benchmarks/bench_cpu_dot_rate.py) and the
  // variant's bf16 forward ran at 0.64-0.70x the conversion path (README, "CPU threads and
  // bf16"). CPUs where vdpbf16ps is twice the fp32 FMA rate (AMD Zen 4/5) should pick it, once
  // measured there.
  for (const char* name : {"amx_bf16", "avx512", "avx2"})
    if (const KernelTable* t = table_named(name)) return t;
  return generic_kernels();
}

// Set by set_kernels (benchmarks comparing variants in one process); null: pick()'s choice
static std::atomic<const KernelTable*> chosen{nullptr};

const KernelTable& select_kernels() {
  static const KernelTable* picked = pick();
  const KernelTable* t = chosen.load(std::memory_order_acquire);
  return t ? *t : *picked;
}

void set_kernels(const char* name) {
  const bool reset = !name || !*name || !std::strcmp(name, "auto");
  chosen.store(reset ? nullptr : table_or_throw(name), std::memory_order_release);
}

static int terms_from_env() {
  const char* env = std::getenv("ATTNKERN_CPU_FP32_AMX");
  if (!env || !*env) return 0;
  const std::string v = env;
  if (v == "0" || v == "6" || v == "9") return std::stoi(v);
  throw std::runtime_error("ATTNKERN_CPU_FP32_AMX=" + v +
                           " is not a choice (0: fp32 products on AVX-512 FMAs, 6 or 9: split terms on AMX)");
}

// -1: the environment's choice
static std::atomic<int> fp32_terms_override{-1};
static std::atomic<int64_t> fp32_split_item_count{0};

int fp32_amx_terms() {
  const int t = fp32_terms_override.load(std::memory_order_relaxed);
  if (t >= 0) return t;
  static const int from_env = terms_from_env();
  return from_env;
}

void set_fp32_amx_terms(int terms) {
  if (terms != -1 && terms != 0 && terms != 1 && terms != 3 && terms != 6 && terms != 9)
    throw std::runtime_error("fp32 AMX split terms must be 0, 1, 3, 6 or 9 (-1: ATTNKERN_CPU_FP32_AMX's choice), got " +
                             std::to_string(terms));
  fp32_terms_override.store(terms, std::memory_order_relaxed);
}

void note_fp32_split_item() { fp32_split_item_count.fetch_add(1, std::memory_order_relaxed); }
int64_t fp32_split_items() { return fp32_split_item_count.load(std::memory_order_relaxed); }

}  // namespace attnkern::cpu
