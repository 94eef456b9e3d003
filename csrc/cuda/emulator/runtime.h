// The emulator's runtime: every CUDA thread of a CTA is a fiber (ucontext) with its own stack,
// run round-robin until it blocks at __syncthreads or a warp-wide instruction; the last thread
// to arrive completes the barrier or carries out the warp instruction for all 32 lanes.
//
// Checks made along the way, each an error naming the CTA and thread: shared-memory accesses
// out of bounds or misaligned, cp.async reads outside the tensors of the launch, copies still
// in flight when a thread exits, lanes of a warp at different warp-wide instructions, a barrier
// after a thread exited, and deadlock. Shared memory starts filled with NaN bytes, and cp.async
// copies land either when issued or only at the wait that needs them, so a read of a stage
// that has not landed, or a copy into a stage still being read, gives wrong numbers.
// The sm90 instructions (mbarrier, TMA, wgmma) live in ptx_sm90_emu.h; this file only calls
// its per-CTA hooks and counts its waiting threads.
#pragma once

#include <ucontext.h>

#include <array>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "ptx_emu.h"

namespace attnkern {
namespace cuda {
extern unsigned char smem_raw[];  // defined by the emulator's translation unit
}  // namespace cuda

namespace emu {

constexpr uint32_t kSharedBase = 1024;  // sm80+ reserve the first KB of a CTA's shared window
constexpr uint32_t kSharedCapacity = 232448;  // 227 KB, the sm90 opt-in maximum per CTA
constexpr size_t kStackBytes = 256 * 1024;

struct Options {
  bool late_copies = true;  // cp.async, TMA and wgmma complete at the wait that needs them (else when issued)
  int order = 0;            // thread scheduling order: 0 ascending, 1 descending, 2 shuffled
  uint64_t seed = 0;
};

struct Stats {  // warp-wide instructions are counted once per warp
  uint64_t ctas = 0, barriers = 0, cp_async = 0, ldmatrix = 0, ldmatrix_conflicts = 0, mma = 0, shuffles = 0;
  uint64_t wgmma = 0, tma = 0;  // wgmma counted once per warpgroup, TMA once per copy
};

struct Range {
  const char* begin;
  const char* end;
};

struct Copy {
  uint32_t dst;
  const void* src;
  bool valid;
};

enum class Wait { kNone, kBarrier, kWarp, kWarpgroup, kMbarrier, kNamedBarrier };
enum class Op { kNone, kShuffle, kLdmatrix, kLdmatrixTrans, kMmaF16, kMmaBf16 };

struct Thread {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;
  Index index{0, 0, 0};
  int linear = 0;
  Wait wait = Wait::kNone;
  uint32_t wait_bar = 0;  // the mbarrier of Wait::kMbarrier
  bool done = false;
  std::vector<Copy> open;                 // issued, not yet committed
  std::vector<std::vector<Copy>> groups;  // committed, oldest first, not yet landed
};

struct Lane {
  uint32_t in_u[6];
  float in_f[4];
  uint32_t out_u[4];
  float out_f[4];
};

struct Warp {
  int arrived = 0;
  Op op = Op::kNone;
  std::array<Lane, 32> lane;
};

struct State {
  Options options;
  Stats stats;
  std::vector<Range> readable;  // global memory a launch may read through cp.async
  uint32_t smem_bytes = 0;
  int nthreads = 0;
  Index block{0, 0, 0};
  Index grid{1, 1, 1};
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  ucontext_t scheduler;
  Thread* current = nullptr;
  int barrier_arrived = 0;
  struct NamedBarrier {
    int expected = 0, arrived = 0;
  };
  std::array<NamedBarrier, 16> named{};  // bar.sync / bar.arrive ids 1 .. 15 (0 is __syncthreads)
  std::string error;
  const std::function<void()>* body = nullptr;
  std::mt19937_64 rng;
};

inline State& state() {
  static State s;
  return s;
}

[[noreturn]] inline void fail(const std::string& what) {
  State& s = state();
  std::ostringstream msg;
  msg << "CUDA emulator: " << what << " (block (" << s.block.x << ", " << s.block.y << ", " << s.block.z << ")";
  if (s.current != nullptr) msg << ", thread " << s.current->linear;
  msg << ")";
  throw std::runtime_error(msg.str());
}

// per-CTA state of the sm90 instructions, defined in ptx_sm90_emu.h
inline void sm90_begin_cta();
inline void sm90_thread_exit(const Thread& t);
inline void sm90_end_cta();

inline const Index& thread_index() { return state().current->index; }
inline const Index& block_index() { return state().block; }
inline const Index& grid_dim() { return state().grid; }
inline void trap() { fail("__trap()"); }

inline void yield() {
  State& s = state();
  swapcontext(&s.current->ctx, &s.scheduler);
}

inline void syncthreads() {
  State& s = state();
  for (const Thread& t : s.threads)
    if (t.done) fail("__syncthreads after another thread of the CTA exited");
  if (++s.barrier_arrived == s.nthreads) {
    s.barrier_arrived = 0;
    ++s.stats.barriers;
    for (Thread& t : s.threads)
      if (t.wait == Wait::kBarrier) t.wait = Wait::kNone;
    return;
  }
  s.current->wait = Wait::kBarrier;
  yield();
}

// bar.sync / bar.arrive with an id and a thread count: the barrier completes once `count` threads
// have arrived (those of bar.sync wait for it, those of bar.arrive go on). Counts must agree
// among a phase's arrivals; threads waiting count in deadlock reports.
inline void named_barrier(int id, int count, bool wait) {
  State& s = state();
  if (id < 1 || id > 15) fail("named barrier id " + std::to_string(id) + " outside 1 .. 15 (0 is __syncthreads)");
  if (count <= 0 || count % 32 != 0 || count > s.nthreads)
    fail("named barrier thread count " + std::to_string(count) + " is not a multiple of 32 up to the block size");
  State::NamedBarrier& b = s.named[id];
  if (b.arrived == 0) {
    b.expected = count;
  } else if (b.expected != count) {
    fail("named barrier " + std::to_string(id) + " reached with thread counts " + std::to_string(b.expected) +
         " and " + std::to_string(count));
  }
  Thread& t = *s.current;
  if (++b.arrived == b.expected) {
    b = {};
    for (Thread& other : s.threads)
      if (other.wait == Wait::kNamedBarrier && other.wait_bar == static_cast<uint32_t>(id)) other.wait = Wait::kNone;
    return;
  }
  if (wait) {
    t.wait = Wait::kNamedBarrier;
    t.wait_bar = static_cast<uint32_t>(id);
    yield();
  }
}

// One warp-wide instruction: every lane deposits its operands; the last to arrive computes the
// results of all 32 lanes; each lane then reads its own.
template <class Compute>
inline Lane collective(Op op, const Lane& in, Compute compute) {
  State& s = state();
  Thread& t = *s.current;
  Warp& w = s.warps[t.linear / 32];
  const int lane = t.linear % 32;
  if (w.arrived == 0) {
    w.op = op;
  } else if (w.op != op) {
    fail("lanes of warp " + std::to_string(t.linear / 32) + " reached different warp-wide instructions");
  }
  std::memcpy(w.lane[lane].in_u, in.in_u, sizeof(in.in_u));
  std::memcpy(w.lane[lane].in_f, in.in_f, sizeof(in.in_f));
  if (++w.arrived == 32) {
    compute(w);
    w.arrived = 0;
    w.op = Op::kNone;
    const int first = (t.linear / 32) * 32;
    for (int l = 0; l < 32; ++l)
      if (s.threads[first + l].wait == Wait::kWarp) s.threads[first + l].wait = Wait::kNone;
  } else {
    t.wait = Wait::kWarp;
    yield();
  }
  return w.lane[lane];
}

inline float shfl_xor(float v, int lane_mask) {
  Lane in{};
  in.in_u[0] = static_cast<uint32_t>(lane_mask);
  in.in_f[0] = v;
  return collective(Op::kShuffle, in,
                    [](Warp& w) {
                      ++state().stats.shuffles;
                      for (int l = 0; l < 32; ++l) {
                        const uint32_t m = w.lane[l].in_u[0];
                        if (m != w.lane[0].in_u[0] || m >= 32)
                          fail("__shfl_xor_sync with lanes giving different masks");
                        w.lane[l].out_f[0] = w.lane[l ^ m].in_f[0];
                      }
                    })
      .out_f[0];
}

inline unsigned char* shared_bytes(uint32_t addr, uint32_t bytes, uint32_t align, const char* what) {
  const State& s = state();
  if (addr % align != 0) fail(std::string(what) + ": shared address " + std::to_string(addr) + " is not aligned");
  if (addr < kSharedBase || addr + bytes > kSharedBase + s.smem_bytes)
    fail(std::string(what) + ": shared address " + std::to_string(addr) + " outside the " +
         std::to_string(s.smem_bytes) + " bytes of the launch");
  return cuda::smem_raw + (addr - kSharedBase);
}

inline uint32_t shared_address(const void* p) {
  const auto* c = static_cast<const unsigned char*>(p);
  if (c < cuda::smem_raw || c > cuda::smem_raw + kSharedCapacity) fail("smem_addr of a pointer outside shared memory");
  return kSharedBase + static_cast<uint32_t>(c - cuda::smem_raw);
}

inline void land(const Copy& c) {
  unsigned char* dst = shared_bytes(c.dst, 16, 16, "cp.async");
  if (c.valid) {
    std::memcpy(dst, c.src, 16);
  } else {
    std::memset(dst, 0, 16);
  }
}

inline void cp_async(uint32_t dst, const void* src, bool valid) {
  State& s = state();
  ++s.stats.cp_async;
  shared_bytes(dst, 16, 16, "cp.async");
  if (valid) {
    const auto* c = static_cast<const char*>(src);
    if (reinterpret_cast<uintptr_t>(c) % 16 != 0) fail("cp.async from a global address that is not 16-byte aligned");
    bool inside = s.readable.empty();
    for (const Range& r : s.readable) inside = inside || (c >= r.begin && c + 16 <= r.end);
    if (!inside) fail("cp.async reads global memory outside every tensor of the launch");
  }
  const Copy copy{dst, src, valid};
  if (s.options.late_copies) {
    s.current->open.push_back(copy);
  } else {
    land(copy);
  }
}

inline void cp_async_commit() {
  Thread& t = *state().current;
  t.groups.push_back(std::move(t.open));
  t.open.clear();
}

inline void cp_async_wait(int pending) {
  Thread& t = *state().current;
  while (static_cast<int>(t.groups.size()) > pending) {
    for (const Copy& c : t.groups.front()) land(c);
    t.groups.erase(t.groups.begin());
  }
}

inline void ldmatrix(uint32_t (&r)[4], uint32_t addr, bool trans) {
  Lane in{};
  in.in_u[0] = addr;
  const Lane out = collective(trans ? Op::kLdmatrixTrans : Op::kLdmatrix, in, [trans](Warp& w) {
    State& st = state();
    ++st.stats.ldmatrix;
    for (int m = 0; m < 4; ++m) {
      // the 8 row addresses of matrix m; the hardware serves them in one pass iff their 16-byte
      // bank groups (address / 16 mod 8) are distinct
      unsigned char* row[8];
      bool seen[8] = {false};
      int distinct = 0;
      for (int i = 0; i < 8; ++i) {
        const uint32_t a = w.lane[8 * m + i].in_u[0];
        row[i] = shared_bytes(a, 16, 16, "ldmatrix");
        const int group = (a / 16) % 8;
        if (!seen[group]) {
          seen[group] = true;
          ++distinct;
        }
      }
      st.stats.ldmatrix_conflicts += 8 - distinct;
      for (int l = 0; l < 32; ++l) {
        uint16_t lo, hi;
        if (!trans) {  // row l/4, columns 2(l%4), 2(l%4)+1
          std::memcpy(&lo, row[l / 4] + 4 * (l % 4), 2);
          std::memcpy(&hi, row[l / 4] + 4 * (l % 4) + 2, 2);
        } else {  // rows 2(l%4), 2(l%4)+1 of column l/4
          std::memcpy(&lo, row[2 * (l % 4)] + 2 * (l / 4), 2);
          std::memcpy(&hi, row[2 * (l % 4) + 1] + 2 * (l / 4), 2);
        }
        w.lane[l].out_u[m] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
      }
    }
  });
  for (int m = 0; m < 4; ++m) r[m] = out.out_u[m];
}

inline float half_bits_to_float(uint16_t bits, bool bf16) {
  return bf16 ? __bfloat162float(__nv_bfloat16{bits}) : __half2float(__half{bits});
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: with g = lane / 4, t = lane % 4, lane holds
//   A: a0 = A[g][2t, 2t+1], a1 = A[g+8][2t, 2t+1], a2 = A[g][2t+8, 2t+9], a3 = A[g+8][2t+8, 2t+9]
//   B: b0 = B[2t, 2t+1][g], b1 = B[2t+8, 2t+9][g]
//   C, D: c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][2t, 2t+1]
// (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"), lower index in the
// low 16 bits.
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
  Lane in{};
  for (int i = 0; i < 4; ++i) {
    in.in_u[i] = a[i];
    in.in_f[i] = d[i];
  }
  in.in_u[4] = b0;
  in.in_u[5] = b1;
  const Lane out = collective(bf16 ? Op::kMmaBf16 : Op::kMmaF16, in, [bf16](Warp& w) {
    ++state().stats.mma;
    auto elem = [&](uint32_t word, int half) {
      return half_bits_to_float(static_cast<uint16_t>(word >> (16 * half)), bf16);
    };
    float A[16][16], B[16][8];
    for (int r = 0; r < 16; ++r)
      for (int k = 0; k < 16; ++k) A[r][k] = elem(w.lane[(r % 8) * 4 + (k % 8) / 2].in_u[(r / 8) + 2 * (k / 8)], k % 2);
    for (int k = 0; k < 16; ++k)
      for (int n = 0; n < 8; ++n) B[k][n] = elem(w.lane[n * 4 + (k % 8) / 2].in_u[4 + k / 8], k % 2);
    for (int r = 0; r < 16; ++r)
      for (int n = 0; n < 8; ++n) {
        Lane& owner = w.lane[(r % 8) * 4 + n / 2];
        const int reg = (r / 8) * 2 + n % 2;
        double acc = owner.in_f[reg];
        for (int k = 0; k < 16; ++k) acc += static_cast<double>(A[r][k]) * B[k][n];
        owner.out_f[reg] = static_cast<float>(acc);
      }
  });
  for (int i = 0; i < 4; ++i) d[i] = out.out_f[i];
}

inline void fiber_entry(unsigned lo, unsigned hi) {
  State& s = state();
  Thread& t = *reinterpret_cast<Thread*>((static_cast<uintptr_t>(hi) << 32) | lo);
  try {
    (*s.body)();
    if (!t.open.empty()) fail("cp.async copies issued but never committed when the thread exited");
    for (const auto& g : t.groups)
      if (!g.empty()) fail("cp.async copies still in flight when the thread exited");
    sm90_thread_exit(t);
  } catch (const std::exception& e) {
    if (s.error.empty()) s.error = e.what();
  }
  t.done = true;
  t.wait = Wait::kNone;
}  // returns to the scheduler through uc_link

inline void run_cta() {
  State& s = state();
  for (Thread& t : s.threads) {
    t.wait = Wait::kNone;
    t.done = false;
    t.open.clear();
    t.groups.clear();
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = t.stack.get();
    t.ctx.uc_stack.ss_size = kStackBytes;
    t.ctx.uc_link = &s.scheduler;
    const auto ptr = reinterpret_cast<uintptr_t>(&t);
    makecontext(&t.ctx, reinterpret_cast<void (*)()>(fiber_entry), 2, static_cast<unsigned>(ptr & 0xffffffffu),
                static_cast<unsigned>(ptr >> 32));
  }
  for (Warp& w : s.warps) w = Warp{};
  s.barrier_arrived = 0;
  s.named = {};
  std::memset(cuda::smem_raw, 0xff, s.smem_bytes);  // NaN in fp16, bf16 and fp32; bytes past it fail bounds checks
  sm90_begin_cta();
  std::vector<int> order(s.nthreads);
  for (int i = 0; i < s.nthreads; ++i) order[i] = s.options.order == 1 ? s.nthreads - 1 - i : i;
  for (;;) {
    if (s.options.order == 2) std::shuffle(order.begin(), order.end(), s.rng);
    bool ran = false, all_done = true;
    for (int i : order) {
      Thread& t = s.threads[i];
      if (t.done) continue;
      all_done = false;
      if (t.wait != Wait::kNone) continue;
      s.current = &t;
      swapcontext(&s.scheduler, &t.ctx);
      s.current = nullptr;
      ran = true;
      if (!s.error.empty()) throw std::runtime_error(s.error);
    }
    if (all_done) {
      sm90_end_cta();
      for (int id = 1; id < 16; ++id)
        if (s.named[id].arrived != 0)
          fail("named barrier " + std::to_string(id) + " left with " + std::to_string(s.named[id].arrived) + " of " +
               std::to_string(s.named[id].expected) + " arrivals when the CTA exited");
      break;
    }
    if (!ran) {
      int at_barrier = 0, at_warp = 0, at_warpgroup = 0, at_mbarrier = 0, at_named = 0;
      std::string bars;
      for (const Thread& t : s.threads) {
        at_barrier += t.wait == Wait::kBarrier;
        at_warp += t.wait == Wait::kWarp;
        at_warpgroup += t.wait == Wait::kWarpgroup;
        at_named += t.wait == Wait::kNamedBarrier;
        if (t.wait == Wait::kMbarrier && at_mbarrier++ < 4)
          bars += " thread " + std::to_string(t.linear) + " on " + std::to_string(t.wait_bar) + ";";
      }
      fail("deadlock: " + std::to_string(at_barrier) + " threads wait at __syncthreads, " + std::to_string(at_warp) +
           " at warp-wide instructions, " + std::to_string(at_warpgroup) + " at warpgroup-wide instructions, " +
           std::to_string(at_mbarrier) + " threads wait on mbarriers (" + bars + " ...), " + std::to_string(at_named) +
           " at named barriers, the others exited");
    }
  }
  ++s.stats.ctas;
}

inline void run_grid(dim3 grid, int threads, int smem_bytes, const std::function<void()>& body) {
  State& s = state();
  if (threads <= 0 || threads % 32 != 0 || threads > 1024) fail("block size must be a multiple of 32 up to 1024");
  if (smem_bytes < 0 || static_cast<uint32_t>(smem_bytes) > kSharedCapacity) fail("dynamic shared memory too large");
  s.smem_bytes = static_cast<uint32_t>(smem_bytes);
  s.nthreads = threads;
  s.body = &body;
  s.error.clear();
  s.rng.seed(s.options.seed);
  if (static_cast<int>(s.threads.size()) != threads) {
    s.threads = std::vector<Thread>(threads);
    for (int i = 0; i < threads; ++i) {
      s.threads[i].stack.reset(new char[kStackBytes]);
      s.threads[i].linear = i;
      s.threads[i].index = {static_cast<unsigned>(i), 0, 0};
    }
  }
  s.warps.assign(threads / 32, Warp{});
  s.grid = {grid.x, grid.y, grid.z};
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        s.block = {x, y, z};
        run_cta();
      }
}

}  // namespace emu
}  // namespace attnkern
