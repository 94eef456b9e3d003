"""Why paged decode can beat the contiguous cache on CPU: one process, subjects interleaved.

``flash_attn_with_kvcache`` reads a contiguous cache as one page of S rows per sequence, so the
CPU kernels read a 128-key block in place when it lies inside one page and gather it row by row
into scratch when it crosses pages. This script times the same decode step (B sequences, one
query each, S cached keys, Hq/Hkv heads, head dim D) through layouts that separate the two
suspects: the gather-versus-in-place read, and the cache's row stride (Hkv * D elements, 4 KiB
in fp32 at Hkv=8, D=128: every key row of a head then maps to the same L1 cache sets).

  contiguous       (B, S, Hkv, D), in place, row stride Hkv*D
  contiguous-padP  the same values in a (B, S, Hkv, D + P) buffer: row stride Hkv*(D+P), in place
                   (P = 2: 65 cache lines per row in fp32, so rows spread over every L1 set)
  head-major       Hugging Face's (B, Hkv, S, D) cache seen transposed: row stride D, in place
  paged16          pages of 16 rows: every 128-key block crosses pages and is gathered
  paged128/256     pages of 128/256 rows: blocks inside a page, read in place at row stride Hkv*D

Usage: python benchmarks/bench_decode_layout.py [--dtype float32] [--json out.json]
Figures are medians of interleaved rounds, reported as time / contiguous's; thread count and
load average are recorded (on a shared machine they are indicative only).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

import attnkern
from attnkern.bench.report import device_info, versions


def with_env(env, fn):
    """fn() with the environment variables in `env` set for the call (the kernels read them per call)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return fn()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


# Experiment subjects "<layout>+<label>": <layout> with these variables set. The kernels read them
# only in the experiment build of commit 428a83a (in-place threshold in bytes, software prefetch
# of the next key block's rows with locality hint T0/T1/T2 and distance in blocks, forced key
# splits); on any other build these subjects time the plain layout again.
EXPERIMENTS = {
    "contiguous+inplace": {"ATTNKERN_EXP_INPLACE": str(1 << 40)},
    "contiguous+copy": {"ATTNKERN_EXP_INPLACE": "0"},
    "contiguous+pfT0": {"ATTNKERN_EXP_PF": "1"},
    "contiguous+pfT1": {"ATTNKERN_EXP_PF": "2"},
    "contiguous+pfT2": {"ATTNKERN_EXP_PF": "3"},
    "contiguous+pfT0d2": {"ATTNKERN_EXP_PF": "1", "ATTNKERN_EXP_PFDIST": "2"},
    "contiguous+copy+pfT0": {"ATTNKERN_EXP_INPLACE": "0", "ATTNKERN_EXP_PF": "1"},
    "contiguous+split2": {"ATTNKERN_EXP_SPLITS": "2"},
    "contiguous+split4": {"ATTNKERN_EXP_SPLITS": "4"},
    "paged16+pfT0": {"ATTNKERN_EXP_PF": "1"},
    "paged256+pfT0": {"ATTNKERN_EXP_PF": "1"},
    "head-major+pfT0": {"ATTNKERN_EXP_PF": "1"},
}


def subjects(batch, cache_len, heads, heads_kv, dim, dtype, query_len=1, references=False, knobs=None):
    q = torch.randn(batch, query_len, heads, dim, dtype=dtype)
    kc = torch.randn(batch, cache_len, heads_kv, dim, dtype=dtype)
    vc = torch.randn(batch, cache_len, heads_kv, dim, dtype=dtype)
    seqlens = torch.full((batch,), cache_len, dtype=torch.int32)
    out = {"contiguous": lambda: attnkern.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens)}
    for pad in (2, 16):
        kpad = F.pad(kc, (0, pad))[..., :dim]
        vpad = F.pad(vc, (0, pad))[..., :dim]
        out[f"contiguous-pad{pad}"] = (lambda kpad=kpad, vpad=vpad: attnkern.flash_attn_with_kvcache(
            q, kpad, vpad, cache_seqlens=seqlens))
    # Hugging Face's head-major cache (B, Hkv, S, D) seen as (B, S, Hkv, D): row stride D
    khm, vhm = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (kc, vc))
    out["head-major"] = lambda: attnkern.flash_attn_with_kvcache(q, khm, vhm, cache_seqlens=seqlens)
    for page in (16, 128, 256):
        per_seq = cache_len // page
        table = torch.randperm(batch * per_seq).view(batch, per_seq).to(torch.int32)
        kp = torch.empty(batch * per_seq, page, heads_kv, dim, dtype=dtype)
        vp = torch.empty_like(kp)
        kp[table.flatten().long()] = kc.reshape(batch * per_seq, page, heads_kv, dim)
        vp[table.flatten().long()] = vc.reshape(batch * per_seq, page, heads_kv, dim)
        out[f"paged{page}"] = (lambda kp=kp, vp=vp, table=table: attnkern.flash_attn_with_kvcache(
            q, kp, vp, cache_seqlens=seqlens, block_table=table))
    if references:
        # the same cache through torch's SDPA (transposed view, no copy) and attnkern's dense op on a
        # contiguous (B, H, S, D) copy: how far the kvcache layout is from the dense op's rate
        qt = q.transpose(1, 2)
        kt, vt = kc.transpose(1, 2), vc.transpose(1, 2)
        kd, vd = kt.contiguous(), vt.contiguous()
        group = heads // heads_kv
        out["sdpa-view"] = lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=group > 1).transpose(1, 2)
        out["dense-bhsd"] = lambda: attnkern.scaled_dot_product_attention(
            qt, kd, vd, enable_gqa=group > 1).transpose(1, 2)
    for name, env in (knobs or {}).items():
        out[name] = (lambda env=env, base=out[name.split("+")[0]]: with_env(env, base))
    ref = out["contiguous"]()
    for name, fn in out.items():  # every layout computes the same attention
        torch.testing.assert_close(fn(), ref, rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-2, msg=name)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--cache-len", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--query-len", type=int, default=1, help="queries per sequence (1: decode; more: a prefill chunk)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--references", action="store_true", help="also time SDPA on the transposed view and "
                   "attnkern's dense op on a contiguous (B, H, S, D) copy")
    p.add_argument("--experiments", action="store_true")
    p.add_argument("--label", help="recorded in the JSON, e.g. 'loaded machine (load avg 4, 2 threads)'")
    p.add_argument("--json")
    args = p.parse_args()
    torch.manual_seed(0)
    fns = subjects(args.batch, args.cache_len, args.heads, args.kv_heads, args.dim, getattr(torch, args.dtype),
                   args.query_len, args.references, EXPERIMENTS if args.experiments else None)
    times = {name: [] for name in fns}
    load_before = os.getloadavg()[0]
    for _ in range(args.rounds):
        for name, fn in fns.items():  # interleaved: a load change hits every subject alike
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["contiguous"])
    # min_ms too: on a loaded machine a call's time is its work plus whatever waits for a descheduled
    # thread (multiples of the scheduler's tick); the fastest round is the closest to the work alone
    rows = [dict(subject=n, median_ms=statistics.median(t) * 1e3, min_ms=min(t) * 1e3,
                 vs_contiguous=statistics.median(t) / base,
                 ratio_per_round=statistics.median(a / b for a, b in zip(t, times["contiguous"])))
            for n, t in times.items()]
    info = device_info("cpu")
    info["loadavg_1m_before"] = round(load_before, 2)
    case = (f"{'decode' if args.query_len == 1 else f'chunk of {args.query_len}'} B={args.batch} "
            f"cache={args.cache_len} H={args.heads}/{args.kv_heads} D={args.dim} {args.dtype}")
    print(case)
    for r in rows:
        print(f"  {r['subject']:16s} {r['median_ms']:8.2f} ms (min {r['min_ms']:6.2f})  {r['vs_contiguous']:.2f}x  "
              f"(per-round ratio {r['ratio_per_round']:.2f}x)")
    print(f"threads {info['threads']}, load average (1 min) {load_before:.1f} -> {info.get('loadavg_1m')}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(label=args.label, device=info, versions=versions(), case=case, rounds=args.rounds, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
