"""Decoding (one query row per head) from (B, S, H, D) K/V, build A (before) vs build B (after the
whole-row items of csrc/cpu/tiling.h), with controls the change leaves alone (rows 2 KiB apart or
less, a (B, H, S, D) cache). Alternating child processes in a random order each round, and A
again as a null variant; per case the median over rounds of each child's median.
Usage (from a directory that is not a checkout, so each child imports its own build):
  python decode_whole_rows_ab.py BEFORE_ROOT AFTER_ROOT ROUNDS THREADS [OUT.json]"""
import os, sys, subprocess, random, statistics, json, datetime
A, B, rounds, threads, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], (sys.argv[5] if len(sys.argv) > 5 else None)
CASES = [  # dtype, B, Hq, Hkv, S, D, layout: rows 4 KiB apart or more take whole-row items, the rest are controls
    ("float32", 1, 32, 8, 8192, 128, "BSHD"), ("float32", 1, 8, 8, 4096, 128, "BSHD"),
    ("bfloat16", 4, 16, 16, 4096, 128, "BSHD"), ("float32", 4, 16, 16, 2048, 64, "BSHD"),
    ("float16", 1, 32, 8, 8192, 256, "BSHD"), ("float32", 2, 32, 32, 1024, 128, "BSHD"),
    ("float32", 8, 8, 8, 4096, 64, "BSHD"), ("bfloat16", 1, 32, 8, 8192, 128, "BSHD"),
    ("float32", 8, 8, 8, 4096, 64, "BHSD"),
]
child = r'''
import sys, json, time, statistics, torch, attnkern
torch.set_num_threads(int(sys.argv[1]))
out = {}
for dt, B, Hq, Hkv, S, D, layout in json.loads(sys.argv[2]):
    torch.manual_seed(0)
    dtype = getattr(torch, dt)
    q = torch.randn(B, Hq, 1, D, dtype=dtype)
    if layout == "BSHD":
        k, v = (torch.randn(B, S, Hkv, D, dtype=dtype).transpose(1, 2) for _ in range(2))
    else:
        k, v = (torch.randn(B, Hkv, S, D, dtype=dtype) for _ in range(2))
    f = lambda: attnkern.scaled_dot_product_attention(q, k, v, enable_gqa=True, backend="cpu")
    t = time.perf_counter(); f(); f(); reps = max(1, min(20, int(0.1 / ((time.perf_counter() - t) / 2))))
    ts = []
    for _ in range(9):
        t = time.perf_counter()
        for _ in range(reps): f()
        ts.append((time.perf_counter() - t) / reps)
    out["%s B%d H%d/%d S%d D%d %s" % (dt, B, Hq, Hkv, S, D, layout)] = statistics.median(ts)
print(json.dumps(out))
'''
res = {"A": [], "B": [], "null": []}
for r in range(rounds):
    for w in random.sample(["A", "B", "null"], 3):
        run = subprocess.run([sys.executable, "-c", child, threads, json.dumps(CASES)], env=dict(os.environ, PYTHONPATH=B if w == "B" else A), cwd="/", capture_output=True, text=True)
        if run.returncode: sys.exit(run.stderr[-2000:])
        res[w].append(json.loads(run.stdout))
summary = {}
for case in res["A"][0]:
    a = [x[case] for x in res["A"]]; b = [x[case] for x in res["B"]]; n = [x[case] for x in res["null"]]
    summary[case] = dict(before_us=statistics.median(a) * 1e6, after_us=statistics.median(b) * 1e6,
                         speedup_medians=statistics.median(a) / statistics.median(b),
                         speedup_paired=statistics.median(x / y for x, y in zip(a, b)),
                         null_speedup=statistics.median(a) / statistics.median(n))
    print("%-40s before %8.0f us  after %8.0f us  speedup %.2fx (paired %.2fx, null %.2fx)" % (case, summary[case]["before_us"], summary[case]["after_us"], summary[case]["speedup_medians"], summary[case]["speedup_paired"], summary[case]["null_speedup"]))
print("threads", threads, "rounds", rounds, "load", os.getloadavg())
if out:
    json.dump(dict(what=__doc__, date=datetime.datetime.now(datetime.timezone.utc).isoformat(), threads=int(threads), rounds=rounds,
                   loadavg=os.getloadavg(), cases=summary), open(out, "w"), indent=1)
