"""Forward of short query groups, build A (before) vs build B (after), and A again as a null
variant: alternating child processes in a random order each round; per case the median over
rounds of each child's median, and of the per-round ratios. Case sets: "decode" (items of at most
8 rows: the query-major decode tiles) and "mid" (groups of 17-32 rows: the 32-row tiles).
Usage (from a directory that is not a checkout, so each child imports its own build):
  python forward_build_ab.py {decode,mid} BEFORE_ROOT AFTER_ROOT ROUNDS THREADS [OUT.json]"""
import os, sys, subprocess, random, statistics, json, datetime
CASE_SETS = {  # (dtype, Hq, Hkv, L, S, D, causal)
    "decode": [("float32", 8, 8, 1, 4096, 64, False), ("float32", 32, 8, 1, 4096, 128, False),
               ("float32", 32, 8, 1, 8192, 128, False), ("float16", 8, 8, 1, 4096, 128, False),
               ("bfloat16", 32, 8, 1, 8192, 128, False), ("float32", 8, 8, 4, 2048, 64, True),
               ("float32", 8, 8, 1, 256, 64, False)],
    "mid": [("float32", 32, 1, 1, 4096, 128, False), ("bfloat16", 32, 1, 1, 4096, 128, False),
            ("float32", 8, 8, 32, 2048, 64, False), ("bfloat16", 8, 8, 32, 2048, 64, False),
            ("float32", 8, 2, 8, 2048, 128, False)],
}
CASES = CASE_SETS[sys.argv[1]]
A, B, rounds, threads = sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
child = r'''
import sys, json, time, statistics, torch, attnkern
torch.set_num_threads(int(sys.argv[1]))
out = {}
for dt, Hq, Hkv, L, S, D, causal in json.loads(sys.argv[2]):
    torch.manual_seed(0)
    q = torch.randn(1, Hq, L, D, dtype=getattr(torch, dt)); k, v = (torch.randn(1, Hkv, S, D, dtype=getattr(torch, dt)) for _ in range(2))
    f = lambda: attnkern.scaled_dot_product_attention(q, k, v, enable_gqa=True, is_causal=causal, backend="cpu")
    for _ in range(10): f()
    ts = []
    for _ in range(9):
        t = time.perf_counter()
        for _ in range(10): f()
        ts.append((time.perf_counter() - t) / 10)
    out["%s H%d/%d L%d S%d D%d" % (dt, Hq, Hkv, L, S, D)] = statistics.median(ts)
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
    print("%-32s before %8.0f us  after %8.0f us  speedup %.2fx (paired %.2fx, null %.2fx)" % (case, summary[case]["before_us"], summary[case]["after_us"], summary[case]["speedup_medians"], summary[case]["speedup_paired"], summary[case]["null_speedup"]))
print("threads", threads, "rounds", rounds, "load", os.getloadavg())
if len(sys.argv) > 6:
    json.dump(dict(what=__doc__, date=datetime.datetime.now(datetime.timezone.utc).isoformat(), threads=int(threads), rounds=rounds,
                   loadavg=os.getloadavg(), cpu="Intel Xeon (2 vCPU, AVX-512/AMX), isa amx_bf16", cases=summary), open(sys.argv[6], "w"), indent=1)
