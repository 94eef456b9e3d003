// The sm90 (Hopper) instructions for the CPU emulator: mbarrier, TMA tile loads
// (cp.async.bulk.tensor with 128-byte swizzle), wgmma.mma_async and setmaxnreg, carried out with
// the semantics of the PTX ISA as read here independently of the kernels that call them, plus
// checks the hardware does not make.
//
// Sources read (PTX ISA 8.x): "Asynchronous Warpgroup Level Matrix Multiply-Accumulate
// Instructions" (register fragments, shared memory matrix layout, matrix descriptor format,
// wgmma.fence / commit_group / wait_group), "mbarrier" (phases, tx-count, try_wait.parity),
// "cp.async.bulk.tensor"; CUDA driver API cuTensorMapEncodeTiled; the canonical GMMA layouts
// written out in CUTLASS's cute (make_gmma_desc) as a second statement of the same rules.
//
// Shared-memory operand of wgmma, 16-bit elements, as implemented by operand_address():
//   descriptor bits  0-13 start address >> 4, 16-29 leading byte offset (LBO) >> 4,
//   32-45 stride byte offset (SBO) >> 4, 49-51 base offset, 62-63 swizzle (0 none, 1 128B,
//   2 64B, 3 32B); every other bit must be 0. Only swizzle none and 128B, base offset 0.
//   128B swizzle: the physical byte address is the logical one with bits 4-6 (16-byte chunk)
//   XORed with bits 7-9 (128-byte row within a 1024-byte atom). The atom must start on a
//   1024-byte boundary when the base offset is 0, so the start address must lie in the first
//   128-byte row of an atom: (start >> 7) & 7 == 0.
//   K-major, 128B (A, and B given as N x K): element (mn, k), k < 16 of this instruction, at
//     logical start + (mn % 8) * 128 + (mn / 8) * SBO + 2k; LBO unused. The 16-element K
//     slice must stay inside its 128-byte row ((start & 127) + 32 <= 128), so the k-th step
//     of a 64-column block advances the start by 32 bytes and the next 64-column block starts
//     at its own atom column (for a dense tile of R rows: R * 128 bytes further).
//   MN-major, 128B (B given as K x N with N contiguous, imm-trans-b = 1): element (k, n) at
//     logical start + 2 (n % 64) + (n / 64) * LBO + (k % 8) * 128 + (k / 8) * SBO: rows of 64
//     N-elements 128 bytes apart, 8-row K groups SBO apart, 64-column N blocks LBO apart; a
//     k-step of 16 advances the start by 2 * SBO.
//   No swizzle (core matrices of 8 rows x 16 bytes, rows 16 bytes apart):
//     K-major  (mn, k): start + (mn % 8) * 16 + (mn / 8) * SBO + 2 (k % 8) + (k / 8) * LBO
//     MN-major (k, n):  start + 2 (n % 8) + (n / 8) * SBO + (k % 8) * 16 + (k / 8) * LBO
//
// Register fragments of wgmma.m64nNk16 (warpgroup = 4 warps; in warp w = (thread % 128) / 32,
// lane l: g = l / 4, q = l % 4):
//   D (f32, N/2 registers): d[i] = D[16w + g + 8 * ((i >> 1) & 1)][8 * (i >> 2) + 2q + (i & 1)]
//   A (f16/bf16, 4 registers of 2 elements, lower index in the low half), the m16n8k16 A
//   layout on rows 16w..16w+15: a0 = A[16w+g][2q, 2q+1], a1 = A[16w+g+8][2q, 2q+1],
//   a2 = A[16w+g][2q+8, 2q+9], a3 = A[16w+g+8][2q+8, 2q+9].
//
// Timing (Options.late_copies): TMA copies land, and wgmma read shared memory and write their
// accumulators, only when a wait needs them; their accumulators read NaN meanwhile. Otherwise
// both complete when issued.
#pragma once

#include <array>
#include <cstdint>
#include <cstring>
#include <deque>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "runtime.h"

namespace attnkern {
namespace emu {

// A tiled 4-D tensor map over 16-bit elements, 128-byte swizzle, zero fill (the emulator's
// CUtensorMap; cuda::encode_tma_map fills it)
struct TmaMap {
  static constexpr uint64_t kMagic = 0x544d414d41503930ull;
  uint64_t magic = 0;
  const char* base = nullptr;
  int64_t dims[4] = {0, 0, 0, 0};
  int64_t strides[4] = {2, 0, 0, 0};  // bytes
  int box0 = 0, box1 = 0;
};

struct TmaCopy {
  uint32_t dst;
  TmaMap map;
  int32_t coord[4];
  uint32_t bar;
};

struct Mbarrier {
  uint32_t count = 0;    // arrivals per phase
  uint32_t pending = 0;  // arrivals still missing in the current phase
  int64_t tx = 0;        // transaction bytes still expected (may go negative before the arrivals)
  uint64_t phase = 0;    // completed phases; the current phase has parity phase & 1
  std::vector<TmaCopy> copies;  // issued, not landed (late mode)
};

struct WgmmaOp {
  bool a_in_smem;
  int n;
  bool bf16, accumulate;
  uint64_t desc_a, desc_b;
  std::array<float*, 128> d;
  std::array<std::array<uint32_t, 4>, 128> a;
  std::array<bool, 128> chained;  // C is the result of an earlier in-flight wgmma on the same d
  std::vector<float> c;           // [thread][n/2], the accumulators read at issue
  bool done = false;
};

struct InFlight {  // one thread's accumulator array under in-flight wgmma
  int n;
  int count;
  std::vector<float> value;  // the latest retired result (chaining)
};

struct WgArrival {
  uint64_t desc_a, desc_b;
  uint32_t a[4];
  float* d;
  bool accumulate;
};

struct Warpgroup {
  int arrived = 0;
  uint64_t sig = 0;
  const char* name = "";
  std::array<WgArrival, 128> in;
  bool fenced = false;
  std::vector<WgmmaOp> open;                // issued, not committed
  std::deque<std::vector<WgmmaOp>> groups;  // committed, oldest first
  std::map<const float*, InFlight> inflight;
};

struct Sm90 {
  std::map<uint32_t, Mbarrier> bars;
  std::vector<Warpgroup> warpgroups;
};

inline Sm90& sm90() {
  static Sm90 s;
  return s;
}

inline void sm90_begin_cta() {
  Sm90& s = sm90();
  s.bars.clear();
  s.warpgroups.assign(state().nthreads / 128, Warpgroup{});
}

inline void sm90_thread_exit(const Thread& t) {
  Sm90& s = sm90();
  const size_t w = t.linear / 128;
  if (w >= s.warpgroups.size()) return;
  if (!s.warpgroups[w].open.empty()) fail("wgmma.mma_async issued but never committed when the thread exited");
  if (!s.warpgroups[w].groups.empty())
    fail("wgmma groups committed but not retired by wgmma.wait_group when the thread exited");
}

inline void sm90_end_cta() {
  for (const auto& [addr, bar] : sm90().bars)
    if (!bar.copies.empty())
      fail("cp.async.bulk.tensor copies on mbarrier " + std::to_string(addr) +
           " still in flight when the CTA exited (nobody waited for them)");
}

// ---------------------------------------------------------------------------------------------
// mbarrier (PTX ISA "Parallel Synchronization and Communication Instructions: mbarrier"):
// a phase completes when its pending arrivals reach 0 and its tx-count is 0; the phase then
// advances and the counts are re-armed. try_wait.parity p succeeds once the phase of parity p
// has completed, i.e. while the current phase's parity differs from p.

inline Mbarrier& mbarrier(uint32_t bar, const char* what) {
  shared_bytes(bar, 8, 8, what);
  auto it = sm90().bars.find(bar);
  if (it == sm90().bars.end()) fail(std::string(what) + " on shared address " + std::to_string(bar) +
                                    ", which holds no initialised mbarrier");
  return it->second;
}

inline void wake_waiters(uint32_t bar) {
  for (Thread& t : state().threads)
    if (t.wait == Wait::kMbarrier && t.wait_bar == bar) t.wait = Wait::kNone;
}

inline void complete_phase_if_done(uint32_t bar, Mbarrier& b) {
  if (b.pending != 0) return;
  if (b.tx < 0)
    fail("mbarrier " + std::to_string(bar) + ": " + std::to_string(-b.tx) +
         " more transaction bytes completed than expect_tx announced for the phase");
  if (b.tx > 0) return;
  ++b.phase;
  b.pending = b.count;
  wake_waiters(bar);
}

inline void complete_tx(uint32_t bar, uint32_t bytes) {
  Mbarrier& b = mbarrier(bar, "complete_tx");
  b.tx -= bytes;
  complete_phase_if_done(bar, b);
  wake_waiters(bar);
}

inline void arrive(uint32_t bar, uint32_t expect_bytes, const char* what) {
  Mbarrier& b = mbarrier(bar, what);
  if (b.pending == 0)
    fail(std::string(what) + ": more arrivals than the mbarrier's count in one phase (mbarrier " +
         std::to_string(bar) + ")");
  b.tx += expect_bytes;
  if (b.tx >= (int64_t{1} << 20)) fail(std::string(what) + ": tx-count beyond the PTX range 2^20 - 1");
  --b.pending;
  complete_phase_if_done(bar, b);
  wake_waiters(bar);
}

inline void land(const TmaCopy& c);

inline void mbarrier_wait(uint32_t bar, uint32_t parity) {
  if (parity > 1) fail("mbarrier try_wait.parity with a parity other than 0 or 1");
  for (;;) {
    Mbarrier& b = mbarrier(bar, "mbarrier.try_wait.parity");
    if ((b.phase & 1) != parity) return;
    // the phase is open; once every arrival is in, only the copies in flight can close it
    if (b.pending == 0 && !b.copies.empty()) {
      const TmaCopy c = b.copies.front();
      b.copies.erase(b.copies.begin());
      land(c);
      continue;
    }
    Thread& t = *state().current;
    t.wait = Wait::kMbarrier;
    t.wait_bar = bar;
    yield();
  }
}

// ---------------------------------------------------------------------------------------------
// TMA

// 128-byte swizzle as TMA writes and wgmma reads it: 16-byte chunk bits 4-6 ^= row bits 7-9
inline uint32_t swizzle_128b(uint32_t addr) { return addr ^ (((addr >> 7) & 7u) << 4); }

inline bool inside_readable(const char* p, int64_t bytes) {
  const State& s = state();
  bool inside = s.readable.empty();
  for (const Range& r : s.readable) inside = inside || (p >= r.begin && p + bytes <= r.end);
  return inside;
}

// the in-bounds elements of box row `row`: [lo, hi) of dim 0, or lo == hi; the row's first byte
inline const char* tma_row(const TmaMap& m, const int32_t (&c)[4], int row, int64_t* lo, int64_t* hi) {
  const int64_t y = int64_t{c[1]} + row;
  *lo = std::max<int64_t>(c[0], 0);
  *hi = std::min<int64_t>(int64_t{c[0]} + m.box0, m.dims[0]);
  if (y < 0 || y >= m.dims[1] || c[2] < 0 || c[2] >= m.dims[2] || c[3] < 0 || c[3] >= m.dims[3] || *lo >= *hi) {
    *hi = *lo;
    return nullptr;
  }
  return m.base + y * m.strides[1] + int64_t{c[2]} * m.strides[2] + int64_t{c[3]} * m.strides[3];
}

inline void land(const TmaCopy& c) {
  const TmaMap& m = c.map;
  const uint32_t bytes = static_cast<uint32_t>(m.box0) * m.box1 * 2;
  for (const auto& [addr, bar] : sm90().bars)
    if (addr + 8 > c.dst && addr < c.dst + bytes) fail("cp.async.bulk.tensor writes over an mbarrier");
  for (int r = 0; r < m.box1; ++r) {
    int64_t lo, hi;
    const char* row = tma_row(m, c.coord, r, &lo, &hi);
    for (int e = 0; e < m.box0; ++e) {
      const int64_t x = int64_t{c.coord[0]} + e;
      uint16_t v = 0;  // out-of-bounds elements are zero-filled
      if (x >= lo && x < hi) std::memcpy(&v, row + x * 2, 2);
      std::memcpy(shared_bytes(swizzle_128b(c.dst + r * 128 + e * 2), 2, 2, "cp.async.bulk.tensor"), &v, 2);
    }
  }
  complete_tx(c.bar, bytes);
}

inline void tma_load(uint32_t dst, const TmaMap& map, uint32_t bar, const int32_t (&coord)[4]) {
  State& s = state();
  ++s.stats.tma;
  if (map.magic != TmaMap::kMagic) fail("cp.async.bulk.tensor with a tensor map encode_tma_map did not fill");
  if (map.box0 * 2 != 128)
    fail("cp.async.bulk.tensor: only boxes of 128-byte rows are modelled with the 128-byte swizzle");
  if (dst % 1024 != 0)
    fail("cp.async.bulk.tensor with 128-byte swizzle into shared address " + std::to_string(dst) +
         ", not 1024-byte aligned (the swizzle pattern repeats every 1024 bytes)");
  shared_bytes(dst, static_cast<uint32_t>(map.box1) * 128, 128, "cp.async.bulk.tensor");
  mbarrier(bar, "cp.async.bulk.tensor");
  for (int r = 0; r < map.box1; ++r) {
    int64_t lo, hi;
    const char* row = tma_row(map, coord, r, &lo, &hi);
    if (row != nullptr && !inside_readable(row + lo * 2, (hi - lo) * 2))
      fail("cp.async.bulk.tensor reads global memory outside every tensor of the launch");
  }
  TmaCopy c{dst, map, {coord[0], coord[1], coord[2], coord[3]}, bar};
  if (s.options.late_copies) {
    sm90().bars[bar].copies.push_back(c);
    wake_waiters(bar);
  } else {
    land(c);
  }
}

// ---------------------------------------------------------------------------------------------
// Warpgroup-wide instructions: all 128 threads of the warpgroup must reach the same one (same
// kind and shape); the last to arrive carries it out.

template <class Compute>
inline void wg_collective(uint64_t sig, const char* name, const WgArrival& mine, Compute compute) {
  State& s = state();
  Thread& t = *s.current;
  const int w = t.linear / 128;
  if ((w + 1) * 128 > s.nthreads)
    fail(std::string(name) + " in warpgroup " + std::to_string(w) + ", which the block does not fill");
  Warpgroup& g = sm90().warpgroups[w];
  if (g.arrived == 0) {
    g.sig = sig;
    g.name = name;
  } else if (g.sig != sig) {
    fail("threads of warpgroup " + std::to_string(w) + " reached different warpgroup-wide instructions (" + name +
         " and " + g.name + ")");
  }
  g.in[t.linear % 128] = mine;
  if (++g.arrived == 128) {
    g.arrived = 0;
    compute(g);
    for (int i = 128 * w; i < 128 * (w + 1); ++i)
      if (s.threads[i].wait == Wait::kWarpgroup) s.threads[i].wait = Wait::kNone;
  } else {
    t.wait = Wait::kWarpgroup;
    yield();
  }
}

struct Operand {
  uint32_t start, lbo, sbo;
  bool swizzled;
};

inline Operand decode_descriptor(uint64_t desc, const char* which) {
  constexpr uint64_t kFields = 0x3fffull | (0x3fffull << 16) | (0x3fffull << 32) | (7ull << 49) | (3ull << 62);
  if (desc & ~kFields) fail(std::string("wgmma: descriptor of ") + which + " sets reserved bits");
  if ((desc >> 49) & 7) fail(std::string("wgmma: descriptor of ") + which + " has a base offset (not modelled)");
  const int mode = static_cast<int>(desc >> 62);
  if (mode == 2 || mode == 3)
    fail(std::string("wgmma: descriptor of ") + which + " uses the 64B/32B swizzle (not modelled)");
  const Operand o{static_cast<uint32_t>(desc & 0x3fff) << 4, static_cast<uint32_t>((desc >> 16) & 0x3fff) << 4,
                  static_cast<uint32_t>((desc >> 32) & 0x3fff) << 4, mode == 1};
  if (o.swizzled && ((o.start >> 7) & 7) != 0)
    fail(std::string("wgmma: 128B-swizzled ") + which + " starts at shared address " + std::to_string(o.start) +
         ", not in the first row of a 1024-byte-aligned swizzle atom (base offset 0)");
  return o;
}

// byte address of element (mn, k) of a 16-bit operand (the rules in the header comment)
inline uint32_t operand_address(const Operand& o, bool k_major, int mn, int k, const char* which) {
  if (!o.swizzled) {
    if (k_major) return o.start + (mn % 8) * 16 + (mn / 8) * o.sbo + (k % 8) * 2 + (k / 8) * o.lbo;
    return o.start + (mn % 8) * 2 + (mn / 8) * o.sbo + (k % 8) * 16 + (k / 8) * o.lbo;
  }
  const uint32_t row_base = o.start & ~127u;
  uint32_t in_row, rest;
  if (k_major) {
    in_row = (o.start & 127u) + 2 * k;
    rest = (mn % 8) * 128 + (mn / 8) * o.sbo;
  } else {
    in_row = (o.start & 127u) + 2 * (mn % 64);
    rest = (mn / 64) * o.lbo + (k % 8) * 128 + (k / 8) * o.sbo;
  }
  if (in_row >= 128) fail(std::string("wgmma: ") + which + " runs past the 128-byte row of its swizzle atom");
  return swizzle_128b(row_base + in_row + rest);
}

inline float operand_element(const Operand& o, bool k_major, int mn, int k, bool bf16, const char* which) {
  uint16_t bits;
  std::memcpy(&bits, shared_bytes(operand_address(o, k_major, mn, k, which), 2, 2, "wgmma"), 2);
  return half_bits_to_float(bits, bf16);
}

// Reads the operands now and writes the accumulators of every thread (or keeps them for a
// chained wgmma still in flight on the same registers).
inline void retire(Warpgroup& g, WgmmaOp& op) {
  const int n = op.n, regs = n / 2;
  static thread_local std::vector<float> A, B;  // A[64][16], B[16][n]
  A.assign(64 * 16, 0.f);
  B.assign(16 * n, 0.f);
  if (op.a_in_smem) {
    const Operand a = decode_descriptor(op.desc_a, "A");
    for (int m = 0; m < 64; ++m)
      for (int k = 0; k < 16; ++k) A[m * 16 + k] = operand_element(a, true, m, k, op.bf16, "A");
  } else {
    for (int t = 0; t < 128; ++t) {
      const int w = t / 32, grp = (t % 32) / 4, q = t % 4;
      for (int r = 0; r < 4; ++r)
        for (int h = 0; h < 2; ++h) {
          const int row = 16 * w + grp + 8 * (r & 1), col = 2 * q + h + 8 * (r >> 1);
          A[row * 16 + col] = half_bits_to_float(static_cast<uint16_t>(op.a[t][r] >> (16 * h)), op.bf16);
        }
    }
  }
  const Operand b = decode_descriptor(op.desc_b, "B");
  const bool b_k_major = op.a_in_smem;  // wgmma_ss: B K-major; wgmma_rs: B MN-major
  for (int k = 0; k < 16; ++k)
    for (int j = 0; j < n; ++j) B[k * n + j] = operand_element(b, b_k_major, j, k, op.bf16, "B");
  std::vector<float> out(regs);
  for (int t = 0; t < 128; ++t) {
    const int w = t / 32, grp = (t % 32) / 4, q = t % 4;
    InFlight& f = g.inflight.at(op.d[t]);
    for (int i = 0; i < regs; ++i) {
      const int row = 16 * w + grp + 8 * ((i >> 1) & 1), col = 8 * (i >> 2) + 2 * q + (i & 1);
      double acc = !op.accumulate ? 0.0 : op.chained[t] ? f.value[i] : op.c[t * regs + i];
      for (int k = 0; k < 16; ++k) acc += static_cast<double>(A[row * 16 + k]) * B[k * n + col];
      out[i] = static_cast<float>(acc);
    }
    f.value = out;
    if (--f.count == 0) {
      std::memcpy(op.d[t], out.data(), regs * sizeof(float));
      g.inflight.erase(op.d[t]);
    }
  }
  op.done = true;
}

inline void wgmma(bool a_in_smem, int n, bool bf16, float* d, const uint32_t* a, uint64_t desc_a, uint64_t desc_b,
                  bool accumulate) {
  WgArrival mine{desc_a, desc_b, {0, 0, 0, 0}, d, accumulate};
  if (a != nullptr) std::memcpy(mine.a, a, sizeof(mine.a));
  const uint64_t sig = (uint64_t{1} << 40) | (uint64_t{a_in_smem} << 20) | (uint64_t{bf16} << 16) | n;
  wg_collective(sig, a_in_smem ? "wgmma.mma_async (A in shared memory)" : "wgmma.mma_async (A in registers)", mine,
                [&](Warpgroup& g) {
                  State& s = state();
                  ++s.stats.wgmma;
                  if (!g.fenced)
                    fail("wgmma.mma_async without a wgmma.fence since the warpgroup's last wgmma.wait_group (PTX "
                         "requires the fence before the first wgmma and after the registers are touched)");
                  const WgArrival& first = g.in[0];
                  for (const WgArrival& x : g.in)
                    if (x.desc_a != first.desc_a || x.desc_b != first.desc_b || x.accumulate != first.accumulate)
                      fail("wgmma.mma_async with descriptors or scale-d differing across the warpgroup");
                  if (a_in_smem) decode_descriptor(first.desc_a, "A");
                  decode_descriptor(first.desc_b, "B");
                  const int regs = n / 2;
                  WgmmaOp op{a_in_smem, n, bf16, first.accumulate, first.desc_a, first.desc_b, {}, {}, {}, {}};
                  op.c.assign(128 * regs, 0.f);
                  for (int t = 0; t < 128; ++t) {
                    float* const dt = g.in[t].d;
                    op.d[t] = dt;
                    std::memcpy(op.a[t].data(), g.in[t].a, sizeof(g.in[t].a));
                    auto it = g.inflight.find(dt);
                    op.chained[t] = it != g.inflight.end();
                    if (op.chained[t]) {
                      if (it->second.n != n) fail("wgmma.mma_async on accumulators in flight with another N");
                      ++it->second.count;
                    } else {
                      for (const auto& [p, f] : g.inflight)
                        if (p < dt + regs && dt < p + f.n / 2)
                          fail("wgmma.mma_async on accumulators overlapping another in-flight wgmma's");
                      g.inflight[dt] = InFlight{n, 1, {}};
                      std::memcpy(&op.c[t * regs], dt, regs * sizeof(float));
                    }
                  }
                  if (s.options.late_copies) {  // the registers are the hardware's until wgmma.wait_group
                    for (int t = 0; t < 128; ++t)
                      std::fill(op.d[t], op.d[t] + regs, std::numeric_limits<float>::quiet_NaN());
                  } else {
                    retire(g, op);
                  }
                  g.open.push_back(std::move(op));
                });
}

}  // namespace emu

namespace cuda {

using TmaMap = emu::TmaMap;

inline void mbar_init(uint32_t bar, uint32_t count) {
  emu::shared_bytes(bar, 8, 8, "mbarrier.init");
  if (count == 0 || count >= (1u << 20)) emu::fail("mbarrier.init with a count outside 1 .. 2^20 - 1");
  auto& bars = emu::sm90().bars;
  if (bars.count(bar)) emu::fail("mbarrier.init on shared address " + std::to_string(bar) + ", already an mbarrier");
  bars[bar] = emu::Mbarrier{count, count, 0, 0, {}};
}
inline void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  emu::arrive(bar, bytes, "mbarrier.arrive.expect_tx");
}
inline void mbar_arrive(uint32_t bar) { emu::arrive(bar, 0, "mbarrier.arrive"); }
inline void mbar_wait(uint32_t bar, uint32_t parity) { emu::mbarrier_wait(bar, parity); }
inline void named_barrier_sync(int id, int count) { emu::named_barrier(id, count, true); }
inline void named_barrier_arrive(int id, int count) { emu::named_barrier(id, count, false); }
inline void fence_barrier_init() {}
inline void fence_view_async_shared() {}

inline void tma_load_4d(uint32_t dst, const TmaMap& map, uint32_t bar, int32_t c0, int32_t c1, int32_t c2,
                        int32_t c3) {
  emu::tma_load(dst, map, bar, {c0, c1, c2, c3});
}

// The rules of cuTensorMapEncodeTiled that apply to this map (CUDA driver API).
inline std::string encode_tma_map(TmaMap* map, const void* base, const int64_t dims[4],
                                  const int64_t strides_bytes[3], int box0, int box1) {
  if (map == nullptr) return "tensor map pointer is null";
  if (base == nullptr || reinterpret_cast<uintptr_t>(base) % 16 != 0) return "global address must be 16-byte aligned";
  for (int i = 0; i < 4; ++i)
    if (dims[i] < 1 || dims[i] > (int64_t{1} << 32))
      return "dims[" + std::to_string(i) + "] = " + std::to_string(dims[i]) + " outside 1 .. 2^32";
  for (int i = 0; i < 3; ++i)
    if (strides_bytes[i] % 16 != 0 || strides_bytes[i] <= 0 || strides_bytes[i] >= (int64_t{1} << 40))
      return "strides_bytes[" + std::to_string(i) + "] = " + std::to_string(strides_bytes[i]) +
             " must be a positive multiple of 16 below 2^40";
  if (box0 < 1 || box0 > 256 || box1 < 1 || box1 > 256) return "box dims must be in 1 .. 256";
  if ((box0 * 2) % 16 != 0) return "box0 * 2 bytes must be a multiple of 16";
  if (box0 * 2 > 128) return "box0 * 2 bytes must be at most 128 with the 128-byte swizzle";
  *map = TmaMap{};
  map->magic = TmaMap::kMagic;
  map->base = static_cast<const char*>(base);
  for (int i = 0; i < 4; ++i) map->dims[i] = dims[i];
  for (int i = 0; i < 3; ++i) map->strides[i + 1] = strides_bytes[i];
  map->box0 = box0;
  map->box1 = box1;
  return "";
}

inline void wgmma_fence() {
  emu::wg_collective(2ull << 40, "wgmma.fence", {}, [](emu::Warpgroup& g) { g.fenced = true; });
}
inline void wgmma_commit() {
  emu::wg_collective(3ull << 40, "wgmma.commit_group", {}, [](emu::Warpgroup& g) {
    g.groups.push_back(std::move(g.open));
    g.open.clear();
  });
}
template <int kPending>
inline void wgmma_wait() {
  static_assert(kPending >= 0 && kPending <= 7, "wgmma.wait_group takes 0 .. 7");
  emu::wg_collective((4ull << 40) | kPending, "wgmma.wait_group", {}, [](emu::Warpgroup& g) {
    while (static_cast<int>(g.groups.size()) > kPending) {
      for (emu::WgmmaOp& op : g.groups.front())
        if (!op.done) emu::retire(g, op);
      g.groups.pop_front();
    }
    g.fenced = false;
  });
}
template <int N, bool kBf16>
inline void wgmma_ss(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
  static_assert(N % 8 == 0 && N >= 8 && N <= 256, "wgmma m64nNk16: N is a multiple of 8 in 8 .. 256");
  emu::wgmma(true, N, kBf16, d, nullptr, desc_a, desc_b, accumulate);
}
template <int N, bool kBf16>
inline void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b, bool accumulate) {
  static_assert(N % 8 == 0 && N >= 8 && N <= 256, "wgmma m64nNk16: N is a multiple of 8 in 8 .. 256");
  emu::wgmma(false, N, kBf16, d, a, 0, desc_b, accumulate);
}
template <int kRegs>
inline void setmaxnreg_inc() {
  static_assert(kRegs >= 24 && kRegs <= 256 && kRegs % 8 == 0, "setmaxnreg: 24 .. 256, a multiple of 8");
  emu::wg_collective((5ull << 40) | kRegs, "setmaxnreg.inc", {}, [](emu::Warpgroup&) {});
}
template <int kRegs>
inline void setmaxnreg_dec() {
  static_assert(kRegs >= 24 && kRegs <= 256 && kRegs % 8 == 0, "setmaxnreg: 24 .. 256, a multiple of 8");
  emu::wg_collective((6ull << 40) | kRegs, "setmaxnreg.dec", {}, [](emu::Warpgroup&) {});
}

}  // namespace cuda
}  // namespace attnkern
