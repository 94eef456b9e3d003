// Why the avx512_bf16 variant's forward is slower than the avx512 conversion path on some CPUs:
// the multiply rate of vdpbf16ps against fp32 FMA, first as bare instructions, then as the
// forward's two block products (csrc/cpu/gemm.h against csrc/cpu/gemm_dpbf16.h) at the tile
// shape the kernels use. One thread; prints one JSON object. Built and run by
// benchmarks/bench_cpu_dot_rate.py (g++ -O2 -I csrc/cpu).
//
// Instructions: `chains` independent accumulators updated in a loop. One chain gives the
// latency, 24 chains (more than latency x throughput on any core we know) the throughput; then
// 16 FMA chains and 8 vdpbf16ps chains in one loop, to see whether the two share units.
// A vfmadd231ps zmm does 16 multiply-adds, a vdpbf16ps zmm 32 (two bf16 pairs per fp32 lane).
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")
#endif

#include <array>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "gemm.h"
#include "gemm_dpbf16.h"
#include "simd_avx512.h"

namespace {

using Clock = std::chrono::steady_clock;

// fastest of many short runs of `reps` calls of each of `fns`, ns per call, the functions taking
// turns run by run (so a change of clock speed meets them alike). On a shared, loaded machine a
// run longer than a scheduler time slice is almost always cut, so each run is kept short (tens
// of microseconds) and the minimum taken: other load only adds time.
template <class... F>
std::array<double, sizeof...(F)> best_ns(int reps, F&&... fns) {
  std::array<double, sizeof...(F)> best;
  best.fill(1e300);
  for (int run = 0; run < 1000; ++run) {
    size_t i = 0;
    auto time_one = [&](auto& f) {
      const auto t0 = Clock::now();
      for (int r = 0; r < reps; ++r) f();
      const double ns = std::chrono::duration<double, std::nano>(Clock::now() - t0).count() / reps;
      best[i] = ns < best[i] ? ns : best[i];
      ++i;
    };
    (time_one(fns), ...);
  }
  return best;
}

// the compiler must neither fold the operands nor hoist the chain out of the loop
#define OPAQUE(x) __asm__ volatile("" : "+v"(x))

// NF chains of vfmadd231ps and ND chains of vdpbf16ps, updated in turn
template <int NF, int ND>
__attribute__((noinline)) float chains(int64_t iters) {
  __m512 fma_acc[NF + 1], dp_acc[ND + 1];
  for (int i = 0; i < NF; ++i) fma_acc[i] = _mm512_set1_ps(static_cast<float>(i));
  for (int i = 0; i < ND; ++i) dp_acc[i] = _mm512_set1_ps(static_cast<float>(i));
  __m512 a = _mm512_set1_ps(1.0001f), b = _mm512_set1_ps(0.9999f);
  __m512i pa = _mm512_set1_epi32(0x3f803f80), pb = _mm512_set1_epi32(0x3f7f3f7f);
  for (int64_t t = 0; t < iters; ++t) {
#pragma GCC unroll 32
    for (int i = 0; i < NF; ++i) fma_acc[i] = _mm512_fmadd_ps(a, b, fma_acc[i]);
#pragma GCC unroll 32
    for (int i = 0; i < ND; ++i) dp_acc[i] = _mm512_dpbf16_ps(dp_acc[i], (__m512bh)pa, (__m512bh)pb);
    OPAQUE(a);
    OPAQUE(pa);
  }
  float s = 0.f;
  for (int i = 0; i < NF; ++i) s += _mm512_reduce_add_ps(fma_acc[i]);
  for (int i = 0; i < ND; ++i) s += _mm512_reduce_add_ps(dp_acc[i]);
  return s;
}

volatile float g_sink;

constexpr int64_t kIters = 20000;  // 20000 x 24 instructions: about 0.1-0.3 ms a run

// ns per instruction of fma and dp chains, `N` chains of each
template <int N>
std::array<double, 2> per_instruction() {
  const auto t = best_ns(1, [] { g_sink = chains<N, 0>(kIters); }, [] { g_sink = chains<0, N>(kIters); });
  return {t[0] / (static_cast<double>(kIters) * N), t[1] / (static_cast<double>(kIters) * N)};
}

}  // namespace

int main() {
  if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bf16")) {
    std::printf("{\"error\": \"this CPU has no AVX512_BF16\"}\n");
    return 0;
  }
  const auto [fma_lat, dp_lat] = per_instruction<1>();
  const auto [fma_thr, dp_thr] = per_instruction<24>();
  // both kinds in one loop: if vdpbf16ps ran on units the FMAs leave idle, the loop would take
  // less than the two loops apart (1 - together / apart: the overlap)
  const auto mixed = best_ns(
      1, [] { g_sink = chains<16, 0>(kIters); }, [] { g_sink = chains<0, 8>(kIters); },
      [] { g_sink = chains<16, 8>(kIters); });
  const double overlap = 1.0 - mixed[2] / (mixed[0] + mixed[1]);

  // the forward's products for one tile: S^T = K Q^T (kn x BQ, reduction E) and O += P V
  // (BQ x EV, reduction kn), with the kernels' key block, query tile and the bench's head dim
  constexpr int KN = 128, BQ = 64, E = 64, EV = 64;
  std::vector<float> k(KN * E, 0.01f), qt(E * BQ, 0.02f), st(KN * BQ, 0.5f), v(KN * EV, 0.03f), o(BQ * EV, 0.f);
  std::vector<uint16_t> k16(KN * E, 0x3c23), v16(KN * EV, 0x3cf5);  // bf16 0.01, 0.03
  std::vector<uint32_t> qt2(E / 2 * BQ, 0x3ca33ca3u), p2(KN / 2 * BQ), v2(KN / 2 * EV);
  constexpr int kReps = 4;
  const auto [scores_fp32, scores_dp, pv_fp32, pv_dp] = best_ns(
      kReps, [&] { gemm<VecAVX512, false>(KN, BQ, E, k.data(), E, 1, qt.data(), BQ, st.data(), BQ); },
      [&] {
        dpbf16::gemm(KN, BQ, E / 2, reinterpret_cast<const char*>(k16.data()), E * 2, 4, qt2.data(), BQ, st.data(), BQ,
                     false);
      },
      [&] { gemm<VecAVX512, true>(BQ, EV, KN, st.data(), 1, BQ, v.data(), EV, o.data(), EV); },
      [&] {
        dpbf16::gemm(BQ, EV, KN / 2, reinterpret_cast<const char*>(p2.data()), 4, BQ * 4, v2.data(), EV, o.data(), EV,
                     true);
      });
  // what each path spends besides the products: the dot path packs P (fp32 -> bf16 pairs) and
  // V (pair rows) per tile; the conversion path converts K and V rows (bf16 -> fp32) per tile
  const auto [pack_p, pack_v, convert_kv] = best_ns(
      kReps, [&] { dpbf16::pack_fp32_rows_vnni(st.data(), KN, BQ, p2.data()); },
      [&] { dpbf16::pack_rows_vnni(v16.data(), EV, KN, EV, v2.data(), EV); },
      [&] {
        for (int r = 0; r < KN; ++r)
          for (int c = 0; c < E; c += 16) {
            VecAVX512::load_bf16(k16.data() + r * E + c, 16).store(k.data() + r * E + c);
            VecAVX512::load_bf16(v16.data() + r * EV + c, 16).store(v.data() + r * EV + c);
          }
      });
  g_sink = st[7] + o[9];

  const double macs = static_cast<double>(KN) * BQ * E;
  std::printf(
      "{\"instructions\": {\"vfmadd231ps_zmm\": {\"latency_ns\": %.4f, \"throughput_ns\": %.4f, \"mac_per_ns\": %.2f}, "
      "\"vdpbf16ps_zmm\": {\"latency_ns\": %.4f, \"throughput_ns\": %.4f, \"mac_per_ns\": %.2f}, "
      "\"dpbf16_vs_fma_mac_rate\": %.3f, \"fma_dpbf16_overlap\": %.3f},\n"
      " \"tile\": {\"kn\": %d, \"block_q\": %d, \"head_dim\": %d, "
      "\"scores_ns\": {\"fp32_fma\": %.0f, \"vdpbf16ps\": %.0f}, \"pv_ns\": {\"fp32_fma\": %.0f, \"vdpbf16ps\": %.0f}, "
      "\"dpbf16_vs_fma_products_speed\": %.3f, "
      "\"pack_p_ns\": %.0f, \"pack_v_ns\": %.0f, \"convert_k_and_v_ns\": %.0f, "
      "\"products_mac_per_ns\": {\"fp32_fma\": %.2f, \"vdpbf16ps\": %.2f}}}\n",
      fma_lat, fma_thr, 16 / fma_thr, dp_lat, dp_thr, 32 / dp_thr, (32 / dp_thr) / (16 / fma_thr), overlap, KN, BQ, E,
      scores_fp32, scores_dp, pv_fp32, pv_dp, (scores_fp32 + pv_fp32) / (scores_dp + pv_dp), pack_p, pack_v,
      convert_kv, 2 * macs / (scores_fp32 + pv_fp32), 2 * macs / (scores_dp + pv_dp));
  return 0;
}
