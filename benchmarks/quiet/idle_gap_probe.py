"""Does a call run slower when the calling thread did something else just before it?

attnkern's GQA decode call (bf16, L=1, 32/8 heads, D=128; S=16 and S=8192) at 1 and 2 threads,
torch's SDPA on the S=8192 call and a plain fp32 sum over 64 MiB (neither is attnkern), each
call preceded by GAP ms of a plain Python busy loop on the calling thread (0 = back to back),
the jobs in random order per round; medians per (subject, threads, gap) over all rounds.

usage: python idle_gap_probe.py ROUNDS OUT.json   (run from outside the checkout)"""
import json
import os
import random
import statistics
import sys
import time

import torch

import attnkern

GAPS_MS = (0.0, 0.5, 2.0, 10.0)
CALLS = 40  # per (round, subject, threads, gap)

torch.manual_seed(0)
q = torch.randn(1, 32, 1, 128, dtype=torch.bfloat16)
kv = {s: [torch.randn(1, 8, s, 128, dtype=torch.bfloat16) for _ in range(2)] for s in (16, 8192)}
plain = torch.randn(16 * 1024 * 1024)
SUBJECTS = {
    "attnkern S=16": lambda: attnkern.scaled_dot_product_attention(q, *kv[16], enable_gqa=True, backend="cpu"),
    "attnkern S=8192": lambda: attnkern.scaled_dot_product_attention(q, *kv[8192], enable_gqa=True, backend="cpu"),
    "torch sdpa S=8192": lambda: torch.nn.functional.scaled_dot_product_attention(q, *kv[8192], enable_gqa=True),
    "fp32 sum 64 MiB": lambda: plain.sum(),
}


def spin(ms):
    t = time.perf_counter()
    while (time.perf_counter() - t) * 1e3 < ms:
        pass


def main():
    rounds, out_path = int(sys.argv[1]), sys.argv[2]
    times = {}
    for _ in range(rounds):
        jobs = [(name, n, g) for name in SUBJECTS for n in (1, 2) for g in GAPS_MS]
        random.shuffle(jobs)
        for name, n, gap in jobs:
            fn = SUBJECTS[name]
            torch.set_num_threads(n)
            fn()
            for _ in range(CALLS):
                spin(gap)
                t = time.perf_counter()
                fn()
                times.setdefault((name, n, gap), []).append(time.perf_counter() - t)
    out = {"what": __doc__.split("\n")[0], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "torch": torch.__version__, "rounds": rounds, "calls_per_round": CALLS,
           "loadavg_1m_end": os.getloadavg()[0], "median_us": {}}
    for (name, n, gap), ts in sorted(times.items()):
        med = statistics.median(ts) * 1e6
        base = statistics.median(times[(name, n, 0.0)]) * 1e6
        out["median_us"][f"{name} threads={n} gap_ms={gap}"] = med
        print(f"{name:17s} threads={n} gap {gap:4.1f} ms: median {med:8.1f} us ({med / base:.2f}x back to back)")
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
