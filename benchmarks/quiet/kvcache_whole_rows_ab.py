"""flash_attn_with_kvcache on CPU, build A (before) vs build B: fp32 (B, S, H, D) caches, H=8, D=128
(rows 4 KiB apart: whole-row items) uniform, skewed ([8000, 100, 100, 100] keys) and B=2, and the
packed decode suite's D=64 (rows 2 KiB apart: per-head items, a control). Alternating child
processes in a random order each round, A again as a null; medians over rounds.
Usage (from a directory that is not a checkout): python kvcache_whole_rows_ab.py A_ROOT B_ROOT ROUNDS THREADS [OUT.json]"""
import os, sys, subprocess, random, statistics, json, datetime
child = r'''
import sys, json, time, statistics, torch, attnkern
torch.set_num_threads(int(sys.argv[1]))
out = {}
for name, lens, H, D in [("uniform B8 D128", [4096]*8, 8, 128), ("skewed D128", [8000, 100, 100, 100], 8, 128), ("uniform B2 D128", [4096]*2, 8, 128), ("suite B8 D64", [4096]*8, 8, 64)]:
    torch.manual_seed(0)
    B = len(lens); S = max(lens)
    kc, vc = torch.randn(B, S, H, D), torch.randn(B, S, H, D)
    q = torch.randn(B, 1, H, D)
    sl = torch.tensor(lens, dtype=torch.int32)
    f = lambda: attnkern.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=sl, backend="cpu")
    f(); f(); ts = []
    for _ in range(9):
        t = time.perf_counter()
        for _ in range(5): f()
        ts.append((time.perf_counter() - t) / 5)
    out[name] = statistics.median(ts)
print(json.dumps(out))
'''
A, B, rounds, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
res = {"A": [], "B": [], "null": []}
for r in range(rounds):
    for w in random.sample(list(res), 3):
        run = subprocess.run([sys.executable, "-c", child, threads], env=dict(os.environ, PYTHONPATH=B if w == "B" else A), cwd="/", capture_output=True, text=True)
        if run.returncode: sys.exit(run.stderr[-2000:])
        res[w].append(json.loads(run.stdout))
summary = {}
for case in res["A"][0]:
    a = statistics.median(x[case] for x in res["A"]); b = statistics.median(x[case] for x in res["B"]); n = statistics.median(x[case] for x in res["null"])
    summary[case] = dict(before_ms=a * 1e3, after_ms=b * 1e3, speedup=a / b, null_speedup=a / n)
    print("%-20s before %7.2f ms after %7.2f ms speedup %.2fx null %.2fx" % (case, a*1e3, b*1e3, a/b, a/n))
print("threads", threads, os.getloadavg())
if len(sys.argv) > 5:
    json.dump(dict(what=__doc__, date=datetime.datetime.now(datetime.timezone.utc).isoformat(), threads=int(threads),
                   rounds=rounds, loadavg=os.getloadavg(), cases=summary), open(sys.argv[5], "w"), indent=1)
