"""Prefill check for the 2 KiB in-place limit of CPU key_rows (issue 12): flash_attn_func causal forward,
fp32, (B, L, H, D) inputs whose K/V rows are H * D * 4 = 2 KiB apart (copied before the block products
since that change), against torch SDPA on the transposed view in the same rounds. Run it alternately
on two builds: ``PYTHONPATH=<worktree> python benchmarks/quiet/prefill_2kib_rows.py <build name>``;
prints one JSON line (medians, the per-round attnkern / SDPA ratio, threads, load average)."""
import json, os, statistics, sys, time

import torch

import attnkern
import torch.nn.functional as F
torch.manual_seed(0)
B,L,H,D=2,2048,8,64
q,k,v=(torch.randn(B,L,H,D) for _ in range(3))
T=[]; S=[]
fa=lambda: attnkern.flash_attn_func(q,k,v,causal=True)
sd=lambda: F.scaled_dot_product_attention(q.transpose(1,2),k.transpose(1,2),v.transpose(1,2),is_causal=True)
fa(); sd()
for _ in range(9):
    t=time.perf_counter(); fa(); T.append(time.perf_counter()-t)
    t=time.perf_counter(); sd(); S.append(time.perf_counter()-t)
r=dict(build=sys.argv[1], case=f"flash_attn_func causal fwd fp32 B={B} L={L} H={H} D={D} (rows 2 KiB apart)",
       attnkern_ms=statistics.median(T)*1e3, sdpa_ms=statistics.median(S)*1e3,
       ratio_per_round=statistics.median(a/b for a,b in zip(T,S)), threads=torch.get_num_threads(), load=os.getloadavg()[0])
print(json.dumps(r))
