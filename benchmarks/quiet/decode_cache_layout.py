"""One process, one query row per item (MHA decode, B=8, H=8, 4096 cached keys, D=64, fp32, 128 MiB
of K/V): attnkern and torch SDPA on the same K/V in two layouts, the calls interleaved round by round:
  bshd: (B, S, H, D), flash-attn's and the KV cache's layout, a head's rows 2 KiB apart (read in place);
  bhsd: (B, H, S, D) contiguous, a head's rows adjacent (what `attnkern packed --suite decode` hands
        SDPA: the cache gathered before timing).
Per subject the best and the median of 15 rounds of 5 calls, at 1 and 2 threads (torch.set_num_threads),
twice each; JSON with the load averages.
SHAPE (B,H,S,D) replaces that shape (stop 21: 4,8,4096,128, rows 4 KiB apart, whole-row items).
Usage: PYTHONPATH=<checkout> python decode_cache_layout.py [OUT.json [B,H,S,D]]"""
import os, sys, time, json, statistics, datetime, torch, attnkern
import torch.nn.functional as F

B, H, S, D = map(int, sys.argv[2].split(",")) if len(sys.argv) > 2 else (8, 8, 4096, 64)
torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
q = torch.randn(B, 1, H, D)
k_bshd, v_bshd = torch.randn(B, S, H, D), torch.randn(B, S, H, D)
k_bhsd, v_bhsd = k_bshd.transpose(1, 2).contiguous(), v_bshd.transpose(1, 2).contiguous()
subjects = {
    "attnkern bshd": lambda: attnkern.flash_attn_func(q, k_bshd, v_bshd, backend="cpu"),
    "attnkern bhsd": lambda: attnkern.flash_attn_func(q, k_bhsd.transpose(1, 2), v_bhsd.transpose(1, 2), backend="cpu"),
    "sdpa bshd": lambda: F.scaled_dot_product_attention(q.transpose(1, 2), k_bshd.transpose(1, 2), v_bshd.transpose(1, 2)),
    "sdpa bhsd": lambda: F.scaled_dot_product_attention(q.transpose(1, 2), k_bhsd, v_bhsd),
}
ref = subjects["sdpa bhsd"]()
for name, f in subjects.items():  # the same result in every layout (a wrong stride would not be timed)
    out = f()
    out = out.transpose(1, 2) if name.startswith("attnkern") else out
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4), name
record = {"what": __doc__.split("\n")[0], "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "torch": torch.__version__, "cpu_isa": attnkern.ops._C.cpu_isa(), "shape_bhsd": [B, H, S, D],
          "loadavg_before": os.getloadavg(), "runs": []}
for rep in range(2):
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for f in subjects.values():
            f(); f()
        times = {n: [] for n in subjects}
        for _ in range(15):
            for n, f in subjects.items():
                t = time.perf_counter()
                for _ in range(5): f()
                times[n].append((time.perf_counter() - t) / 5 * 1e3)
        run = {"threads": threads, "ms": {n: {"best": round(min(v), 2), "median": round(statistics.median(v), 2)} for n, v in times.items()}}
        m = {n: statistics.median(v) for n, v in times.items()}
        run["ratios_of_medians"] = {"sdpa/attnkern, bshd": round(m["sdpa bshd"] / m["attnkern bshd"], 2),
                                    "sdpa/attnkern, bhsd": round(m["sdpa bhsd"] / m["attnkern bhsd"], 2),
                                    "attnkern bshd/bhsd": round(m["attnkern bshd"] / m["attnkern bhsd"], 2),
                                    "sdpa bhsd / attnkern bshd": round(m["sdpa bhsd"] / m["attnkern bshd"], 2)}
        run["loadavg"] = os.getloadavg()
        record["runs"].append(run)
        print(json.dumps(run))
if len(sys.argv) > 1:
    json.dump(record, open(sys.argv[1], "w"), indent=1)
