"""Small decoding-sized calls (~0.1-1 ms, where per-call costs weigh), build A against build B:
each build in its own child process, alternating, ROUNDS times; per call the best of 30 x 20
calls. Case sets: "small" (the default) and "rows" (one query row per item for 1, 2 and 4 query
heads per kv head, fp32 and bf16, with K/V of 4-8 MiB; the DRAM-sized calls of
forward_build_ab.py's "decode" set varied by +-25% from run to run on the AMD EPYC VM, these
by a few percent). Prints JSON.
Usage (from a directory that is not a checkout):
  python decode_small_calls.py A_ROOT B_ROOT ROUNDS THREADS [small|rows]"""
import os, sys, json, subprocess, datetime
CASE_SETS = {  # Hq, Hkv, L, S, D, causal, dtype
    "small": [(8, 8, 4, 2048, 64, True, "float32"), (8, 8, 1, 256, 64, False, "float32"),
              (32, 8, 1, 1024, 128, False, "float32")],
    "rows": [(8, 8, 1, 1024, 64, False, "float32"), (8, 8, 1, 1024, 128, False, "float32"),
             (16, 8, 1, 1024, 64, False, "float32"), (32, 8, 1, 512, 128, False, "float32"),
             (32, 8, 1, 1024, 64, False, "float32"), (8, 8, 1, 1024, 128, False, "bfloat16"),
             (32, 8, 1, 1024, 128, False, "bfloat16")],
}
CASES = CASE_SETS[sys.argv[5] if len(sys.argv) > 5 else "small"]
child = r'''
import sys, json, time, torch, attnkern
torch.set_num_threads(int(sys.argv[1]))
out = []
for Hq, Hkv, L, S, D, causal, dt in json.loads(sys.argv[2]):
    dt = getattr(torch, dt)
    q = torch.randn(1, Hq, L, D, dtype=dt); k, v = (torch.randn(1, Hkv, S, D, dtype=dt) for _ in range(2))
    f = lambda: attnkern.scaled_dot_product_attention(q, k, v, enable_gqa=True, is_causal=causal, backend="cpu")
    for _ in range(20): f()
    best = 1e9
    for _ in range(30):
        t = time.perf_counter()
        for _ in range(20): f()
        best = min(best, (time.perf_counter() - t) / 20)
    out.append(best * 1e6)
print(json.dumps(out))
'''
A, B, rounds, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
res = {"A": [], "B": []}
for r in range(rounds):
    for w in (("A", "B") if r % 2 == 0 else ("B", "A")):
        run = subprocess.run([sys.executable, "-c", child, threads, json.dumps(CASES)], cwd="/", capture_output=True,
                             text=True, env=dict(os.environ, PYTHONPATH=A if w == "A" else B))
        if run.returncode: sys.exit(run.stderr[-2000:])
        res[w].append(json.loads(run.stdout))
cases = {}
for i, (Hq, Hkv, L, S, D, causal, dt) in enumerate(CASES):
    a, b = [x[i] for x in res["A"]], [x[i] for x in res["B"]]
    cases["%s H%d/%d L%d S%d D%d%s" % (dt, Hq, Hkv, L, S, D, " causal" if causal else "")] = dict(
        before_best_us=a, after_best_us=b, ratio_of_minima=min(a) / min(b))
print(json.dumps(dict(what="decode-sized calls, best of 30 x 20 calls per child, build A (before) vs B (after)",
                      date=datetime.datetime.now(datetime.timezone.utc).isoformat(), threads=int(threads),
                      rounds=rounds, loadavg=os.getloadavg(), cases=cases), indent=1))
