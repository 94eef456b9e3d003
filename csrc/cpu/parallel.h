// Dynamic scheduling over torch's intra-op thread pool: one task per thread pulls work
// items from a shared counter, so uneven items (causal blocks, window edges) balance out.
// Each task owns one scratch block for all of its items.
//
// torch's inline at::parallel_for only forks when this file is compiled with OpenMP (setup.py
// and CMakeLists.txt add it, linked to torch's own runtime); without it every item runs on the
// calling thread. ThreadTrace records, when switched on, how many distinct threads ran items,
// so a test can see the fork happen without timing anything.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

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

// Introspection for tests: per parallel_items call of the last traced op, the number of work
// items and of distinct threads that ran at least one. Off by default; when off it costs one
// relaxed atomic load per parallel_items call.
struct ThreadTrace {
  struct Pass {
    int64_t items, threads;
  };
  std::atomic<bool> on{false};
  std::mutex lock;
  std::vector<Pass> passes;

  static ThreadTrace& get() {
    static ThreadTrace trace;
    return trace;
  }
  // start of an op (forward / backward): forget the previous op's passes
  void begin_op() {
    if (!on.load(std::memory_order_relaxed)) return;
    std::lock_guard<std::mutex> g(lock);
    passes.clear();
  }
  void record(int64_t items, std::vector<std::thread::id> ids) {
    std::sort(ids.begin(), ids.end());
    const int64_t distinct = std::unique(ids.begin(), ids.end()) - ids.begin();
    std::lock_guard<std::mutex> g(lock);
    passes.push_back({items, distinct});
  }
};

// Runs fn(item, scratch) for item in [0, n_items). Task t runs item t first (so every thread
// the pool forks runs at least one item, whatever the timing), then pulls the rest in order.
template <class F>
void parallel_items(int64_t n_items, size_t scratch_floats, const F& fn) {
  if (n_items <= 0) return;
  const int64_t tasks = std::min<int64_t>(at::get_num_threads(), n_items);
  std::atomic<int64_t> next{tasks};
  ThreadTrace& trace = ThreadTrace::get();
  const bool tracing = trace.on.load(std::memory_order_relaxed);
  std::vector<std::thread::id> ran(tracing ? tasks : 0);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    auto scratch = alloc_scratch(scratch_floats);
    for (int64_t task = begin; task < end; ++task) {
      if (tracing) ran[task] = std::this_thread::get_id();
      fn(task, scratch.get());
    }
    for (int64_t item = next.fetch_add(1); item < n_items; item = next.fetch_add(1)) fn(item, scratch.get());
  });
  if (tracing) trace.record(n_items, std::move(ran));
}

}  // namespace attnkern::cpu
