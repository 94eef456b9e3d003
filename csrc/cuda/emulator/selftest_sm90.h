// A self-test of the emulated sm90 instructions (ptx_sm90_emu.h), run by emulator.cpp's
// selftest_sm90 and checked against torch float64 matmul in tests/test_cuda_emu_sm90.py.
//
// One CTA of 128 + 32 threads: warpgroup 0 computes, warp 4 produces. The producer loads
// operands with emulated TMA (128-byte swizzle, out-of-bounds rows zero-filled) and writes
// others into shared memory itself, in the canonical layouts as read from the PTX ISA (the
// formulas below are written out here on their own, not taken from the emulator), and hands
// them over through mbarriers; the warpgroup runs wgmma over several k-steps.
//   ss: D (64 x N) = A (64 x K, K-major SW128, TMA from rows -2 .. 61 of a 64-row tensor)
//                    * B^T (B: N x K, K-major SW128, written by the producer warp)
//   rs: D (64 x N) = A (64 x K, registers) * V (K x N, MN-major SW128, TMA in rounds of 64
//                    rows through one stage guarded by full/empty mbarriers; the tensor has
//                    K - 3 rows, so the last three are zero-filled)
// `fault` injects one mistake a kernel could make, for the negative tests.
#pragma once

#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>

#include <random>
#include <string>
#include <vector>

#include "ptx_sm90_emu.h"

namespace attnkern {
namespace sm90_selftest {

using cuda::smem_raw;

// descriptor fields as the PTX ISA encodes them: (x & 0x3FFFF) >> 4 per address/offset
inline uint64_t make_desc(uint32_t start, uint32_t lbo, uint32_t sbo, uint64_t swizzle_mode) {
  return ((start & 0x3FFFF) >> 4) | (uint64_t{(lbo & 0x3FFFF) >> 4} << 16) | (uint64_t{(sbo & 0x3FFFF) >> 4} << 32) |
         (swizzle_mode << 62);
}
constexpr uint64_t kSwizzle128 = 1;

// K-major SW128 tile of `rows` x K: 64-column blocks of rows * 128 bytes; in a block, row r's
// 16-byte chunk c sits at chunk c ^ (r % 8) (the tile starts 1024-byte aligned)
inline uint32_t k_major_offset(int row, int col, int rows) {
  const int block = col / 64, c = col % 64;
  return block * rows * 128 + row * 128 + (((c / 8) ^ (row % 8)) * 16) + (c % 8) * 2;
}

inline uint16_t to_bits(float x, bool bf16) {
  return bf16 ? __float2bfloat16_rn(x).bits : __float2half_rn(x).bits;
}

struct Case {
  bool rs;
  int n, k;
};

template <int N, bool kBf16>
pybind11::dict run_case(const Case& cs, uint64_t seed, const std::string& fault) {
  const int K = cs.k;
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> normal;
  const int b_rows = cs.rs ? K : N, b_cols = cs.rs ? N : K;
  std::vector<uint16_t> a_bits(64 * K), b_bits(b_rows * b_cols);
  for (auto& x : a_bits) x = to_bits(normal(gen), kBf16);
  for (auto& x : b_bits) x = to_bits(normal(gen), kBf16);
  const int v_rows = K - 3;  // rs: rows of V that exist; the box reads past them

  cuda::TmaMap map_a, map_v;
  {
    const int64_t dims_a[4] = {K, 64, 1, 1}, strides_a[3] = {2 * K, 2 * K * 64, 2 * K * 64};
    const int64_t dims_v[4] = {N, v_rows, 1, 1}, strides_v[3] = {2 * N, 2 * N * K, 2 * N * K};
    std::string why = cuda::encode_tma_map(&map_a, a_bits.data(), dims_a, strides_a, 64, 64);
    if (why.empty()) why = cuda::encode_tma_map(&map_v, b_bits.data(), dims_v, strides_v, 64, 64);
    TORCH_CHECK(why.empty(), "encode_tma_map: ", why);
  }
  emu::State& st = emu::state();
  const char* a_ptr = reinterpret_cast<const char*>(a_bits.data());
  const char* b_ptr = reinterpret_cast<const char*>(b_bits.data());
  st.readable = {{a_ptr, a_ptr + a_bits.size() * 2}, {b_ptr, b_ptr + b_bits.size() * 2}};

  at::Tensor out = at::full({64, N}, std::numeric_limits<float>::quiet_NaN(), at::kFloat);
  float* const out_p = out.data_ptr<float>();

  const std::function<void()> body = [&] {
    const int tid = static_cast<int>(threadIdx.x);
    const uint32_t base = cuda::smem_addr(smem_raw);
    const uint32_t full = base, empty = base + 8, b_ready = base + 16;
    const uint32_t sA = base + 1024, sB = sA + 16384;
    if (tid == 0) {
      cuda::mbar_init(full, 1);
      cuda::mbar_init(empty, 128);
      cuda::mbar_init(b_ready, 32);
      cuda::fence_barrier_init();
    }
    __syncthreads();
    if (tid >= 128) {  // producer warp
      const int lane = tid - 128;
      if (!cs.rs) {
        if (lane == 0) {
          const uint32_t bytes = 64 * K * 2;
          cuda::mbar_arrive_expect_tx(full, fault == "expect_too_few" ? bytes - 128 : bytes);
          for (int j = 0; j < K / 64; ++j) cuda::tma_load_4d(sA + j * 64 * 128, map_a, full, 64 * j, -2, 0, 0);
        }
        for (int row = lane; row < N; row += 32)
          for (int col = 0; col < K; ++col)
            std::memcpy(emu::shared_bytes(sB + k_major_offset(row, col, N), 2, 2, "selftest"), &b_bits[row * K + col],
                        2);
        cuda::fence_view_async_shared();
        cuda::mbar_arrive(b_ready);
      } else {
        for (int j = 0; j < K / 64; ++j) {
          if (j > 0) cuda::mbar_wait(empty, (j - 1) & 1);
          if (lane == 0) {
            cuda::mbar_arrive_expect_tx(full, 64 * N * 2);
            for (int nb = 0; nb < N / 64; ++nb) cuda::tma_load_4d(sB + nb * 64 * 128, map_v, full, 64 * nb, 64 * j, 0, 0);
          }
        }
      }
      return;
    }
    cuda::setmaxnreg_inc<240>();
    // the warpgroup: lane coordinates of the fragment layouts
    const int w = tid / 32, g = (tid % 32) / 4, q = tid % 4;
    float d[N / 2];
    auto store = [&] {
      for (int i = 0; i < N / 2; ++i)
        out_p[(16 * w + g + 8 * ((i >> 1) & 1)) * N + 8 * (i >> 2) + 2 * q + (i & 1)] = d[i];
    };
    if (fault == "deadlock") cuda::mbar_wait(empty, 0);  // nobody arrives on it in phase 0
    if (!cs.rs) {
      if (fault != "skip_full_wait") cuda::mbar_wait(full, 0);
      cuda::mbar_wait(b_ready, 0);
      if (fault != "no_fence") cuda::wgmma_fence();
      for (int ks = 0; ks < K / 16; ++ks) {
        // k-step ks: 64-column block ks / 4, 32 bytes further into the 128-byte rows per step
        uint32_t a_start = sA + (ks / 4) * 64 * 128 + (ks % 4) * 32;
        if (fault == "misaligned") a_start += 512;
        const uint64_t da = make_desc(a_start, 16, 1024, kSwizzle128);
        const uint64_t db = make_desc(sB + (ks / 4) * N * 128 + (ks % 4) * 32, 16, 1024, kSwizzle128);
        cuda::wgmma_ss<N, kBf16>(d, da, db, ks > 0);
      }
      cuda::wgmma_commit();
      if (fault == "read_before_wait") store();
      if (fault != "no_wait") cuda::wgmma_wait<0>();
      if (fault != "read_before_wait") store();
      return;
    }
    const uint16_t* const a = a_bits.data();
    for (int j = 0; j < K / 64; ++j) {
      cuda::mbar_wait(full, j & 1);
      cuda::wgmma_fence();
      for (int kk = 0; kk < 4; ++kk) {
        const int k0 = 64 * j + 16 * kk, r0 = 16 * w + g;
        auto pair = [&](int row, int col) {
          return uint32_t{a[row * K + col]} | (uint32_t{a[row * K + col + 1]} << 16);
        };
        const uint32_t frag[4] = {pair(r0, k0 + 2 * q), pair(r0 + 8, k0 + 2 * q), pair(r0, k0 + 2 * q + 8),
                                  pair(r0 + 8, k0 + 2 * q + 8)};
        // MN-major: 64-column blocks of V 64 * 128 bytes apart (LBO), 8-row groups 1024 (SBO);
        // a k-step of 16 rows is two groups
        const uint64_t db = make_desc(sB + kk * 2048, 64 * 128, 1024, kSwizzle128);
        cuda::wgmma_rs<N, kBf16>(d, frag, db, j > 0 || kk > 0);
        if (kk == 1) cuda::wgmma_commit();  // two groups per round, the second chained on the first
      }
      cuda::wgmma_commit();
      cuda::wgmma_wait<1>();
      cuda::wgmma_wait<0>();
      cuda::mbar_arrive(empty);
    }
    store();
  };
  emu::run_grid(dim3(1), 160, 1024 + 16384 + 32768, body);
  st.readable.clear();

  auto as_float = [](const std::vector<uint16_t>& bits, int rows, int cols) {
    at::Tensor t = at::empty({rows, cols}, at::kFloat);
    for (int i = 0; i < rows * cols; ++i) t.data_ptr<float>()[i] = emu::half_bits_to_float(bits[i], kBf16);
    return t;
  };
  pybind11::dict r;
  r["rs"] = cs.rs;
  r["n"] = N;
  r["k"] = K;
  r["bf16"] = kBf16;
  r["a"] = as_float(a_bits, 64, K);  // the tensors as stored; the test applies the TMA offsets
  r["b"] = as_float(b_bits, b_rows, b_cols);
  r["d"] = out;
  return r;
}

template <bool kBf16>
pybind11::dict run_any(const Case& cs, uint64_t seed, const std::string& fault) {
  if (cs.n == 64) return run_case<64, kBf16>(cs, seed, fault);
  return run_case<128, kBf16>(cs, seed, fault);
}

// Every case (fault == ""), or one small case with `fault` injected.
inline pybind11::list selftest(uint64_t seed, bool late_copies, const std::string& fault) {
  emu::state().options = {late_copies, 0, seed};
  emu::state().stats = {};
  pybind11::list results;
  if (!fault.empty()) {
    results.append(run_any<false>({false, 64, 64}, seed, fault));
    return results;
  }
  uint64_t i = 0;
  for (bool bf16 : {false, true})
    for (bool rs : {false, true})
      for (int n : {64, 128})
        for (int k : {64, 128}) {
          const Case cs{rs, n, k};
          results.append(bf16 ? run_any<true>(cs, seed + ++i, "") : run_any<false>(cs, seed + ++i, ""));
        }
  return results;
}

}  // namespace sm90_selftest
}  // namespace attnkern
