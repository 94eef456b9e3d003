"""One process: 1 thread against 2 threads (torch.set_num_threads), decode calls of one row per item
(fp32 and bf16 MHA, K/V in cache), the best of 15 x 50 calls, two rounds; JSON with the load averages."""
import os, time, json, torch, attnkern
out = {"loadavg_before": os.getloadavg()}
for B, H, S, D, dt in ((1, 8, 1024, 64, torch.float32), (1, 8, 1024, 128, torch.float32), (1, 8, 1024, 128, torch.bfloat16)):
    q = torch.randn(B, H, 1, D, dtype=dt); k, v = (torch.randn(B, H, S, D, dtype=dt) for _ in range(2))
    f = lambda: attnkern.scaled_dot_product_attention(q, k, v, backend="cpu")
    for rnd in range(2):
        for t in (1, 2):
            torch.set_num_threads(t)
            for _ in range(50): f()
            best = 1e9
            for _ in range(15):
                s = time.perf_counter()
                for _ in range(50): f()
                best = min(best, (time.perf_counter() - s) / 50)
            out.setdefault("%s D%d S%d" % (str(dt)[6:], D, S), {}).setdefault("%d threads" % t, []).append(round(best * 1e6, 1))
out["loadavg_after"] = os.getloadavg()
print(json.dumps(out, indent=1))
