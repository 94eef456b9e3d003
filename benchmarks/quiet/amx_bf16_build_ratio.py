"""bf16 forward and backward times of this checkout's build against a baseline checkout's build
(say, a worktree of main), in alternating child processes of one run: the Gemma-2-like call of
issue 13 (head dim 256, GQA 8/4, causal window (4095, 0), softcap 50, L = 4096) and plain causal
calls (no modifier) at head dims 64 and 128, which must not get slower (baseline/this >= 0.98).

    python benchmarks/quiet/amx_bf16_build_ratio.py /path/to/baseline/checkout [--rounds 4] [--json out.json]

Both checkouts need their CPU extension built in place. Each child times every case `reps` times
and keeps the fastest (the machine may be shared: a slower call is one that others interrupted);
the report gives the median over rounds of those per-child minima, forward and backward apart.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(HERE, "benchmarks"))
from plain_path_ratio import run_child  # noqa: E402

# (label, Hq, Hkv, L, D, window, softcap, reps per child)
CASES = [
    ("gemma2-like L4096", 8, 4, 4096, 256, (4095, 0), 50.0, 3),
    ("plain causal D64 L1024", 8, 8, 1024, 64, None, 0.0, 30),
    ("plain causal D64 L2048", 8, 8, 2048, 64, None, 0.0, 16),
    ("plain causal D128 L1024", 8, 8, 1024, 128, None, 0.0, 30),
    ("plain causal D128 L2048", 8, 8, 2048, 128, None, 0.0, 16),
]

CHILD = r"""
import json, sys, time, torch, attnkern
cases = json.loads(sys.argv[1])
torch.manual_seed(0)
out = {}
for label, Hq, Hkv, L, D, window, softcap, reps in cases:
    q, k, v = (torch.randn(1, h, L, D, dtype=torch.bfloat16, requires_grad=True) for h in (Hq, Hkv, Hkv))
    def forward():
        return attnkern.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=Hq != Hkv,
                                                     window_size=window and tuple(window), softcap=softcap,
                                                     backend="cpu")
    o = forward()
    grad = torch.randn_like(o)
    o.backward(grad)
    fwd, bwd = [], []
    for _ in range(reps):
        t0 = time.perf_counter(); o = forward(); t1 = time.perf_counter(); o.backward(grad); t2 = time.perf_counter()
        fwd.append(t1 - t0); bwd.append(t2 - t1)
    out[label] = [min(fwd), min(bwd), min(f + b for f, b in zip(fwd, bwd))]
print(json.dumps({"file": attnkern.__file__, "threads": torch.get_num_threads(), "isa": attnkern.ops._C.cpu_isa(),
                  "times": out}))
"""


def child(root: str) -> dict:
    return run_child(root, CHILD, json.dumps(CASES))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("baseline", help="checkout of the baseline build, extension built in place")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    roots = {"this": HERE, "baseline": os.path.abspath(args.baseline)}
    samples = {name: {c[0]: [] for c in CASES} for name in roots}
    load_before = os.getloadavg()
    info = {}
    for round_index in range(args.rounds):
        # alternate which build goes first, so a trend in the machine's load favours neither
        order = list(roots.items()) if round_index % 2 == 0 else list(roots.items())[::-1]
        for name, root in order:
            result = child(root)
            info = {"threads": result["threads"], "isa": result["isa"]}
            for label, t in result["times"].items():
                samples[name][label].append(t)
    load_after = os.getloadavg()
    rows = []
    for label, *_ in CASES:
        med = {name: [statistics.median(s[i] for s in samples[name][label]) for i in range(3)] for name in roots}
        rows.append({"case": label, "this_ms": [round(x * 1e3, 2) for x in med["this"]],
                     "baseline_ms": [round(x * 1e3, 2) for x in med["baseline"]],
                     "ratio_baseline_over_this": [round(b / t, 3) for b, t in zip(med["baseline"], med["this"])]})
    loaded = max(load_before[0], load_after[0]) > 0.5 * (os.cpu_count() or 1)
    report = {**info, "rounds": args.rounds, "load_average": [round(load_before[0], 2), round(load_after[0], 2)],
              "machine": "loaded" if loaded else "quiet", "columns": ["forward", "backward", "forward+backward"],
              "cases": rows}
    print(f"threads {info['threads']} ({info['isa']}); load average {load_before[0]:.2f} before, "
          f"{load_after[0]:.2f} after ({report['machine']} machine)")
    print(f"{'case':26s} {'this ms (fwd, bwd, both)':>28s} {'baseline ms':>24s} {'baseline/this':>22s}")
    for r in rows:
        fmt = lambda xs: ", ".join(f"{x:.1f}" for x in xs)
        print(f"{r['case']:26s} {fmt(r['this_ms']):>28s} {fmt(r['baseline_ms']):>24s} "
              f"{', '.join(f'{x:.3f}' for x in r['ratio_baseline_over_this']):>22s}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
