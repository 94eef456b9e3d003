"""Issue 16's third target, top_k=64 vs attnkern's own dense fused forward, timed alternately in
one process (fp32, B=1, H=4, L=S=4096, D=64, forward, no grad; the `attnkern bench --topk`
case). `attnkern bench` times the cases one after another, so on a shared machine load drifts
between them; here each round times dense, top-64, top-16 and top-1 back to back (median of `--calls`
calls each) and the ratio dense/top-k is taken per round. Prints the median over rounds.
Run from the repository root with attnkern built (PYTHONPATH=. for the worktree build):
    PYTHONPATH=. python benchmarks/quiet/topk_dense_ratio.py --rounds 9 [--json benchmarks/quiet/X-loaded.json]"""
import argparse, datetime, json, os, statistics, time

import torch

import attnkern

ap = argparse.ArgumentParser()
ap.add_argument("--rounds", type=int, default=9)
ap.add_argument("--calls", type=int, default=3)
ap.add_argument("--json", default=None)
ap.add_argument("--label", default="")
args = ap.parse_args()

torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
B, H, L, D = 1, 4, 4096, 64
q, k, v = [torch.randn(B, H, L, D) for _ in range(3)]
subjects = {
    "dense": lambda: attnkern.scaled_dot_product_attention(q, k, v, backend="cpu"),
    "top64": lambda: attnkern.topk_attention(q, k, v, 64, backend="cpu"),
    "top16": lambda: attnkern.topk_attention(q, k, v, 16, backend="cpu"),
    "top1": lambda: attnkern.topk_attention(q, k, v, 1, backend="cpu"),
}


def timed(fn):
    ts = []
    for _ in range(args.calls):
        s = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - s)
    return statistics.median(ts)


with torch.no_grad():
    for fn in subjects.values():
        fn()  # warm-up
    ms = {name: [] for name in subjects}
    load = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for name, fn in subjects.items():
            ms[name].append(timed(fn) * 1e3)
        load.append(os.getloadavg()[0])
ratios = {name: [d / t for d, t in zip(ms["dense"], ms[name])] for name in ("top64", "top16", "top1")}
result = dict(
    what="alternating same-process timing, fp32 B1 H4 L=S=4096 D64 forward (no grad), backend=cpu; "
    f"each entry the median of {args.calls} calls; ratio = dense ms / top-k ms per round",
    label=args.label, date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
    threads=torch.get_num_threads(), loadavg_1m=load, torch=torch.__version__, isa=attnkern.ops._C.cpu_isa(),
    ms=ms, ratio_vs_dense=ratios, median_ratio_vs_dense={n: statistics.median(r) for n, r in ratios.items()},
)
print(args.label, "threads", result["threads"], "load", [round(x, 1) for x in load[:: max(1, len(load) // 4)]],
      "median ms", {n: round(statistics.median(t), 1) for n, t in ms.items()},
      "median ratio", {n: round(r, 3) for n, r in result["median_ratio_vs_dense"].items()})
if args.json:
    json.dump(result, open(args.json, "w"), indent=1)
