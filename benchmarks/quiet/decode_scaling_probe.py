"""Issue 10's GQA decode case (bf16, L=1, S=8192, 32/8 heads, D=128): is its 1 -> 2 thread
scaling bounded by the two cores' bandwidth, or by switching the thread count per call?

In one process, rounds in random order, medians:
- a plain read of the same K/V bytes (fp32 sum and amax over them) and a copy, at 1 and 2 threads;
- attnkern's decode call and torch SDPA, with the thread count set before every single call
  (as benchmarks/test_cpu_vs_torch.py alternates) and held steady (2 warm calls, then 7 timed).

usage: python decode_scaling_probe.py ROUNDS OUT.json   (run from outside the checkout)"""
import json, os, random, statistics, sys, time

import torch
import torch.nn.functional as F

import attnkern

torch.manual_seed(0)
q = torch.randn(1, 32, 1, 128, dtype=torch.bfloat16)
k, v = (torch.randn(1, 8, 8192, 128, dtype=torch.bfloat16) for _ in range(2))
kv_bytes = 2 * k.numel() * k.element_size()
kv_f32 = torch.cat([k, v]).view(torch.float32)  # the same bytes, read as fp32
dst = torch.empty_like(kv_f32)
reads = {"sum": lambda: kv_f32.sum(), "amax": lambda: kv_f32.amax(), "copy": lambda: dst.copy_(kv_f32)}
calls = {"attnkern": lambda: attnkern.scaled_dot_product_attention(q, k, v, enable_gqa=True, backend="cpu"),
         "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)}


def timed(fn, n_threads, switch):
    ts = []
    torch.set_num_threads(n_threads)
    fn(), fn()
    for _ in range(7):
        if switch:  # a call at the other count first, as in the benchmark's alternation
            torch.set_num_threads(3 - n_threads), fn(), torch.set_num_threads(n_threads)
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


jobs = [("read", r, "steady") for r in reads] + [("call", c, m) for c in calls for m in ("switch", "steady")]
res = {(kind, name, mode, n): [] for kind, name, mode in jobs for n in (1, 2)}
for _ in range(int(sys.argv[1])):
    order = [(j, n) for j in jobs for n in (1, 2)]
    random.shuffle(order)
    for (kind, name, mode), n in order:
        fn = reads[name] if kind == "read" else calls[name]
        res[(kind, name, mode, n)].append(timed(fn, n, mode == "switch"))

out = {"what": __doc__.split("\n")[0], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
       "rounds": int(sys.argv[1]), "loadavg_1m_end": os.getloadavg()[0], "torch": torch.__version__,
       "kv_bytes": kv_bytes, "results": {}}
for kind, name, mode in jobs:
    t1, t2 = (statistics.median(res[(kind, name, mode, n)]) for n in (1, 2))
    per_round = sorted(a / b for a, b in zip(res[(kind, name, mode, 1)], res[(kind, name, mode, 2)]))
    row = dict(t1_ms=t1 * 1e3, t2_ms=t2 * 1e3, scaling=t1 / t2, scaling_per_round=[round(x, 2) for x in per_round],
               gb_per_s_1=kv_bytes / t1 / 1e9, gb_per_s_2=kv_bytes / t2 / 1e9)
    out["results"][f"{name}/{mode}"] = row
    print(f"{name:9s} {mode:6s} 1t {t1*1e3:6.3f} ms ({row['gb_per_s_1']:5.1f} GB/s)  2t {t2*1e3:6.3f} ms "
          f"({row['gb_per_s_2']:5.1f} GB/s)  scaling {t1/t2:.2f} [{per_round[0]:.2f}..{per_round[-1]:.2f}]", flush=True)
json.dump(out, open(sys.argv[2], "w"), indent=1)
