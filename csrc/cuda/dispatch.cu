// Host-side dispatch: the registry the instantiation files fill at load time, bucket choice,
// the decode-path decision and its split count. No kernels here.
#include <algorithm>
#include <cstdlib>
#include <map>
#include <utility>

#include "kernel_traits.cuh"
#include "launch.h"

namespace attnkern {
namespace cuda {
namespace {

struct Launchers {
  FwdLauncher fwd = nullptr;
  BwdLauncher bwd = nullptr;
  Sm90Launcher fwd_sm90 = nullptr;
  Sm90Launcher bwd_sm90 = nullptr;
};

// ordered by (head dim, dtype): bucket search walks head dims upwards
std::map<std::pair<int, int>, Launchers>& registry() {
  static std::map<std::pair<int, int>, Launchers> table;
  return table;
}

Launchers find(int head_dim, DType dtype) {
  auto it = registry().find({head_dim, static_cast<int>(dtype)});
  return it == registry().end() ? Launchers{} : it->second;
}

// whether both passes of the sm80 kernels (or of the Hopper ones) are registered
bool complete(const Launchers& l, bool hopper) {
  return hopper ? l.fwd_sm90 != nullptr && l.bwd_sm90 != nullptr : l.fwd != nullptr && l.bwd != nullptr;
}

std::vector<Instance> instances(bool hopper) {
  std::vector<Instance> out;
  for (const auto& [key, l] : registry())
    if (complete(l, hopper)) out.push_back({key.first, static_cast<DType>(key.second)});
  return out;
}

// The smallest complete bucket >= need for dtype, 0 if none: the registry is ordered by head
// dim, so the first match is the smallest. Walked in place, since every call asks.
int smallest_bucket(int64_t need, DType dtype, bool hopper) {
  for (const auto& [key, l] : registry())
    if (key.second == static_cast<int>(dtype) && key.first >= need && complete(l, hopper)) return key.first;
  return 0;
}

template <template <int> class Traits>
int decode_block(int bucket, bool rows) {
  switch (bucket) {
    case 32:
      return rows ? Traits<32>::Cfg::kBlockM : Traits<32>::Cfg::kBlockN;
    case 64:
      return rows ? Traits<64>::Cfg::kBlockM : Traits<64>::Cfg::kBlockN;
    case 96:
      return rows ? Traits<96>::Cfg::kBlockM : Traits<96>::Cfg::kBlockN;
    case 128:
      return rows ? Traits<128>::Cfg::kBlockM : Traits<128>::Cfg::kBlockN;
    default:
      return rows ? Traits<256>::Cfg::kBlockM : Traits<256>::Cfg::kBlockN;
  }
}

__global__ void probe_kernel() {}

}  // namespace

bool has_kernel_image() {
  cudaFuncAttributes attr;
  const bool ok = cudaFuncGetAttributes(&attr, probe_kernel) == cudaSuccess;
  cudaGetLastError();  // clear a sticky "no kernel image" error
  return ok;
}

bool register_forward(int head_dim, DType dtype, FwdLauncher launcher) {
  registry()[{head_dim, static_cast<int>(dtype)}].fwd = launcher;
  return true;
}

bool register_backward(int head_dim, DType dtype, BwdLauncher launcher) {
  registry()[{head_dim, static_cast<int>(dtype)}].bwd = launcher;
  return true;
}

bool register_forward_sm90(int head_dim, DType dtype, Sm90Launcher launcher) {
  registry()[{head_dim, static_cast<int>(dtype)}].fwd_sm90 = launcher;
  return true;
}

bool register_backward_sm90(int head_dim, DType dtype, Sm90Launcher launcher) {
  registry()[{head_dim, static_cast<int>(dtype)}].bwd_sm90 = launcher;
  return true;
}

std::vector<Instance> compiled_sm90_instances() { return instances(true); }

#if defined(ATTNKERN_CUDA_EMULATOR)
extern int emulated_device_arch;  // emulator.cpp: the compute capability the emulator pretends to be
int current_device_arch() { return emulated_device_arch; }
#else
int current_device_arch() {
  constexpr int kCached = 64;
  static int arch[kCached] = {0};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  if (device >= 0 && device < kCached && arch[device] != 0) return arch[device];
  int major = 0, minor = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  const int found = 10 * major + minor;
  if (device >= 0 && device < kCached) arch[device] = found;
  return found;
}
#endif

bool wgmma_enabled() {
  const char* flag = std::getenv("ATTNKERN_CUDA_WGMMA");
  return flag != nullptr && flag[0] == '1' && flag[1] == '\0';
}

std::vector<Instance> compiled_instances() { return instances(false); }

int head_dim_bucket(int64_t head_dim, int64_t head_dim_v, DType dtype) {
  return smallest_bucket(std::max(head_dim, head_dim_v), dtype, false);
}

bool takes_decode_path(const AttnParams& p) {
  // (the row statistics of the backward's rare path come from the prefill kernel's epilogue)
  return p.len_q <= kDecodeMaxLenQ && !has_features(p) && p.row_stats == nullptr;
}

int decode_num_splits(const AttnParams& p, int sm_count) {
  const int bucket = head_dim_bucket(p.head_dim, p.head_dim_v, p.dtype);
  if (!takes_decode_path(p) || bucket == 0) return 1;
  const int64_t block_m = decode_block<DecodeTraits>(bucket, true);
  const int64_t block_n = decode_block<DecodeTraits>(bucket, false);
  const int64_t tiles = ((p.heads_q / p.heads_kv) * p.len_q + block_m - 1) / block_m;
  const int64_t ctas = p.batch * p.heads_kv * tiles;
  const int64_t key_blocks = (p.len_k + block_n - 1) / block_n;
  // about three CTAs per SM keep enough K/V loads in flight to saturate HBM; a split should
  // still own a few key blocks so the merge stays cheap
  const int64_t want = (3 * static_cast<int64_t>(sm_count) + ctas - 1) / ctas;
  const int64_t most = std::max<int64_t>(1, std::min<int64_t>(128, key_blocks / 4));
  return static_cast<int>(std::clamp<int64_t>(want, 1, most));
}

// The Hopper launcher for p, or nullptr: sm_90a code runs on compute capability 9.0 only (the
// "a" features are not forward-compatible). Head dims go to the smallest Hopper bucket that
// holds them, which may be larger than the sm80 one. The Hopper kernels have no score-modifier
// variant: softcap, sinks and ALiBi run the sm80 kernels' kModified variant, also on Hopper.
Sm90Launcher hopper_launcher(const AttnParams& p, bool backward) {
  // packed batches (cu_seqlens) run the sm80 kernels' varlen variants
  if (!wgmma_enabled() || current_device_arch() != 90 || has_modifiers(p) || p.cu_seqlens_q != nullptr)
    return nullptr;
  const int bucket = smallest_bucket(std::max(p.head_dim, p.head_dim_v), p.dtype, true);
  if (bucket == 0) return nullptr;
  const Launchers l = find(bucket, p.dtype);
  return backward ? l.bwd_sm90 : l.fwd_sm90;
}

cudaError_t forward(const AttnParams& p, const FwdSplit& split, cudaStream_t stream) {
  // the sm80 kernels serve the backward's rare path (row statistics), which the Hopper ones lack
  if (const Sm90Launcher hopper = takes_decode_path(p) || p.row_stats ? nullptr : hopper_launcher(p, false)) {
    const cudaError_t err = hopper(p, stream);
    if (err != cudaErrorNotSupported) return err;
  }
  const Launchers l = find(head_dim_bucket(p.head_dim, p.head_dim_v, p.dtype), p.dtype);
  return l.fwd == nullptr ? cudaErrorInvalidValue : l.fwd(p, split, stream);
}

cudaError_t backward(const AttnParams& p, cudaStream_t stream) {
  if (const Sm90Launcher hopper = p.row_stats ? nullptr : hopper_launcher(p, true)) {
    const cudaError_t err = hopper(p, stream);
    if (err != cudaErrorNotSupported) return err;
  }
  const Launchers l = find(head_dim_bucket(p.head_dim, p.head_dim_v, p.dtype), p.dtype);
  return l.bwd == nullptr ? cudaErrorInvalidValue : l.bwd(p, stream);
}

}  // namespace cuda
}  // namespace attnkern
