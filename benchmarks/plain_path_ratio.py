"""Does the plain call (no score modifier) pay for the modifiers? Times the same plain calls
with two builds of attnkern -- this checkout and a baseline checkout (say, a build of main) --
in alternating child processes of one run, and prints the ratio baseline_time / this_time per
case (>= 0.98 is the target: not slower than before).

    python benchmarks/plain_path_ratio.py /path/to/baseline/checkout [--rounds 5]

Both checkouts must have their CPU extension built in place (python setup.py build_ext
--inplace). The two builds cannot share a process (both define the attnkern op library), so
rounds alternate A, B, B, A, A, B, ... to spread the machine's load over both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (label, B, Hq, Hkv, L, S, D, causal, window, mode)
CASES = [
    ("causal L1024 fwd+bwd", 1, 8, 8, 1024, 1024, 64, True, None, "fwd+bwd"),
    ("window(256,0) L2048 fwd", 1, 8, 8, 2048, 2048, 64, True, (256, 0), "fwd"),
    ("decode L1 S4096 GQA fwd", 4, 32, 8, 1, 4096, 128, False, None, "fwd"),
]

CHILD = r"""
import json, sys, time, torch, attnkern
cases = json.loads(sys.argv[1]); reps = int(sys.argv[2])
torch.manual_seed(0)
out = {}
for label, B, Hq, Hkv, L, S, D, causal, window, mode in cases:
    q = torch.randn(B, Hq, L, D, requires_grad=mode != "fwd")
    k = torch.randn(B, Hkv, S, D, requires_grad=mode != "fwd")
    v = torch.randn(B, Hkv, S, D, requires_grad=mode != "fwd")
    def call():
        o = attnkern.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=Hq != Hkv,
                                                  window_size=window and tuple(window), backend="cpu")
        if mode != "fwd":
            o.backward(torch.ones_like(o))
    call()
    times = []
    for _ in range(reps):
        t = time.perf_counter(); call(); times.append(time.perf_counter() - t)
    out[label] = sorted(times)[len(times) // 2]
print(json.dumps({"file": attnkern.__file__, "threads": torch.get_num_threads(), "times": out}))
"""


def run_child(root: str, code: str, *args: str) -> dict:
    """Runs `code` in a child process that imports the checkout `root`'s attnkern; the child's last
    line of output is a JSON object whose "file" is the attnkern it imported."""
    env = {**os.environ, "PYTHONPATH": root}
    run = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=root, capture_output=True, text=True,
                         check=True)
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["file"].startswith(root), f"imported {result['file']}, not the checkout {root}"
    return result


def child(root: str, reps: int) -> dict:
    return run_child(root, CHILD, json.dumps(CASES), str(reps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("baseline", help="checkout of the baseline build (e.g. main), extension built in place")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    roots = {"this": HERE, "baseline": os.path.abspath(args.baseline)}
    samples = {name: {c[0]: [] for c in CASES} for name in roots}
    threads = None
    load_before = os.getloadavg()
    for round_index in range(args.rounds):
        # alternate which build goes first, so a trend in the machine's load favours neither
        order = list(roots.items()) if round_index % 2 == 0 else list(roots.items())[::-1]
        for name, root in order:
            result = child(root, args.reps)
            threads = result["threads"]
            for label, t in result["times"].items():
                samples[name][label].append(t)
    load_after = os.getloadavg()
    print(f"threads {threads}; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after "
          f"({'loaded machine' if max(load_before[0], load_after[0]) > 0.5 * (os.cpu_count() or 1) else 'quiet'})")
    print(f"{'case':32s} {'this ms':>9s} {'baseline ms':>12s} {'baseline/this':>14s}")
    for label, *_ in CASES:
        this = statistics.median(samples["this"][label])
        base = statistics.median(samples["baseline"][label])
        print(f"{label:32s} {this * 1e3:9.2f} {base * 1e3:12.2f} {base / this:14.3f}")


if __name__ == "__main__":
    main()
