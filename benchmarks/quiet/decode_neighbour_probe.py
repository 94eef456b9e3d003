"""Is one thread's speed set by what the other core does? attnkern at 1 thread (bf16 GQA decode
L=1 S=8192 H32/8 D128, and dense fp32 forward L=1024 H8 D64), timed while the other core is
idle, runs a compute loop (small fp32 matmuls that stay in L1/L2), or streams memory (a copy
of 256 MiB, or of 16 MiB that stays in the shared L3: "llc"). Rounds in random order; medians,
and per round the ratio to that round's idle time.

usage: python decode_neighbour_probe.py ROUNDS OUT.json   (run from outside the checkout;
the 7rounds-a JSON is from the first version, before the "llc" condition)"""
import json, multiprocessing as mp, os, random, statistics, sys, time

CONDITIONS = ("idle", "compute", "memory", "llc")  # what the other core does


def neighbour(kind, stop):
    import torch
    torch.set_num_threads(1)
    if kind == "compute":
        a, b = torch.randn(64, 64), torch.randn(64, 64)
        while not stop.is_set():
            for _ in range(2000):
                torch.mm(a, b)
    elif kind in ("memory", "llc"):
        src = torch.randn(64 << 20 if kind == "memory" else 4 << 20)  # 256 MiB, or 16 MiB (LLC-sized)
        dst = torch.empty_like(src)
        while not stop.is_set():
            dst.copy_(src)
    else:
        stop.wait()


def main():
    import torch, attnkern
    torch.set_num_threads(1)
    torch.manual_seed(0)
    q = torch.randn(1, 32, 1, 128, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 8, 8192, 128, dtype=torch.bfloat16) for _ in range(2))
    qd, kd, vd = (torch.randn(1, 8, 1024, 64) for _ in range(3))
    cases = {"decode_bf16": lambda: torch.ops.attnkern.fwd(q, k, v, None, None, 128 ** -0.5, -1, -1, False, 0.0),
             "dense_fp32": lambda: torch.ops.attnkern.fwd(qd, kd, vd, None, None, 0.125, -1, -1, False, 0.0)}
    res = {(c, n): [] for c in cases for n in CONDITIONS}
    ctx = mp.get_context("spawn")
    for r in range(int(sys.argv[1])):
        for n in random.sample(CONDITIONS, len(CONDITIONS)):
            stop = ctx.Event()
            p = ctx.Process(target=neighbour, args=(n, stop))
            p.start()
            time.sleep(1.0)  # let it start its loop
            for c in random.sample(list(cases), 2):
                fn = cases[c]
                fn()
                ts = []
                for _ in range(9):
                    t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
                res[(c, n)].append(statistics.median(ts))
            stop.set(); p.join()
    out = {"loadavg_before": os.getloadavg()[0]}
    for c in cases:
        idle = statistics.median(res[(c, "idle")])
        for n in CONDITIONS:
            t = statistics.median(res[(c, n)])
            ratios = sorted(b / a for a, b in zip(res[(c, "idle")], res[(c, n)]))
            out[f"{c}/{n}"] = dict(ms=t * 1e3, slowdown_vs_idle=t / idle, per_round=[round(x, 2) for x in ratios])
            print(f"{c} neighbour={n}: {t*1e3:.3f} ms  x{t/idle:.2f} of idle  rounds {ratios[0]:.2f}..{ratios[-1]:.2f}", flush=True)
    json.dump(out, open(sys.argv[2], "w"), indent=1)


if __name__ == "__main__":
    main()
