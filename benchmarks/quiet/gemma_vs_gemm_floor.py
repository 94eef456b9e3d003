"""Issue 13's Gemma-2-like case (bf16, B1, 8/4 heads, L=S=4096, D=256, causal, softcap 50):
attnkern forward+backward and HF eager against the time torch's own bf16 GEMMs (oneDNN) take for
the seven products a flash-style forward+backward must run, halved for the causal band ("gemms": three
products shaped like Q.K^T, with a 4096 x 4096 output, and four like P.V; "gemms_pv": all seven
like P.V, the shape oneDNN runs fastest here). Same process, random order each round. Run from
outside a checkout with PYTHONPATH set to the build; SAVE=path writes the JSON, ROUNDS=n."""
import os, time, random, statistics, json, datetime, torch, attnkern
from attnkern.bench.subjects import all_subjects
from attnkern.bench.cases import Case
torch.manual_seed(int.from_bytes(os.urandom(4), 'little'))
case = Case("bfloat16", 1, 8, 4, 4096, 4096, 256, causal=True, window=(4095, 0), mode="fwd+bwd", softcap=50.0, model="gemma2-like")
eager_fwd = all_subjects()["eager"].build(case, "cpu")
q = torch.randn(1, 8, 4096, 256, dtype=torch.bfloat16, requires_grad=True)
k, v = (torch.randn(1, 4, 4096, 256, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
g = torch.randn(1, 8, 4096, 256, dtype=torch.bfloat16)
def ours():
    o = attnkern.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, softcap=50.0, window_size=(4095, 0), backend="cpu")
    torch.autograd.grad(o, (q, k, v), g)
def eager():
    o = eager_fwd(q, k, v); torch.autograd.grad(o, (q, k, v), g)
A = torch.randn(8, 4096, 256, dtype=torch.bfloat16); Bt = torch.randn(8, 256, 4096, dtype=torch.bfloat16)
P = torch.randn(8, 4096, 4096, dtype=torch.bfloat16); V = torch.randn(8, 4096, 256, dtype=torch.bfloat16)
def gemms():  # 7 products of 4096 x 4096 x 256 per head: QK^T twice, dO V^T (n=4096 outputs); PV, P^T dO, dS^T Q, dS K (n=256)
    for _ in range(3): torch.bmm(A, Bt)
    for _ in range(4): torch.bmm(P, V)
def gemms_pv():  # the same FLOPs, all in the shape oneDNN runs fastest here (a long reduction, a small output)
    for _ in range(7): torch.bmm(P, V)
fns = {"attnkern": ours, "eager": eager, "gemms": gemms, "gemms_pv": gemms_pv}
for f in fns.values(): f()
res = {n: [] for n in fns}
for r in range(int(os.environ.get("ROUNDS", 5))):
    for n in random.sample(list(fns), len(fns)):
        t = time.perf_counter(); fns[n](); res[n].append(time.perf_counter() - t)
med = {n: statistics.median(x) for n, x in res.items()}
floor = med["gemms"] / 2
floor_pv = med["gemms_pv"] / 2
flops = 7 * 2 * 4096 * 4096 * 256 * 8 / 2
out = dict(what=__doc__, date=datetime.datetime.now(datetime.timezone.utc).isoformat(), threads=torch.get_num_threads(),
           loadavg=os.getloadavg(), torch=torch.__version__, ms={n: [x * 1e3 for x in xs] for n, xs in res.items()},
           median_ms={n: m * 1e3 for n, m in med.items()}, gemm_floor_ms=floor * 1e3,
           attnkern_vs_floor=med["attnkern"] / floor, eager_vs_attnkern=med["eager"] / med["attnkern"],
           eager_over_10_vs_floor=med["eager"] / 10 / floor,
           gemm_pv_floor_ms=floor_pv * 1e3, attnkern_vs_pv_floor=med["attnkern"] / floor_pv,
           eager_over_10_vs_pv_floor=med["eager"] / 10 / floor_pv,
           tflops={"attnkern": flops / med["attnkern"] / 1e12, "onednn_gemms": 2 * flops / med["gemms"] / 1e12,
                  "onednn_gemms_pv": 2 * flops / med["gemms_pv"] / 1e12})
print(json.dumps({k_: v_ for k_, v_ in out.items() if k_ not in ("what", "ms")}, indent=1))
if os.environ.get("SAVE"): json.dump(out, open(os.environ["SAVE"], "w"), indent=1)
