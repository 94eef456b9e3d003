"""Attention calls, build A (before) vs build B (after), and A again as a null variant:
alternating child processes in a random order each round; per case the median over rounds of
each child's median, and of the per-round ratios. Case sets: "decode" (items of at most 8 rows:
the query-major decode tiles), "mid" (groups of 17-32 rows: the 32-row tiles), "targets"
(issue 10's prefill and decode cases, forward and forward+backward, fp32 and bf16) and
"whole-rows" (decoding from (B, S, H, D) K/V: rows 4 KiB apart or more take whole-row items,
csrc/cpu/tiling.h; rows 2 KiB apart and a (B, H, S, D) cache are controls) and "kvcache"
(flash_attn_with_kvcache, one query per sequence, fp32 (B, S, H, D) caches: H=8, D=128 uniform,
skewed and B=2 take whole-row items; the packed decode suite's D=64 is a control) and "softcap"
(softcap 50 on issue 13's causal forward+backward, a head-dim-256 forward and a GQA decode; the
plain causal forward+backward is a control).
Usage (from a directory that is not a checkout, so each child imports its own build):
  python forward_build_ab.py {decode,mid,targets,whole-rows,kvcache,softcap} BEFORE_ROOT AFTER_ROOT ROUNDS THREADS [OUT.json]"""
import os, sys, subprocess, random, statistics, json, datetime
# (dtype, Hq, Hkv, L, S, D, causal[, mode[, window[, batch[, K/V layout[, softcap]]]]]); mode
# "kvcache" takes the cache lengths in the window's place (L, S, causal unused)
CASE_SETS = {
    "decode": [("float32", 8, 8, 1, 4096, 64, False), ("float32", 32, 8, 1, 4096, 128, False),
               ("float32", 32, 8, 1, 8192, 128, False), ("float16", 8, 8, 1, 4096, 128, False),
               ("bfloat16", 32, 8, 1, 8192, 128, False), ("float32", 8, 8, 4, 2048, 64, True),
               ("float32", 8, 8, 1, 256, 64, False)],
    "mid": [("float32", 32, 1, 1, 4096, 128, False), ("bfloat16", 32, 1, 1, 4096, 128, False),
            ("float32", 8, 8, 32, 2048, 64, False), ("bfloat16", 8, 8, 32, 2048, 64, False),
            ("float32", 8, 2, 8, 2048, 128, False)],
    "targets": [("float32", 8, 8, 2048, 2048, 64, False), ("bfloat16", 8, 8, 2048, 2048, 64, False),
                ("float32", 8, 8, 1024, 1024, 64, True, "fwd+bwd"), ("bfloat16", 8, 8, 1024, 1024, 64, True, "fwd+bwd"),
                ("bfloat16", 32, 8, 1, 8192, 128, False), ("float32", 8, 8, 8192, 8192, 64, True, "fwd", (255, 0))],
    "whole-rows": [("float32", 32, 8, 1, 8192, 128, False, "fwd", None, 1, "bshd"),
                   ("float32", 8, 8, 1, 4096, 128, False, "fwd", None, 1, "bshd"),
                   ("bfloat16", 16, 16, 1, 4096, 128, False, "fwd", None, 4, "bshd"),
                   ("float32", 16, 16, 1, 2048, 64, False, "fwd", None, 4, "bshd"),
                   ("float16", 32, 8, 1, 8192, 256, False, "fwd", None, 1, "bshd"),
                   ("float32", 32, 32, 1, 1024, 128, False, "fwd", None, 2, "bshd"),
                   ("float32", 8, 8, 1, 4096, 64, False, "fwd", None, 8, "bshd"),
                   ("bfloat16", 32, 8, 1, 8192, 128, False, "fwd", None, 1, "bshd"),
                   ("float32", 8, 8, 1, 4096, 64, False, "fwd", None, 8, "bhsd")],
    "kvcache": [("float32", 8, 8, 1, 0, 128, False, "kvcache", [4096] * 8),
                ("float32", 8, 8, 1, 0, 128, False, "kvcache", [8000, 100, 100, 100]),
                ("float32", 8, 8, 1, 0, 128, False, "kvcache", [4096] * 2),
                ("float32", 8, 8, 1, 0, 64, False, "kvcache", [4096] * 8)],
    "softcap": [("float32", 8, 8, 1024, 1024, 64, True, "fwd+bwd", None, 1, None, 50.0),
                ("float32", 8, 8, 1024, 1024, 256, True, "fwd", None, 1, None, 50.0),
                ("float32", 32, 8, 1, 4096, 128, False, "fwd", None, 1, None, 50.0),
                ("float32", 8, 8, 1024, 1024, 64, True, "fwd+bwd")],
}
CASES = CASE_SETS[sys.argv[1]]
A, B, rounds, threads = sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
child = r'''
import sys, json, time, statistics, torch, attnkern
torch.set_num_threads(int(sys.argv[1]))

def problem(dt, Hq, Hkv, L, S, D, causal, mode="fwd", window=None, batch=1, layout=None, softcap=0.0):
    """the call to time and the case's name"""
    dtype = getattr(torch, dt)
    if mode == "kvcache":  # (B, S, H, D) caches of per-sequence lengths (`window`), one new query each
        lens = window
        kc, vc = (torch.randn(len(lens), max(lens), Hkv, D, dtype=dtype) for _ in range(2))
        q = torch.randn(len(lens), 1, Hq, D, dtype=dtype)
        seqlens = torch.tensor(lens, dtype=torch.int32)
        return (lambda: attnkern.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens, backend="cpu"),
                "%s kvcache H%d/%d D%d lens %s" % (dt, Hq, Hkv, D, lens if len(set(lens)) > 1 else "%dx%d" % (len(lens), lens[0])))
    grad = mode == "fwd+bwd"
    q = torch.randn(batch, Hq, L, D, dtype=dtype, requires_grad=grad)
    if layout == "bshd":  # a (B, H, S, D) view of (B, S, H, D) memory
        k, v = (torch.randn(batch, S, Hkv, D, dtype=dtype).transpose(1, 2).requires_grad_(grad) for _ in range(2))
    else:
        k, v = (torch.randn(batch, Hkv, S, D, dtype=dtype, requires_grad=grad) for _ in range(2))
    call = lambda: attnkern.scaled_dot_product_attention(q, k, v, enable_gqa=True, is_causal=causal, backend="cpu",
                                                         window_size=tuple(window) if window else None,
                                                         softcap=softcap)
    return ((lambda: call().backward(torch.ones_like(q))) if grad else call,
            "%s%s H%d/%d L%d S%d D%d%s %s%s%s%s" % (dt, " B%d" % batch if batch > 1 else "", Hq, Hkv, L, S, D,
                                                  " causal" if causal else "", mode,
                                                  " win%s" % (tuple(window),) if window else "",
                                                  " " + layout if layout else "",
                                                  " softcap%g" % softcap if softcap else ""))

out = {}
for case in json.loads(sys.argv[2]):
    torch.manual_seed(0)
    f, name = problem(*case)
    t = time.perf_counter(); f(); f(); reps = max(1, min(10, int(0.1 / ((time.perf_counter() - t) / 2))))
    ts = []
    for _ in range(9):
        t = time.perf_counter()
        for _ in range(reps): f()
        ts.append((time.perf_counter() - t) / reps)
    out[name] = statistics.median(ts)
print(json.dumps(out))
'''
CPU = subprocess.run([sys.executable, "-c", "import attnkern.ops as o; from attnkern.bench.report import cpu_name; print(cpu_name(), '| isa', o._C.cpu_isa())"],
                     env=dict(os.environ, PYTHONPATH=A), cwd="/", capture_output=True, text=True).stdout.strip()
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
    print("%-52s before %8.0f us  after %8.0f us  speedup %.2fx (paired %.2fx, null %.2fx)" % (case, summary[case]["before_us"], summary[case]["after_us"], summary[case]["speedup_medians"], summary[case]["speedup_paired"], summary[case]["null_speedup"]))
print("threads", threads, "rounds", rounds, "load", os.getloadavg())
if len(sys.argv) > 6:
    json.dump(dict(what=__doc__, date=datetime.datetime.now(datetime.timezone.utc).isoformat(), threads=int(threads), rounds=rounds,
                   loadavg=os.getloadavg(), cpu=CPU, cases=summary), open(sys.argv[6], "w"), indent=1)
