"""Issue 13's plain-vs-modifier ratios, timed alternately in one process (fp32, B=1, H=8,
L=S=1024, D=64, causal forward+backward, backend="cpu"). `attnkern bench --modifiers` times its
cases one after another, so its first case also pays the run's warm-up; this script alternates
plain, sinks and softcap calls in rounds, in a random order each round, next to a second plain
entry ("null": what the order and the machine's drift alone give; a fixed order had biased other
same-process A/B runs on this machine by several percent). Run from the repository root with attnkern built;
writes benchmarks/quiet/cpu-modifier-ratios-<date>[-SUFFIX].json (SUFFIX: the first argument, if any)."""
import torch, time, attnkern, os, random
torch.manual_seed(int.from_bytes(os.urandom(4),'little'))
B,H,L,D=1,8,1024,64
q,k,v=[torch.randn(B,H,L,D,requires_grad=True) for _ in range(3)]
sinks=torch.randn(H,requires_grad=True)
def run(**kw):
    o=attnkern.scaled_dot_product_attention(q,k,v,is_causal=True,backend="cpu",**kw)
    o.sum().backward()
def t(**kw):
    run(**kw); ts=[]
    for _ in range(5):
        s=time.perf_counter(); run(**kw); ts.append(time.perf_counter()-s)
    return sorted(ts)[2]
calls={'plain': {}, 'null': {}, 'sinks': dict(sinks=sinks), 'softcap': dict(softcap=50.0)}
res={name: [] for name in calls}
for r in range(8):
    for name in random.sample(list(calls), len(calls)):
        res[name].append(t(**calls[name]))
for k_,v_ in res.items(): print(k_, [round(x*1e3,1) for x in v_])
print(torch.get_num_threads(), os.getloadavg())
import json, datetime, statistics
from attnkern.bench.report import cpu_name
out=dict(what="alternating same-process timing, fp32 B1 H8 L=S=1024 D64 causal forward+backward, backend=cpu; each entry is the median of 5 calls after one untimed call, 8 rounds in a random order each, 'null' a second plain entry",
 date=datetime.datetime.now(datetime.timezone.utc).isoformat(), threads=torch.get_num_threads(), loadavg=os.getloadavg(), torch=torch.__version__,
 cpu=cpu_name() + ' (%d CPUs)' % os.cpu_count(), isa=attnkern.ops._C.cpu_isa(), ms={k_:[x*1e3 for x in v_] for k_,v_ in res.items()})
p=statistics.median(res['plain'])
out['ratio_vs_plain']={name: p/statistics.median(res[name]) for name in ('null', 'sinks', 'softcap')}
print(out['ratio_vs_plain'])
import sys
suffix=('-'+sys.argv[1]) if len(sys.argv)>1 else ''
json.dump(out,open(f'benchmarks/quiet/cpu-modifier-ratios-{datetime.date.today()}{suffix}.json','w'),indent=1)
