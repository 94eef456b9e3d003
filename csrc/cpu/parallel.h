// Dynamic scheduling over torch's intra-op thread pool: one task per thread pulls work
// items from a shared counter, so uneven items (causal blocks, window edges) balance out.
// Each task owns one scratch block for all of its items.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <memory>

namespace attnkern::cpu {

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};

inline std::unique_ptr<float[], FreeDeleter> alloc_scratch(size_t floats) {
  size_t bytes = ((floats * sizeof(float) + 63) / 64) * 64;
  void* p = std::aligned_alloc(64, bytes > 0 ? bytes : 64);
  if (!p) throw std::bad_alloc();
  return std::unique_ptr<float[], FreeDeleter>(static_cast<float*>(p));
}

template <class F>
void parallel_items(int64_t n_items, size_t scratch_floats, const F& fn) {
  if (n_items <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t tasks = std::min<int64_t>(at::get_num_threads(), n_items);
  at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) {
    auto scratch = alloc_scratch(scratch_floats);
    for (int64_t item = next.fetch_add(1); item < n_items; item = next.fetch_add(1)) fn(item, scratch.get());
  });
}

}  // namespace attnkern::cpu
