"""Issue 10's GQA decode case (bf16, L=1, S=8192, 32/8 heads, D=128): its 1 -> 2 thread scaling
timed as back-to-back pairs (one call at 1 thread, then one at 2) for SECONDS seconds.

Printed and saved: the ratio of the median times, the median of the per-pair ratios, and the
per-second medians of the pairs (how much the answer moves within one run; see
core_speed_probe.py for the machine's per-core speed over time).

With --with-mm, the same pairs are also timed for a plain fp32 torch.mm whose one-thread time is
close to the decode call's (MM_N^3), one second of each subject at a time in alternation: how far
a call of this length scales on this machine when the work is torch's own GEMM.

usage: python decode_pair_scaling.py SECONDS OUT.json [--with-mm]   (run from outside the checkout)"""
import json
import os
import statistics
import sys
import time

import torch

import attnkern
from attnkern.bench.report import cpu_name

# the benchmark's own case and pair timer (benchmarks/test_cpu_vs_torch.py)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from test_cpu_vs_torch import at_threads, scaling_pairs, scaling_summary, thread_scaling_case  # noqa: E402


MM_N = 576  # about 6 ms at one thread on the AMD EPYC of stop 23, as the decode call there


def summary(pairs) -> dict:
    sm = scaling_summary(pairs)
    return {"pairs": len(pairs), "t1_median_ms": sm["t1"] * 1e3, "t2_median_ms": sm["t2"] * 1e3,
            "ratio_of_medians": sm["ratio_of_medians"], "median_pair_ratio": sm["median_pair_ratio"],
            "pair_ratio_p10": sm["p10"], "pair_ratio_p90": sm["p90"]}


def with_mm(call, seconds, out):
    a, b = torch.randn(MM_N, MM_N), torch.randn(MM_N, MM_N)
    subjects = {"attnkern decode": call, f"torch.mm fp32 {MM_N}^3": lambda: a @ b}
    pairs = {name: [] for name in subjects}
    for second in range(int(seconds)):  # one second of each subject, in turn
        for name, fn in subjects.items():
            pairs[name] += scaling_pairs(fn, 1.0, min_pairs=1)
    out["subjects"] = {name: summary(p) for name, p in pairs.items()}
    for name, sm in out["subjects"].items():
        print(f"{name}: {sm['pairs']} pairs, 1t {sm['t1_median_ms']:.3f} ms, 2t {sm['t2_median_ms']:.3f} ms, "
              f"median pair ratio {sm['median_pair_ratio']:.3f} (p10 {sm['pair_ratio_p10']:.2f}, "
              f"p90 {sm['pair_ratio_p90']:.2f}), ratio of medians {sm['ratio_of_medians']:.3f}")


def main():
    seconds, out_path = float(sys.argv[1]), sys.argv[2]
    call, _ = thread_scaling_case("decode_gqa_bf16")
    for _ in range(4):  # (scaling_pairs warms up with a fifth pair)
        at_threads(call, 1)(), at_threads(call, 2)()
    if "--with-mm" in sys.argv[3:]:
        out = {"what": "GQA decode and torch.mm, 1 -> 2 thread pairs, alternating seconds",
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
               "cpu": cpu_name(), "isa": attnkern.ops._C.cpu_isa(), "parallel": attnkern.ops._C.cpu_parallel(),
               "seconds_each": int(seconds)}
        with_mm(call, seconds, out)
        out["loadavg_1m_end"] = os.getloadavg()[0]
        with open(out_path, "w") as f:
            json.dump(out, f, indent=1)
        return
    pairs = scaling_pairs(call, seconds, min_pairs=1)
    sm = scaling_summary(pairs)
    per_second = {}
    for at, a, b in pairs:
        per_second.setdefault(int(at), []).append((a, b))
    windows = [round(statistics.median(a for a, _ in w) / statistics.median(b for _, b in w), 3)
               for _, w in sorted(per_second.items())]
    out = {"what": __doc__.split("\n")[0], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "torch": torch.__version__, "isa": attnkern.ops._C.cpu_isa(), "parallel": attnkern.ops._C.cpu_parallel(),
           "loadavg_1m_end": os.getloadavg()[0], "seconds": seconds, **summary(pairs),
           "per_second_ratio_of_medians": windows}
    print(f"{len(pairs)} pairs over {seconds:.0f} s: 1t {sm['t1'] * 1e3:.3f} ms, 2t {sm['t2'] * 1e3:.3f} ms, ratio of "
          f"medians {sm['ratio_of_medians']:.3f}, median pair ratio {sm['median_pair_ratio']:.3f} (p10 {sm['p10']:.2f}, "
          f"p90 {sm['p90']:.2f}); per second {min(windows):.2f}..{max(windows):.2f}")
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
