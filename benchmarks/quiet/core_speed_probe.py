"""Does each core of this machine keep its speed over time, and do the two cores slow down
together or each on its own?

One child process per core (pinned with sched_setaffinity, one torch thread) runs a fixed
matrix multiply back to back and records its GFLOP/s in consecutive windows of WINDOW_S: a
bf16 512^3 torch.mm (oneDNN's AMX path on this Xeon) or an fp32 256^3 one (AVX-512 FMAs).
Three conditions, one after the other: both cores at once, core 0 alone, core 1 alone (the
other core idle). Nothing of attnkern runs: a dip here is the machine's, not a kernel's.

A window counts as a dip when it runs below DIP_FRACTION of that core's 90th percentile in the
same condition. Printed and saved per condition and core: median and p90 GFLOP/s, the share
of windows in a dip, the longest dip (consecutive windows), and, with both cores running, how
often both dipped in the same window against what independent dips would give.

usage: python core_speed_probe.py SECONDS OUT.json [bf16|fp32]   (run from outside the checkout)"""
import json
import multiprocessing as mp
import os
import statistics
import sys
import time

WINDOW_S = 0.25
DIP_FRACTION = 0.75


def _run(core, seconds, kind, queue):
    os.sched_setaffinity(0, {core})
    import torch

    torch.set_num_threads(1)
    n, dtype = (512, torch.bfloat16) if kind == "bf16" else (256, torch.float32)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    c = torch.empty(n, n, dtype=dtype)
    for _ in range(20):
        torch.mm(a, b, out=c)
    windows = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0, calls = time.perf_counter(), 0
        while time.perf_counter() - t0 < WINDOW_S:
            torch.mm(a, b, out=c)
            calls += 1
        t1 = time.perf_counter()
        windows.append((round(t0 - start, 3), round(2 * n**3 * calls / (t1 - t0) / 1e9, 1)))
    queue.put((core, windows))


def _condition(cores, seconds, kind):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_run, args=(c, seconds, kind, queue)) for c in cores]
    for p in procs:
        p.start()
    got = dict(queue.get() for _ in procs)
    for p in procs:
        p.join()
    return got


def _summary(windows):
    speeds = [s for _, s in windows]
    p90 = statistics.quantiles(speeds, n=10)[-1]
    dips = [s < DIP_FRACTION * p90 for s in speeds]
    longest = run = 0
    for d in dips:
        run = run + 1 if d else 0
        longest = max(longest, run)
    return dict(windows=len(speeds), median_gflops=statistics.median(speeds), p90_gflops=p90,
                min_gflops=min(speeds), dip_share=sum(dips) / len(dips), longest_dip_s=longest * WINDOW_S), dips


def main():
    seconds, out_path = float(sys.argv[1]), sys.argv[2]
    kind = sys.argv[3] if len(sys.argv) > 3 else "bf16"
    out = {"what": __doc__.split("\n")[0], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "kind": kind, "window_s": WINDOW_S, "dip_fraction": DIP_FRACTION, "seconds": seconds,
           "cpus": os.cpu_count(), "loadavg_1m_start": os.getloadavg()[0], "conditions": {}}
    for name, cores in (("both", (0, 1)), ("core0_alone", (0,)), ("core1_alone", (1,))):
        got = _condition(cores, seconds, kind)
        cond = {"per_core": {}, "trace": {str(c): w for c, w in got.items()}}
        dips = {}
        for c, w in sorted(got.items()):
            cond["per_core"][str(c)], dips[c] = _summary(w)
            s = cond["per_core"][str(c)]
            print(f"{name:12s} core {c}: median {s['median_gflops']:7.1f} GF/s, p90 {s['p90_gflops']:7.1f}, "
                  f"min {s['min_gflops']:7.1f}, in a dip {100 * s['dip_share']:4.1f}% of windows, "
                  f"longest dip {s['longest_dip_s']:.2f} s", flush=True)
        if len(got) == 2:
            n = min(len(dips[0]), len(dips[1]))
            both = sum(dips[0][i] and dips[1][i] for i in range(n)) / n
            independent = (sum(dips[0][:n]) / n) * (sum(dips[1][:n]) / n)
            cond["both_dipped_share"], cond["both_dipped_if_independent"] = both, independent
            print(f"{name:12s} both cores in a dip: {100 * both:.1f}% of windows "
                  f"(independent dips would give {100 * independent:.1f}%)", flush=True)
        out["conditions"][name] = cond
    out["loadavg_1m_end"] = os.getloadavg()[0]
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
