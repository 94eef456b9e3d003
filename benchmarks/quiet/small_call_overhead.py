"""Per-call time of small attnkern calls (B=1, H=1, L=1, D=64, S=16 and 256; 1 thread), with and
without a query that requires grad: the best of 20 x 200 calls, one line of JSON. Where the
kernels take a few microseconds, this is the Python path's cost. Compare two checkouts by running
it alternately with each on PYTHONPATH (from a directory that is not a checkout)."""
import json
import time

import torch

import attnkern

torch.set_num_threads(1)
out = {}
for S in (16, 256):
    q = torch.randn(1, 1, 1, 64)
    k, v = (torch.randn(1, 1, S, 64) for _ in range(2))
    for grad in (False, True):
        if grad:
            q.requires_grad_(True)
        f = lambda: attnkern.scaled_dot_product_attention(q, k, v, backend="cpu")  # noqa: E731
        for _ in range(300):
            f()
        best = 1e9
        for _ in range(20):
            t = time.perf_counter()
            for _ in range(200):
                f()
            best = min(best, (time.perf_counter() - t) / 200)
        out["S%d%s" % (S, " q.requires_grad" if grad else "")] = best * 1e6
print(json.dumps(out))
