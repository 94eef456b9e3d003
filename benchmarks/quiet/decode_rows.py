"""Does CPU decoding cost per query row or per K/V block? One process, interleaved rounds: the
same KV cache (B=8, S=4096, 8 kv heads, D=64, (B, S, Hkv, D)) decoded with 8, 16, 32 and 64
query heads (1 to 8 query rows per kv head) through ``flash_attn_with_kvcache`` on the CPU.
Run from the repository root with attnkern built: ``PYTHONPATH=. python
benchmarks/quiet/decode_rows.py [--json PATH]``; prints median ms per query-head count, the thread
count and the load average."""
import argparse, json, os, statistics, time

import torch

import attnkern

ap = argparse.ArgumentParser()
ap.add_argument("--rounds", type=int, default=7)
ap.add_argument("--json", default=None)
args = ap.parse_args()
torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
B, S, Hkv, D = 8, 4096, 8, 64
out = {"threads": torch.get_num_threads(), "load_before": os.getloadavg(), "shape": [B, S, Hkv, D], "median_ms": {}}
for dt in (torch.float32, torch.bfloat16):
    k, v = torch.randn(B, S, Hkv, D, dtype=dt), torch.randn(B, S, Hkv, D, dtype=dt)
    qs = {hq: torch.randn(B, 1, hq, D, dtype=dt) for hq in (8, 16, 32, 64)}
    times = {hq: [] for hq in qs}
    for _ in range(args.rounds):
        for hq, q in qs.items():
            t0 = time.perf_counter()
            attnkern.flash_attn_with_kvcache(q, k, v)
            times[hq].append(time.perf_counter() - t0)
    out["median_ms"][str(dt)] = {hq: round(statistics.median(t) * 1e3, 2) for hq, t in times.items()}
    print(dt, out["median_ms"][str(dt)], "ms; threads", out["threads"])
out["load_after"] = os.getloadavg()
if args.json:
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
